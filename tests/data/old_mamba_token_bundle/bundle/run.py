#!/usr/bin/env python3
"""compressm-tune edge runner: run an exported bundle with numpy + onnxruntime only.

This one file is the whole device side. It imports nothing but the standard library, numpy and
onnxruntime (never torch, never compressm_tune), so it runs on a device where only those two
are installed, and it keeps to Python 3.8 (devices lag behind). ``compressm_tune.exporter``
imports it for :func:`measure_latency` and the bundle checks, ``export_bundle`` copies it into
every bundle as ``run.py``, and ``export/run.py`` in the repository launches it.

Usage (inside a bundle folder, the bundle argument defaults to this file's folder)::

    python3 run.py BUNDLE --input x.npy                 # batch inference, raw input
    python3 run.py BUNDLE --input x.npz --stream        # token by token through model_step.onnx
    printf '0.1\\n0.3\\n\\n' | python3 run.py BUNDLE --stdin   # one token per line, blank = reset
    python3 run.py BUNDLE --bench --threads 1           # latency p50/p90/p99 per sample

Token bundles (``manifest["input"]["kind"] == "token_ids"``: a model with an embedding, or one
trained on one-hot ids) take integer ids ``(batch, length)`` or ``(length,)`` in
``[0, vocab_size)`` and print the most likely next id per sequence; when the manifest has a
vocabulary (``task.vocabulary``, byte-level text) also its character, and ``--text "def f("``
(with ``--generate N``: greedy continuation of N characters through the step graph) works::

    python3 run.py BUNDLE --input ids.npy [--stream]   # next id (and character) per sequence
    python3 run.py BUNDLE --text "def f(" --generate 40

Float input is raw: it is normalized with the manifest's ``(raw - mean) / std`` unless
``--normalized``. Shapes: ``(batch, length, d_input)``; ``(length, d_input)`` is one sequence;
with ``d_input == 1`` also ``(batch, length)`` or ``(length,)``. Sequences of different lengths
come padded with trailing all-NaN steps, as in training; each runs at its true length. When the
manifest lists the training labels (``task.labels``), records print the user's label too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["BundleError", "EdgeBundle", "Streamer", "input_spec", "latency_stats", "lengths_of",
           "load_manifest", "manifest_chunk", "measure_latency", "main", "run_ragged",
           "sha256_file"]

MANIFEST = "manifest.json"
FORMAT = "compressm-tune/bundle"
VERSION = 1
MODES = ("sequence", "step")
CHUNK_KEY = "compressm.chunk"  # graph metadata: "scan" or the chunk length (no key: "scan")


class BundleError(ValueError):
    """A bundle is missing, malformed, or its manifest does not match its model files."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(bundle_dir: str | Path) -> dict:
    """Read and structurally validate ``bundle_dir/manifest.json``."""
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"no {MANIFEST} in {bundle_dir}: not an exported bundle")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not a compressm-tune bundle manifest")
    if manifest.get("version") != VERSION:
        raise BundleError(f"{path} has bundle version {manifest.get('version')!r}; "
                          f"this runner reads {VERSION}")
    for key in ("files", "model", "normalization"):  # token bundles: normalization "none"
        if not isinstance(manifest.get(key), dict):
            raise BundleError(f"{path} lacks its {key!r} section")
    return manifest


def _import_ort():
    try:
        import onnxruntime
    except ImportError as exc:  # the one dependency besides numpy
        raise BundleError(f"the edge runner needs `pip install onnxruntime`: {exc}") from None
    return onnxruntime


def check_file(bundle_dir: str | Path, manifest: dict, key: str) -> Path:
    """Path of the manifest's file ``key`` after checking it exists and its SHA-256 matches."""
    entry = manifest["files"].get(key)
    if not isinstance(entry, dict) or "path" not in entry or "sha256" not in entry:
        have = sorted(manifest["files"])
        raise BundleError(f"bundle has no {key!r} file (manifest lists {have})")
    name = str(entry["path"])
    if Path(name).name != name or name in ("", ".", ".."):  # e.g. "../outside.onnx"
        raise BundleError(f"the manifest names {name!r} for {key!r}: a bundle's files are plain "
                          "names inside its folder; refusing to read outside it")
    path = Path(bundle_dir) / name
    if not path.is_file():
        raise BundleError(f"{path} is listed in the manifest but missing")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise BundleError(f"{path} does not match its manifest: sha256 {digest[:12]}... != "
                          f"{entry['sha256'][:12]}... (file replaced or corrupted; re-export)")
    return path


