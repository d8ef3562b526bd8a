"""``export_bundle``: checkpoint -> verified ONNX / TorchScript bundle with ``manifest.json``.

Everything is written into a hidden staging folder inside ``out_dir`` and checked there (parity
runs on the written files, re-loaded); only then are the files renamed into ``out_dir`` and the
manifest written, last and atomically. A failed export leaves no manifest that could vouch for
half-written or unchecked files.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from compressm_tune import __version__
from compressm_tune._io import ensure_dir, require_space, why_unwritable
from compressm_tune.errors import CheckpointError, ExportOptionError, OutputError
from compressm_tune.exporter import _edge
from compressm_tune.exporter._edge import FORMAT, MANIFEST, VERSION
from compressm_tune.exporter._manifest import file_entry, io_spec, write_manifest
from compressm_tune.exporter._names import sequence_io_names, step_io_names, step_states
from compressm_tune.exporter._onnx import (
    DEFAULT_OPSET,
    QUANTIZE_CHOICES,
    build_sequence_model,
    build_step_model,
    check_opset,
    quantize_file,
)
from compressm_tune.exporter._parity import (
    data_inputs,
    default_lengths,
    evaluate_test_split,
    feed,
    gaussian_inputs,
    rebuild_dataset,
    run_parity,
    sequence_graph,
    stream_onnx,
    token_inputs,
)
from compressm_tune.exporter._torchscript import script_model
from compressm_tune.exporter._weights import extract_weights
from compressm_tune.training import file_sha256, load_checkpoint, model_from_checkpoint

__all__ = ["DEFAULT_SEQ_LEN", "FILE_NAMES", "FORMATS", "MODES", "export_bundle"]

FORMATS = ("onnx", "torchscript")
MODES = ("sequence", "step")
FILE_NAMES = {  # manifest key -> file name inside the bundle
    "onnx_sequence": "model.onnx", "onnx_step": "model_step.onnx", "torchscript": "model.ts",
    "onnx_sequence_int8": "model.int8.onnx", "onnx_step_int8": "model_step.int8.onnx",
    "runner": "run.py",
}
DEFAULT_SEQ_LEN = 64  # parity length when the checkpoint records no dataset



_STALE_STAGE_S = 3600  # an export's staging folder older than this was left by a killed one


def _remove_stale_stages(out_dir: Path) -> None:
    """Remove staging folders that interrupted exports left behind (a live export's folder
    is minutes old at most, so it is left alone)."""
    now = time.time()
    for stage in out_dir.glob(".export-*"):
        try:
            if stage.is_dir() and now - stage.stat().st_mtime > _STALE_STAGE_S:
                shutil.rmtree(stage, ignore_errors=True)
        except OSError:
            continue

def _choices(value: str | Iterable[str], allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ExportOptionError(f"{what} must be a non-empty subset of {allowed}, got {items}")
    return tuple(v for v in allowed if v in items)


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _load_model(checkpoint: Path):
    payload = load_checkpoint(checkpoint)  # CheckpointError on a missing/corrupt/foreign file
    model = model_from_checkpoint(payload).eval()
    bad = [n for n, p in model.state_dict().items() if not torch.isfinite(p).all()]
    if bad:
        raise CheckpointError(f"{checkpoint} holds non-finite values in {bad[:3]}")
    dataset = payload.get("dataset") or None
    if dataset is not None:  # a token model's dataset gives its ids one-hot: V channels
        d_in = model.config.vocab_size or model.config.d_input
        if dataset.get("d_input") != d_in or len(dataset.get("norm_mean", [])) != d_in or (
                len(dataset.get("norm_std", [])) != d_in):
            raise CheckpointError(
                f"{checkpoint}: its dataset entry (d_input={dataset.get('d_input')}, "
                f"{len(dataset.get('norm_mean', []))} means) does not fit the model's "
                f"d_input={d_in}")
        if not all(s > 0 and math.isfinite(s) for s in dataset["norm_std"]):
            raise CheckpointError(f"{checkpoint}: norm_std must be positive and finite")
    return payload, model, dataset


def _versions() -> dict[str, str]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"compressm_tune": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": version("onnxruntime"), "numpy": np.__version__,
            "python": platform.python_version()}


def _write_torchscript(weights, path: Path, chunk: int | None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # TorchScript is deprecated
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.jit.save(script_model(weights, chunk), str(path))


def _load_torchscript(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu")


def _quantize(stage: Path, modes: tuple[str, ...], files: dict, sessions: dict, *,
              dataset: dict | None, rebuilt: tuple, inputs, inputs_doc: str, seq_len: int,
              threads: int, seed: int, tokens: bool) -> dict[str, Any]:
    """int8 copies of the ONNX graphs; their size, output deviation and accuracy change."""
    report: dict[str, Any] = {"method": "onnxruntime.quantization.quantize_dynamic, weights "
                              "QInt8 per tensor, activations quantized at run time",
                              "files": {}}
    x = inputs(3, seq_len, torch.Generator().manual_seed(seed)).numpy()  # (3, L, d_input)
    q_sessions = {}
    for mode in modes:
        src, dst = stage / FILE_NAMES[f"onnx_{mode}"], stage / FILE_NAMES[f"onnx_{mode}_int8"]
        quantize_file(src, dst)
        q_sessions[mode] = _ort_session(dst, threads)
        if mode == "sequence":
            ref, got = (s.run(None, feed(s, x))[0] for s in (sessions[mode], q_sessions[mode]))
        else:
            ref, got = (stream_onnx(s, x) for s in (sessions[mode], q_sessions[mode]))
        report["files"][f"onnx_{mode}_int8"] = {
            "float32_bytes": src.stat().st_size, "int8_bytes": dst.stat().st_size,
            "size_ratio": dst.stat().st_size / src.stat().st_size,
            "max_abs_deviation_vs_float32": float(np.abs(got - ref).max()),
            "deviation_input": f"{inputs_doc}; batch 3, length {seq_len}",
        }
    f32 = sum(v["float32_bytes"] for v in report["files"].values())
    i8 = sum(v["int8_bytes"] for v in report["files"].values())
    report["size"] = {"float32_bytes": f32, "int8_bytes": i8, "ratio": i8 / f32,
                      "change_bytes": i8 - f32}
    if "sequence" in modes:
        ds = rebuilt[0]
        report["accuracy"] = evaluate_test_split(
            *rebuilt, dataset, sessions["sequence"], q_sessions["sequence"],
            x=_token_ids(ds.x_test).numpy() if tokens and ds is not None else None)
    else:
        report["accuracy"] = {"skipped": "measured with the sequence graph, not exported"}
    return report


def export_bundle(
    checkpoint: str | Path,
    out_dir: str | Path,
    formats: str | Iterable[str] = FORMATS,
    modes: str | Iterable[str] = MODES,
    opset: int = DEFAULT_OPSET,
    quantize: str | None = None,
    *,
    chunk: int | str | None = "auto",
    threads: int = 1,
    parity_lengths: Iterable[int] | None = None,
    parity_batches: Iterable[int] = (1, 3),
    tolerance: float = 1e-4,
    seed: int = 0,
) -> dict[str, Any]:
    """Export a checkpoint to a checked, self-describing bundle folder.

    Writes into ``out_dir``: ``model.onnx`` (sequence mode: ``x (batch, length, d_input)``,
    both dynamic), ``model_step.onnx`` (streaming: ``x_t`` and one state per block, plus the
    pooling state, in; ``y_t`` and the new states out), ``model.ts`` (TorchScript with
    ``forward``, ``step`` and ``allocate_state``; loads with ``torch.jit.load`` alone), with
    ``quantize="int8"`` also ``model.int8.onnx`` / ``model_step.int8.onnx``, ``run.py`` (the
    numpy + onnxruntime edge runner) and ``manifest.json`` (written last).

    Parameters
    ----------
    checkpoint : str or Path
        A checkpoint from ``save_checkpoint`` / ``Trainer`` (any per-layer widths).
    out_dir : str or Path
        Bundle folder, created if needed; files of an earlier export are replaced.
    formats : subset of {"onnx", "torchscript"}
        As a tuple or a comma-separated string.
    modes : subset of {"sequence", "step"}
        ONNX graphs to write (the TorchScript module always has both).
    opset : int
        ONNX opset, within :data:`SUPPORTED_OPSETS` (13..24, default 17).
    quantize : {None, "int8"}
        Add dynamically int8-quantized ONNX graphs; records size and accuracy change.
    chunk : "auto", "scan", None or int
        The sequence graph (ONNX and TorchScript): ``"auto"`` times the per-token Scan and
        every chunk length worth trying at the training length (batch 1, ``threads``) and
        keeps the fastest (:func:`~._parity.choose_chunk`); ``"scan"`` or ``None`` the
        per-token Scan; an integer T the chunked graph with chunks of T tokens (LRU and
        selective; a Mamba network always gets the per-token Scan).
        The manifest's ``sequence_graph`` records the choice and its timings.
    threads : int
        torch and onnxruntime intra-op threads during the checks.
    parity_lengths : iterable of int, optional
        Default: 1, the training length and ``max(2000, 4 * training length)``, and with a
        chunked sequence graph of chunk T also T-1, T and T+1.
    parity_batches : iterable of int
    tolerance : float
        Largest absolute output error any exported engine may show against eager torch.
    seed : int
        Seed of the parity inputs: test-split sequences of the checkpoint's dataset, drawn at
        random and laid end to end up to each length, when the dataset can be rebuilt here;
        else N(0, 1) in normalized space (the manifest's ``parity.inputs`` says which).

    Returns
    -------
    dict
        The manifest, as written to ``out_dir/manifest.json``.

    Raises
    ------
    CheckpointError
        The checkpoint is missing, corrupt, not ours, or inconsistent.
    ExportError
        An option is unsupported (:class:`ExportOptionError`, also a ``ValueError``), or an
        exported engine failed the parity check (nothing is written then).

    Examples
    --------
    >>> manifest = export_bundle("runs/train/best.pt", "runs/bundle")  # doctest: +SKIP
    >>> manifest["model"]["state_dims"], manifest["parity"]["max_abs_error"]  # doctest: +SKIP
    ([47, 12], 3.1e-07)
    """
    started = time.perf_counter()
    formats = _choices(formats, FORMATS, "formats")
    modes = _choices(modes, MODES, "modes")
    opset = check_opset(opset)
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ExportOptionError(f"quantize must be one of {QUANTIZE_CHOICES} or None, "
                                f"got {quantize=}")
    if quantize and "onnx" not in formats:
        raise ExportOptionError(
            "quantize='int8' quantizes the ONNX graphs; add 'onnx' to formats")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ExportOptionError(f"threads must be an integer >= 1, got {threads=}")
    if not 0 < tolerance < math.inf:  # inf would check nothing
        raise ExportOptionError(f"tolerance must be > 0 and finite, got {tolerance=}")
    if not (chunk in ("auto", "scan", None) or (
            isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1)):
        raise ExportOptionError(f"chunk must be 'auto', 'scan', None or an integer >= 1, "
                                f"got {chunk=}")
    checkpoint = Path(checkpoint)
    payload, model, dataset = _load_model(checkpoint)
    source_sha = file_sha256(checkpoint)  # the file just read (load_checkpoint checked it exists)
    seq_len = int((dataset or {}).get("seq_len") or DEFAULT_SEQ_LEN)
    lengths = tuple(sorted(set(parity_lengths))) if parity_lengths else default_lengths(seq_len)
    batches = tuple(sorted(set(parity_batches)))
    if min(lengths) < 1 or min(batches) < 1:
        raise ExportOptionError(f"parity lengths and batches must be >= 1, got {lengths} "
                                f"and {batches}")
    weights = extract_weights(model)
    graph = sequence_graph(weights, chunk, seq_len, threads, opset)
    if not parity_lengths and graph["chunk"]:  # also both sides of a chunk boundary
        lengths = tuple(sorted({*lengths, *(n for n in (graph["chunk"] - 1, graph["chunk"],
                                                       graph["chunk"] + 1) if n >= 1)}))
    train_seed = (payload.get("train_config") or {}).get("seed", 0)
    vocab = model.config.vocab_size
    rebuilt = rebuild_dataset(dataset, train_seed, vocab or model.config.d_input)
    ds = rebuilt[0]  # (ds, None) | (None, why)
    if ds is not None:  # real sequences keep long parity runs in the model's input range
        inputs = data_inputs(ds.x_test if vocab is None else _token_ids(ds.x_test))
        kind = "normalized" if vocab is None else "token ids"
        inputs_doc = (f"{ds.name} test-split sequences ({kind}), drawn at random and laid end "
                      "to end up to each length")
    elif vocab is not None:
        inputs = token_inputs(vocab)
        inputs_doc = f"token ids uniform in [0, {vocab}) ({rebuilt[1]})"
    else:
        inputs = gaussian_inputs(model.config.d_input)
        inputs_doc = f"N(0, 1) in normalized space ({rebuilt[1]})"
    created = not Path(out_dir).exists()
    out_dir = ensure_dir(out_dir)
    _remove_stale_stages(out_dir)
    n_files = len(modes) * (2 if quantize else 1) + ("torchscript" in formats)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    try:  # TorchScript's writer aborts the process on a full disk: check before writing
        require_space(out_dir, 4 * param_bytes * n_files + 8 * 2**20, "the bundle",
                      largest=4 * param_bytes + 2**20)
    except OutputError:
        if created:
            out_dir.rmdir()
        raise
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        files: dict[str, Any] = {}
        sessions: dict[str, Any] = {}
        with _torch_threads(threads):
            if "onnx" in formats:
                builders = {"sequence": lambda w, o: build_sequence_model(w, o, graph["chunk"]),
                            "step": build_step_model}
                for mode in modes:
                    key = f"onnx_{mode}"
                    proto = builders[mode](weights, opset)
                    path = stage / FILE_NAMES[key]
                    path.write_bytes(proto.SerializeToString())
                    files[key] = file_entry(path, opset=opset, **io_spec(proto))
                    sessions[mode] = _ort_session(path, threads)
            scripted = None
            if "torchscript" in formats:
                path = stage / FILE_NAMES["torchscript"]
                _write_torchscript(weights, path, graph["chunk"])
                scripted = _load_torchscript(path)
                files["torchscript"] = file_entry(path, **_torchscript_doc(weights))
            parity = run_parity(model, onnx_sequence=sessions.get("sequence"),
                                onnx_step=sessions.get("step"), torchscript=scripted,
                                lengths=lengths, batches=batches, tolerance=tolerance, seed=seed,
                                inputs=inputs, inputs_doc=inputs_doc)
            quant = None
            if quantize:
                quant = _quantize(
                    stage, modes, files, sessions, dataset=dataset, rebuilt=rebuilt,
                    inputs=inputs, inputs_doc=inputs_doc, seq_len=seq_len, threads=threads,
                    seed=seed, tokens=vocab is not None)
                for mode in modes:
                    key = f"onnx_{mode}_int8"
                    files[key] = file_entry(stage / FILE_NAMES[key], opset=opset,
                                            inputs=files[f"onnx_{mode}"]["inputs"],
                                            outputs=files[f"onnx_{mode}"]["outputs"])
        runner = stage / FILE_NAMES["runner"]
        runner.write_bytes(Path(_edge.__file__).read_bytes())
        runner.chmod(0o755)
        files["runner"] = file_entry(runner, needs="python3, numpy, onnxruntime")
        manifest = _manifest(checkpoint, source_sha, payload, model, weights, dataset, seq_len,
                             opset, formats, modes, files, parity, quant, started)
        manifest["sequence_graph"] = graph
        _install(stage, out_dir, files, manifest)
    except (OSError, RuntimeError) as exc:
        reason = why_unwritable(exc, out_dir)
        if reason is None:
            raise
        raise OutputError(f"cannot write the bundle in {out_dir}: {reason}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _token_ids(x: torch.Tensor) -> torch.Tensor:
    """A dataset's test inputs as token ids ``(n, L)`` int64: ids as they are, one-hot rows
    (the built-in token datasets, e.g. ``pystdlib-chars``) by their hot channel."""
    return x.long() if not x.is_floating_point() else x.argmax(-1)


def _torchscript_doc(weights) -> dict[str, Any]:
    y = "(batch, d_output)" if weights.pooling == "mean" else "(batch, length, d_output)"
    x, x_t = (("token ids (batch, length) int64", "token ids (batch,) int64") if weights.tokens
              else (f"x (batch, length, {weights.d_input}) normalized", "x_t (batch, d_input)"))
    return {"load": "torch.jit.load('model.ts')", "methods": {
        "forward": f"{x} -> y {y}",
        "allocate_state": "batch -> list of zero states (model.state_shapes: one tensor per "
                          "block; token bundles' model_step.onnx takes a Mamba block's as "
                          "two, see io.step.states)",
        "step": f"{x_t}, state -> (y_t (batch, d_output), new state)",
    }}


def _io_section(weights) -> dict[str, Any]:
    """The graphs' tensor names: token models use ``transformers``' (``input_ids`` ->
    ``logits``, the cache as ``past_*`` in and ``present_*`` out, a Mamba block's conv window
    and SSM state apart), feature models the bundle's own (``x`` -> ``y``, ``state_k``)."""
    x, y = sequence_io_names(weights)
    (x_t, *_), (y_t, *_) = step_io_names(weights)
    return {"names": "transformers" if weights.tokens else "compressm",
            "sequence": {"input": x, "output": y},
            "step": {"input": x_t, "output": y_t,
                     "states": [{"input": i, "output": o, "shape": shape}
                                for i, o, shape in step_states(weights)]}}


def _install(stage: Path, out_dir: Path, files: dict, manifest: dict) -> None:
    """Move the checked files into ``out_dir``; the manifest goes last."""
    (out_dir / MANIFEST).unlink(missing_ok=True)  # no manifest may describe a mixed folder
    for key, name in FILE_NAMES.items():
        if key in files:
            (stage / name).replace(out_dir / name)
        else:
            (out_dir / name).unlink(missing_ok=True)  # stale file of an earlier export
    write_manifest(out_dir, manifest)


_BLOCKS = {"lru": "LRU network ({} -> BatchNorm/LRU/GELU/GLU blocks",
           "selective": "selective SSM network ({} -> BatchNorm/S6/GELU/GLU blocks",
           "mamba": "Mamba network ({} -> RMSNorm/Mamba mixer blocks -> RMSNorm",
           "mamba2": "Mamba-2 network ({} -> RMSNorm/Mamba-2 mixer blocks -> RMSNorm"}


def _vocabulary(info: dict) -> dict | None:
    """The id -> character table of a byte-level text dataset (``pystdlib-chars``'s
    ``vocab_bytes``), which ``run.py --text`` encodes with and prints decoded."""
    if not isinstance(info.get("vocab_bytes"), list):
        return None
    return {"unit": "utf-8 byte", "bytes": info["vocab_bytes"],
            "unknown_id": info.get("unknown_id", len(info["vocab_bytes"])),
            "ids": "id i < unknown_id stands for byte bytes[i]; unknown_id for any other byte"}


def _input_section(config, vocabulary: dict | None) -> dict[str, Any]:
    """What the bundle's runner takes: float features, or token ids fed to an embedding
    (token models) or one-hot encoded by the runner (a float model trained on one-hot ids of
    a dataset with a vocabulary, e.g. ``pystdlib-chars``)."""
    if config.vocab_size is not None:
        return {"kind": "token_ids", "dtype": "int64", "shape": ["batch", "length"],
                "vocab_size": config.vocab_size, "encoding": "embedding"}
    if vocabulary is not None and vocabulary["unknown_id"] + 1 == config.d_input:
        return {"kind": "token_ids", "dtype": "int64", "shape": ["batch", "length"],
                "vocab_size": config.d_input, "encoding": "one-hot"}
    return {"kind": "features", "dtype": "float32",
            "shape": ["batch", "length", config.d_input]}


def _output_doc(config, task: str | None, inputs: dict) -> str:
    if config.pooling == "none" and config.d_output == inputs.get("vocab_size"):
        return "next-token logits over the vocabulary, per step"
    return "logits per class" if task == "classification" else "values"


def _manifest(checkpoint, source_sha, payload, model, weights, dataset, seq_len, opset, formats,
              modes, files, parity, quant, started) -> dict[str, Any]:
    config = model.config
    task = (dataset or {}).get("task")
    vocabulary = _vocabulary((dataset or {}).get("info") or {})
    mean = list((dataset or {}).get("norm_mean") or [0.0] * config.d_input)
    std = list((dataset or {}).get("norm_std") or [1.0] * config.d_input)
    normalization = {"mean": mean, "std": std, "formula": "x = (raw - mean) / std",
                     "per": "input channel",
                     "source": f"dataset {dataset['name']!r} train split" if dataset
                     else "identity: the checkpoint records no dataset"}
    encoder = "embedding" if weights.tokens else "encoder"
    inputs = _input_section(config, vocabulary)
    if config.vocab_size is not None:  # no mean/std: runners before token bundles refuse it
        normalization = {"kind": "none", "source": "token ids are looked up, not normalized"}
    return {
        "format": FORMAT,
        "version": VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"checkpoint": str(checkpoint.resolve()), "sha256": source_sha,
                   "step": payload.get("step")},
        "model": {"arch": weights.arch,
                  "architecture": f"{_BLOCKS[weights.arch].format(encoder)} -> "
                                  f"{'mean pool -> ' if config.pooling == 'mean' else ''}head)",
                  "d_input": config.d_input, "vocab_size": config.vocab_size,
                  "d_model": config.d_model, "d_output": config.d_output,
                  "n_blocks": config.n_blocks,
                  "state_dims": model.state_dims,
                  # streaming state per block (LRU (batch, N, 2), selective (batch, H, N),
                  # Mamba (batch, E, d_conv - 1 + N))
                  "state_shapes": [["batch", *shape] for shape in weights.state_shapes],
                  "pooling": config.pooling, "config": config.to_dict()},
        "task": {"task": task, "dataset": (dataset or {}).get("name"),
                 "n_classes": config.d_output if task == "classification" else None,
                 # the user's own label of each class id (npz data), printed by run.py
                 "labels": ((dataset or {}).get("info") or {}).get("labels"),
                 # variable-length input: trailing all-NaN steps are padding (run.py trims)
                 "padding": ((dataset or {}).get("info") or {}).get("padding"),
                 "seq_len": seq_len if dataset else None,
                 "vocabulary": vocabulary,
                 "output": _output_doc(config, task, inputs)},
        "input": inputs,
        "io": _io_section(weights),
        "normalization": normalization,
        "opset": opset if "onnx" in formats else None,
        "formats": list(formats),
        "modes": list(modes),
        "files": files,
        "parity": parity,
        "quantization": quant,
        "latency": {},
        "versions": _versions(),
        "export_time_s": round(time.perf_counter() - started, 3),
    }