def _check_session(session, manifest: dict, key: str) -> None:
    """The graph's inputs/outputs and recorded widths must equal the manifest's."""
    entry = manifest["files"][key]
    for side, infos in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        got = [{"name": i.name, "shape": list(i.shape)} for i in infos]
        want = [{"name": s["name"], "shape": list(s["shape"])} for s in entry.get(side, [])]
        if got != want:
            raise BundleError(f"{entry['path']} {side} do not match the manifest: "
                              f"model has {got}, manifest says {want}")
    meta = session.get_modelmeta().custom_metadata_map
    dims = ",".join(str(n) for n in manifest["model"].get("state_dims", []))
    if meta.get("compressm.state_dims") != dims:
        raise BundleError(f"{entry['path']} has state widths [{meta.get('compressm.state_dims')}]"
                          f" but the manifest says [{dims}]")
    arch = manifest["model"].get("arch", "lru")  # bundles from before selective layers: LRU
    if meta.get("compressm.arch", "lru") != arch:
        raise BundleError(f"{entry['path']} holds a {meta.get('compressm.arch', 'lru')!r} "
                          f"network but the manifest says {arch!r}")
    if key.startswith("onnx_sequence"):
        want, got = manifest_chunk(manifest), meta.get(CHUNK_KEY, "scan")
        if got != want:
            raise BundleError(f"{entry['path']} is a {_variant(got)} sequence graph but the "
                              f"manifest's sequence_graph says {_variant(want)}; re-export the "
                              "bundle with `compressm-tune export`")


def _variant(label: str) -> str:
    return "per-token Scan" if label == "scan" else f"chunked (T={label})"


def manifest_chunk(manifest: dict) -> str:
    """The sequence graph the manifest promises: ``"scan"`` or the chunk length as text.

    A manifest without a ``sequence_graph`` entry promises the per-token Scan.
    """
    graph = manifest.get("sequence_graph")
    if graph is None:
        return "scan"
    chunk = graph.get("chunk", "missing") if isinstance(graph, dict) else "missing"
    if chunk is None:
        return "scan"
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise BundleError(f"manifest sequence_graph.chunk must be null (per-token Scan) or an "
                          f"integer >= 1, got {chunk!r}; re-export the bundle")
    return str(chunk)


def input_spec(manifest: dict) -> dict:
    """The manifest's ``input`` section, checked; bundles from before token ids have none and
    take float features."""
    spec = manifest.get("input") or {"kind": "features"}
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "features":
        return spec
    vocab, encoding = spec.get("vocab_size"), spec.get("encoding")
    if kind != "token_ids" or isinstance(vocab, bool) or not isinstance(vocab, int) or (
            vocab < 1) or encoding not in ("embedding", "one-hot"):
        raise BundleError(f"manifest input must be float features or token ids with an integer "
                          f"vocab_size >= 1 and encoding 'embedding' or 'one-hot', got {spec!r}")
    if encoding == "one-hot" and manifest["model"].get("d_input") != vocab:
        raise BundleError(f"manifest input is one-hot over {vocab} ids but the model takes "
                          f"{manifest['model'].get('d_input')} channels")
    return spec


def _session(path: Path, threads: int):
    ort = _import_ort()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise BundleError(f"threads must be an integer >= 1, got {threads=}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types differ between versions
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"onnxruntime cannot load {path}: {reason}") from None


class EdgeBundle:
    """A verified bundle with onnxruntime sessions.

    Parameters
    ----------
    bundle_dir : str or Path
        Folder holding ``manifest.json`` and the model files.
    threads : int
        onnxruntime intra-op threads (inter-op is 1, execution sequential).
    int8 : bool
        Use the dynamically quantized models (the bundle must have been exported with them).
    modes : tuple of {"sequence", "step"}
        Which graphs to open; each is checked against the manifest (SHA-256, input/output names
        and shapes, state widths) before use.
    """

    def __init__(self, bundle_dir: str | Path, threads: int = 1, int8: bool = False,
                 modes: tuple[str, ...] = MODES) -> None:
        self.dir = Path(bundle_dir)
        self.manifest = load_manifest(self.dir)
        self.threads = threads
        model = self.manifest["model"]
        self.d_input, self.d_output = int(model["d_input"]), int(model["d_output"])
        spec = input_spec(self.manifest)
        self.vocab_size = spec.get("vocab_size")  # token bundles; None: float features
        self.tokens = self.vocab_size is not None
        self.encoding = spec.get("encoding")  # "embedding" (ids in the graph) or "one-hot"
        if self.encoding != "embedding":  # a float graph: its inputs are normalized
            norm = self.manifest["normalization"]
            self.mean = np.asarray(norm.get("mean"), np.float32)  # (d_input,)
            self.std = np.asarray(norm.get("std"), np.float32)  # (d_input,)
            if self.mean.shape != (self.d_input,) or self.std.shape != (self.d_input,) or not (
                    np.all(self.std > 0) and np.all(np.isfinite(self.mean))):
                raise BundleError(f"manifest normalization must give {self.d_input} finite "
                                  f"means and positive stds, got {norm}")
        self.sessions = {}
        for mode in modes:
            if mode not in MODES:
                raise BundleError(f"mode must be one of {MODES}, got {mode!r}")
            key = f"onnx_{mode}" + ("_int8" if int8 else "")
            self.sessions[mode] = _session(check_file(self.dir, self.manifest, key), threads)
            _check_session(self.sessions[mode], self.manifest, key)
            if mode == "step":
                inputs = self.manifest["files"][key]["inputs"]
                self.state_specs = [(s["name"], s["shape"]) for s in inputs[1:]]
                self.step_inputs = [s["name"] for s in inputs]
                # per block: LRU (batch, N, 2), selective (batch, H, N); zeros start a sequence
                shapes = model.get("state_shapes")
                have = [shape for _, shape in self.state_specs][:len(shapes or [])]
                if shapes is not None and (not isinstance(shapes, list) or have != shapes):
                    raise BundleError(f"{key} takes block states {have} but the manifest's "
                                      f"model.state_shapes says {shapes}")

    @property
    def task(self) -> dict:
        return self.manifest.get("task", {})

    @property
    def vocabulary(self) -> dict | None:
        """The id -> byte table of a text model (``task.vocabulary``), or None."""
        return self.task.get("vocabulary") if self.tokens else None

    def as_ids(self, ids) -> np.ndarray:
        """Check token ids and return them as ``(batch, length)`` int64 (``(length,)``: one
        sequence)."""
        ids = np.asarray(ids)
        if not (np.issubdtype(ids.dtype, np.integer) and ids.dtype != np.bool_):
            raise BundleError(f"this bundle takes integer token ids, got {ids.dtype} values")
        ids = ids[None] if ids.ndim == 1 else ids
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise BundleError(f"token ids must have shape (batch, length) or (length,) with "
                              f"length >= 1, got {tuple(np.shape(ids))}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise BundleError(f"token id {int(ids[first])} at {first} is outside the "
                              f"vocabulary [0, {self.vocab_size})")
        return ids.astype(np.int64)

    def encode(self, ids: np.ndarray) -> np.ndarray:
        """Checked ids ``(...)`` -> the graph's input: the ids themselves (embedding), or
        one-hot float32 ``(..., vocab_size)``."""
        if self.encoding == "embedding":
            return ids
        return np.eye(self.vocab_size, dtype=np.float32)[ids]

    def text_ids(self, text: str) -> np.ndarray:
        """UTF-8 ``text`` -> ids ``(length,)`` through the manifest's vocabulary."""
        vocab = self.vocabulary
        if not vocab:
            raise BundleError("this bundle's manifest has no vocabulary: give token ids with "
                              "--input ids.npy")
        if not text:
            raise BundleError("the text is empty: give at least one character")
        lookup = {int(b): i for i, b in enumerate(vocab["bytes"])}
        outside = sorted({c for c in text if any(b not in lookup for b in c.encode("utf-8"))})
        if outside:
            raise BundleError(f"the text holds characters outside the bundle's vocabulary: "
                              f"{''.join(outside)!r}")
        return np.array([lookup[b] for b in text.encode("utf-8")], np.int64)

    def decode(self, ids) -> str:
        """Ids -> text (the unknown id and broken UTF-8 show as U+FFFD)."""
        table = self.vocabulary["bytes"]
        raw = b"".join(bytes([table[i]]) if i < len(table) else "\ufffd".encode()
                       for i in map(int, ids))
        return raw.decode("utf-8", errors="replace")

    def as_batch(self, x: np.ndarray) -> np.ndarray:
        """Coerce raw input to ``(batch, length, d_input)`` float32 (see module docstring)."""
        if self.tokens:
            raise BundleError("this bundle takes token ids, not float features")
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 1 and self.d_input == 1:
            x = x[None, :, None]
        elif x.ndim == 2:
            x = x[..., None] if self.d_input == 1 else x[None]
        if x.ndim != 3 or x.shape[2] != self.d_input or x.shape[1] < 1 or x.shape[0] < 1:
            raise BundleError(f"input must have shape (batch, length, {self.d_input}) with "
                              f"batch >= 1 and length >= 1, got {tuple(np.shape(x))}")
        return x

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        """``(raw - mean) / std`` per input channel, float32."""
        return ((np.asarray(raw, np.float32) - self.mean) / self.std).astype(np.float32)

    def predict(self, x: np.ndarray, normalized: bool = False, batch_size: int = 256):
        """Whole sequences through ``model.onnx``: ``(batch, L, d_input)`` -> outputs; token
        bundles: int ids ``(batch, L)`` -> logits (``(batch, L, vocab)`` for a language model)."""
        if "sequence" not in self.sessions:
            raise BundleError("the bundle was opened without its sequence model")
        if self.tokens:
            x = self.encode(self.as_ids(x))
        else:
            x = self.as_batch(x)
            x = x if normalized else self.normalize(x)
        session = self.sessions["sequence"]
        parts = [session.run(None, {"x": x[i:i + batch_size]})[0]
                 for i in range(0, len(x), batch_size)]
        return np.concatenate(parts)

    def streamer(self, batch: int = 1) -> Streamer:
        """A token-by-token runner over ``model_step.onnx`` with zero initial state."""
        return Streamer(self, batch)


class Streamer:
    """Feed tokens one at a time; each :meth:`push` returns the output so far."""

    def __init__(self, bundle: EdgeBundle, batch: int = 1) -> None:
        if "step" not in bundle.sessions:
            raise BundleError("the bundle was opened without its step model")
        self.bundle, self.batch = bundle, batch
        self.session = bundle.sessions["step"]
        self.reset()

    def reset(self) -> None:
        """Zero every state (start a new sequence)."""
        self.state = [np.zeros([self.batch if d == "batch" else d for d in shape], np.float32)
                      for _, shape in self.bundle.state_specs]

    def push(self, x_t: np.ndarray, normalized: bool = False) -> np.ndarray:
        """One token ``(batch, d_input)`` (raw unless ``normalized``), or token ids
        ``(batch,)``, -> ``(batch, d_output)``."""
        bundle = self.bundle
        if bundle.tokens:
            ids = np.asarray(x_t)
            if ids.shape != (self.batch,):
                raise BundleError(f"push takes {self.batch} token ids, got shape {ids.shape}")
            x_t = bundle.encode(bundle.as_ids(ids[:, None])[:, 0])
        else:
            x_t = np.asarray(x_t, np.float32).reshape(self.batch, bundle.d_input)
            x_t = x_t if normalized else bundle.normalize(x_t)
        feeds = dict(zip(self.bundle.step_inputs, [x_t, *self.state]))  # noqa: B905 (py3.8 devices)
        out = self.session.run(None, feeds)
        self.state = out[1:]
        return out[0]

    def run(self, x: np.ndarray, normalized: bool = False) -> np.ndarray:
        """Stream sequences ``(batch, L, d_input)`` (token bundles: ids ``(batch, L)``);
        return every ``y_t`` ``(batch, L, d_out)``."""
        x = self.bundle.as_ids(x) if self.bundle.tokens else np.asarray(x)
        self.reset()
        return np.stack([self.push(x[:, t], normalized) for t in range(x.shape[1])], axis=1)

    def generate(self, prompt: np.ndarray, n: int) -> list:
        """Greedy continuation (batch 1): stream the ids ``prompt (L,)`` from zero state, then
        feed back the most likely next id ``n`` times; returns those ``n`` ids."""
        if self.batch != 1:
            raise BundleError("generate runs one sequence (a streamer of batch 1)")
        self.reset()
        for t in np.asarray(prompt).reshape(-1):
            y = self.push(np.array([t]))
        out: list = []
        while len(out) < n:
            out.append(int(np.argmax(y[0])))
            if len(out) < n:
                y = self.push(np.array([out[-1]]))
        return out


# ----------------------------------------------------------------------------- latency


def latency_stats(samples_s) -> dict:
    """Percentiles of per-call wall times given in seconds, returned in milliseconds.

    Examples
    --------
    >>> latency_stats([0.001, 0.002, 0.003])["p50_ms"]
    2.0
    """
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise BundleError("latency_stats needs at least one sample")
    q25, p50, q75, p90, p99 = np.percentile(ms, [25, 50, 75, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "mean_ms": float(ms.mean()), "iqr_ms": float(q75 - q25), "min_ms": float(ms.min()),
            "n_samples": int(ms.size)}


def time_calls(call, min_time_s, warmup, min_repeats=20):
    """Seconds per call of ``call(i)``: ``warmup`` untimed calls, then timed calls until at
    least ``min_time_s`` seconds of work and ``min_repeats`` calls."""
    for i in range(warmup):
        call(i)
    samples, total, i = [], 0.0, 0
    while total < min_time_s or len(samples) < min_repeats:
        t0 = time.perf_counter()
        call(i)
        dt = time.perf_counter() - t0
        samples.append(dt)
        total += dt
        i += 1
    return samples


def measure_latency(bundle_dir: str | Path, mode: str = "sequence", seq_len: int | None = None,
                    threads: int | None = None, min_time_s: float = 1.0, warmup: int = 5,
                    min_repeats: int = 20, int8: bool = False, seed: int = 0) -> dict:
    """Wall-clock latency of one sample (batch 1) in onnxruntime with fixed threads.

    ``sequence``: one call of ``model.onnx`` on a ``(1, seq_len, d_input)`` input
    (``seq_len`` defaults to the manifest's training length). ``step``: one call of
    ``model_step.onnx``, i.e. one token, streaming with the states fed back (reset every
    ``seq_len`` tokens). Calls repeat until ``min_time_s`` of timed work and ``min_repeats``
    calls, after ``warmup`` untimed calls. Returns ``p50_ms``, ``p90_ms``, ``p99_ms``,
    ``mean_ms``, ``iqr_ms``, ``n_samples`` and how it was measured (``method``).
    """
    if mode not in MODES:
        raise BundleError(f"mode must be one of {MODES}, got {mode!r}")
    threads = 1 if threads is None else threads
    if not min_time_s > 0 or min_repeats < 1 or warmup < 0:
        raise BundleError(f"need min_time_s > 0, min_repeats >= 1, warmup >= 0; got "
                          f"{min_time_s=} {min_repeats=} {warmup=}")
    if seq_len is not None and (isinstance(seq_len, bool) or int(seq_len) < 1):
        raise BundleError(f"seq_len must be an integer >= 1, got {seq_len=}")
    bundle = EdgeBundle(bundle_dir, threads=threads, int8=int8, modes=(mode,))
    seq_len = int(seq_len or bundle.task.get("seq_len") or 0)
    if seq_len < 1:
        raise BundleError("the manifest records no training length; pass seq_len "
                          "(run.py: --seq-len)")
    rng = np.random.default_rng(seed)
    if bundle.tokens:  # random ids; the sequence graph gets them encoded once
        x = rng.integers(bundle.vocab_size, size=(1, seq_len))
        feed = bundle.encode(x)
    else:
        x = feed = rng.standard_normal((1, seq_len, bundle.d_input)).astype(np.float32)
    if mode == "sequence":
        session = bundle.sessions["sequence"]

        def call(i):
            session.run(None, {"x": feed})
    else:
        stream = bundle.streamer(1)

        def call(i):
            if i % seq_len == 0:
                stream.reset()
            stream.push(x[:, i % seq_len], normalized=True)
    samples = time_calls(call, min_time_s, warmup, min_repeats)
    ort = _import_ort()
    unit = f"per sequence of {seq_len} tokens" if mode == "sequence" else "per token"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "mode": mode, "seq_len": seq_len, "threads": threads, "int8": int8, "batch": 1,
        "unit": f"ms {unit}", **latency_stats(samples),
        "method": (f"onnxruntime {ort.__version__} CPUExecutionProvider, intra_op_num_threads="
                   f"{threads}, inter_op_num_threads=1, sequential; time.perf_counter around "
                   f"each session.run (Python call overhead included), batch 1, {warmup} "
                   f"warm-up calls, repeated for >= {min_time_s} s and >= {min_repeats} calls"),
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpu_count": os.cpu_count(), "loadavg_1min": load},
    }


# ----------------------------------------------------------------------------- command line


def _read_input(path: str, key: str | None) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, np.ndarray):
        with data:
            names = list(data.files)
            key = key or ("x" if "x" in names else names[0] if len(names) == 1 else None)
            if key not in names:
                raise BundleError(f"{path} holds {names}; choose one with --key")
            data = data[key]
    if not np.issubdtype(data.dtype, np.number):
        raise BundleError(f"{path} holds {data.dtype} values, not numbers")
    return data


def lengths_of(x: np.ndarray) -> np.ndarray:
    """True lengths ``(batch,)`` of ``x (batch, L, d_input)`` padded with trailing NaN steps.

    A step whose channels are all NaN is padding and must come after every real step (the
    training data's convention, ``load_dataset("npz")``); any other non-finite value is refused
    (a NaN fed to the model gave class 0 with probability nan, and exit 0).
    """
    pad = np.isnan(x).all(axis=2)  # (B, L)
    lengths = (~pad).sum(axis=1)  # (B,)
    trailing = np.arange(x.shape[1])[None, :] >= lengths[:, None]  # (B, L)
    bad = ~np.isfinite(x) & ~(pad & trailing)[..., None]  # (B, L, d)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise BundleError(f"input holds a non-finite value ({x[first]}) at {first}; NaN is "
                          "allowed only as trailing padding of whole steps")
    if (lengths == 0).any():
        raise BundleError(f"input sequence {int(np.flatnonzero(lengths == 0)[0])} is all "
                          "NaN padding")
    return lengths


def run_ragged(x: np.ndarray, lengths: np.ndarray, run) -> np.ndarray:
    """``run`` on each group of equal true length, at that length; outputs back in order.

    ``run(x_group (b, l, d)) -> (b, C)`` or per step ``(b, l, C)``; per-step outputs are
    NaN past each sequence's length in the result ``(batch, L, C)``.
    """
    out = None
    for length in np.unique(lengths):
        idx = np.flatnonzero(lengths == length)
        part = run(x[idx, :length])
        if out is None:
            shape = (len(x), x.shape[1], *part.shape[2:]) if part.ndim == 3 else (
                len(x), *part.shape[1:])
            out = np.full(shape, np.nan, np.float32)
        if part.ndim == 3:
            out[idx, :length] = part
        else:
            out[idx] = part
    return out


def _describe(bundle: EdgeBundle, y: np.ndarray, lengths: np.ndarray) -> list[dict]:
    """One record per sample: the class (and the user's label for it, when the manifest has
    them) and its probability, or the output values; per-step records end at each length."""
    if bundle.task.get("task") == "classification":
        labels = bundle.task.get("labels")
        z = y - y.max(-1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)  # (B, C) or per step (B, L, C)
        cls, prob = p.argmax(-1), p.max(-1)
        if y.ndim == 2:
            return [dict({"class": int(c)}, **({"label": labels[c]} if labels else {}),
                         prob=round(float(q), 4))
                    for c, q in zip(cls, prob)]  # noqa: B905 (runs on py3.8 devices)
        return [{"class_per_step": c[:n].tolist()} if not labels else
                {"label_per_step": [labels[k] for k in c[:n]]}
                for c, n in zip(cls, lengths)]  # noqa: B905
    return [{"output": np.round(v[:n] if y.ndim == 3 else v, 5).tolist()}
            for v, n in zip(y, lengths)]  # noqa: B905


def _next_tokens(bundle: EdgeBundle, y: np.ndarray) -> list | None:
    """Per sequence the most likely next id after its last token (its character when the
    manifest has a vocabulary) and its probability; None unless the bundle is a token
    language model (per-step logits over its own vocabulary)."""
    if not (bundle.tokens and y.ndim == 3 and y.shape[2] == bundle.vocab_size):
        return None
    z = y[:, -1] - y[:, -1].max(-1, keepdims=True)  # (B, V)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    records = []
    for k, q in zip(p.argmax(-1), p.max(-1)):  # noqa: B905 (runs on py3.8 devices)
        rec = {"next_id": int(k)}
        if bundle.vocabulary:
            rec["next_char"] = bundle.decode([k])
        rec["prob"] = round(float(q), 4)
        records.append(rec)
    return records


def _print_records(records: list[dict], as_json: bool, label: str) -> None:
    for i, rec in enumerate(records):
        print(json.dumps({label: i, **rec}) if as_json else
              f"{label} {i}: " + ", ".join(f"{k}={v}" for k, v in rec.items()))


def _parser() -> argparse.ArgumentParser:
    here = Path(__file__).resolve().parent
    default = str(here) if (here / MANIFEST).is_file() else None
    p = argparse.ArgumentParser(description="Run a compressm-tune bundle with onnxruntime "
                                "(numpy + onnxruntime only).")
    p.add_argument("bundle", nargs="?", default=default,
                   help="bundle folder (default: this file's folder when it holds a manifest)")
    p.add_argument("--input", help=".npy or .npz file of raw input sequences")
    p.add_argument("--key", default=None, help="array name inside an .npz (default: 'x')")
    p.add_argument("--normalized", action="store_true", help="input is already normalized")
    p.add_argument("--stream", action="store_true",
                   help="run --input token by token through the step model")
    p.add_argument("--text", default=None,
                   help="token bundles with a vocabulary: text to continue (its next character;"
                   " with --generate N, N characters)")
    p.add_argument("--generate", type=int, default=None,
                   help="with --text: greedy continuation of N characters through the step model")
    p.add_argument("--stdin", action="store_true",
                   help="stream tokens from stdin, one per line (d_input numbers); blank = reset")
    p.add_argument("--output", help="save the raw outputs to this .npy file")
    p.add_argument("--int8", action="store_true", help="use the int8-quantized models")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (1)")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    p.add_argument("--bench", action="store_true", help="report latency p50/p90/p99")
    p.add_argument("--mode", default=None,
                   help="modes to --bench: sequence, step (default: every exported one)")
    p.add_argument("--seq-len", type=int, default=None, help="--bench sequence length")
    p.add_argument("--min-time-s", type=float, default=1.0, help="--bench seconds per mode")
    return p


def _run(args: argparse.Namespace) -> int:
    if args.bundle is None:
        raise BundleError("give the bundle folder")
    if args.generate is not None and (args.text is None or args.generate < 1):
        raise BundleError("--generate N takes N >= 1 and goes with --text")
    if not (args.input or args.stdin or args.bench or args.text is not None):
        raise BundleError("nothing to do: give --input, --text, --stdin or --bench")
    if args.seq_len is not None and args.seq_len < 1:
        raise BundleError(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.output:
        _check_output(args.output)
    if args.text is not None:
        _run_text(args)
    if args.input:
        modes = ("step",) if args.stream else ("sequence",)
        bundle = EdgeBundle(args.bundle, threads=args.threads, int8=args.int8, modes=modes)
        if bundle.tokens:
            _run_ids(bundle, _read_input(args.input, args.key), args)
            return 0
        x = bundle.as_batch(_read_input(args.input, args.key))
        lengths = lengths_of(x)  # (B,) variable-length input runs at its true lengths
        if args.stream:
            y = run_ragged(x, lengths, lambda part: bundle.streamer(len(part)).run(
                part, normalized=args.normalized))  # (B, L, d_out)
            pooled = bundle.manifest["model"]["pooling"] == "mean"
            final = y[np.arange(len(y)), lengths - 1] if pooled else y
        else:
            y = final = run_ragged(x, lengths, lambda part: bundle.predict(
                part, normalized=args.normalized))
        _check_finite(final, x)
        _print_records(_describe(bundle, final, lengths), args.json, "sample")
        if args.output:
            _save(args.output, y)
    if args.stdin:
        stream = EdgeBundle(args.bundle, threads=args.threads, int8=args.int8,
                            modes=("step",)).streamer(1)
        t = 0
        for line in sys.stdin:
            if not line.strip():  # a blank line ends the sequence
                stream.reset()
                t = 0
                continue
            try:
                values = np.array(line.replace(",", " ").split(),
                                  dtype=np.int64 if stream.bundle.tokens else np.float32)
            except ValueError:
                raise BundleError(f"stdin line is not numbers: {line.strip()!r}") from None
            if stream.bundle.tokens:
                y = stream.push(values)  # one id per line
                rec = (_next_tokens(stream.bundle, y[:, None]) or
                       _describe(stream.bundle, y, np.ones(len(y), dtype=int)))[0]
                print(json.dumps({"token": t, **rec}) if args.json else
                      f"token {t}: " + ", ".join(f"{k}={v}" for k, v in rec.items()), flush=True)
                t += 1
                continue
            if values.size != stream.bundle.d_input:
                raise BundleError(f"each stdin line needs {stream.bundle.d_input} numbers, "
                                  f"got {values.size}: {line.strip()!r}")
            y = stream.push(values, normalized=args.normalized)
            rec = _describe(stream.bundle, y, np.ones(len(y), dtype=int))[0]
            print(json.dumps({"token": t, **rec}) if args.json else
                  f"token {t}: " + ", ".join(f"{k}={v}" for k, v in rec.items()), flush=True)
            t += 1
    if args.bench:
        if args.mode is None:
            files = load_manifest(args.bundle)["files"]
            modes = [m for m in MODES if f"onnx_{m}" in files]
        else:
            modes = [m.strip() for m in args.mode.split(",") if m.strip()]
        for mode in modes:
            r = measure_latency(args.bundle, mode, seq_len=args.seq_len, threads=args.threads,
                                min_time_s=args.min_time_s, int8=args.int8)
            if args.json:
                print(json.dumps(r))
            else:
                print(f"{mode}: p50 {r['p50_ms']:.4f}, p90 {r['p90_ms']:.4f}, p99 "
                      f"{r['p99_ms']:.4f} ({r['unit']}; {r['n_samples']} calls, threads="
                      f"{r['threads']}, batch 1{', int8' if args.int8 else ''})")
    return 0


def _check_output(path: str) -> None:
    """Refuse an --output the run could not write, before any work is done."""
    target = Path(path)
    if not target.name.endswith(".npy"):
        raise BundleError(f"--output must name a .npy file, got {path!r}")
    if target.is_dir():
        raise BundleError(f"--output {path} is a folder, not a file")
    folder = target.parent
    if not folder.is_dir():
        raise BundleError(f"--output: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise BundleError(f"--output: the folder {folder} is not writable")


def _save(path: str, y: np.ndarray) -> None:
    """Write ``y`` to ``path`` through a temporary file, so a failed write leaves no torn file."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, y)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BundleError(f"cannot write {path}: {exc.strerror or exc}") from None


def _check_finite(y: np.ndarray, x: np.ndarray) -> None:
    """Refuse to print results the model could not compute (outputs that overflowed)."""
    bad = ~np.isfinite(y).reshape(len(y), -1).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        peak = float(np.nanmax(np.abs(x[i])))
        raise BundleError(f"the model's output for sample {i} is not finite: its input reaches "
                          f"{peak:.3g} in magnitude, outside what the model computes in float32")


def _run_ids(bundle: EdgeBundle, data: np.ndarray, args: argparse.Namespace) -> None:
    """``--input ids.npy`` on a token bundle: per sequence the most likely next id."""
    ids = bundle.as_ids(data)  # (B, L)
    y = bundle.streamer(len(ids)).run(ids) if args.stream else bundle.predict(ids)
    records = _next_tokens(bundle, y)
    if records is None:  # a token classifier: classes as for float input
        final = y[:, -1] if (args.stream and bundle.manifest["model"]["pooling"] == "mean") else y
        records = _describe(bundle, final, np.full(len(ids), ids.shape[1]))
    _print_records(records, args.json, "sample")
    if args.output:
        _save(args.output, y)


def _run_text(args: argparse.Namespace) -> None:
    """``--text`` (with ``--generate N``) on a token bundle with a vocabulary."""
    stepwise = bool(args.generate) or args.stream
    bundle = EdgeBundle(args.bundle, threads=args.threads, int8=args.int8,
                        modes=("step",) if stepwise else ("sequence",))
    ids = bundle.text_ids(args.text)
    if not (bundle.manifest["model"].get("pooling") == "none"
            and bundle.d_output == bundle.vocab_size):
        raise BundleError("this bundle does not predict the next token (no per-step logits "
                          "over its vocabulary)")
    if args.generate:
        new = bundle.streamer(1).generate(ids, args.generate)
        text = bundle.decode(new)
        print(json.dumps({"text": args.text, "generated": text, "ids": new}) if args.json
              else args.text + text)
        return
    y = bundle.streamer(1).run(ids[None]) if stepwise else bundle.predict(ids[None])
    _print_records(_next_tokens(bundle, y), args.json, "text")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on a bundle or input error)."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except BundleError as exc:
        print(f"run.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
