"""The bundle's ``manifest.json``: writing it atomically, and checking a bundle against it.

The checks of the ONNX files are the edge runner's own (:mod:`._edge`, numpy + onnxruntime),
so the package and a device reject the same bundles; this module adds the TorchScript file and
turns the edge module's :class:`BundleError` into :class:`~compressm_tune.errors.ExportError`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import onnx

from compressm_tune._io import atomic_write
from compressm_tune.errors import ExportError
from compressm_tune.exporter import _edge
from compressm_tune.exporter._edge import MANIFEST, BundleError, EdgeBundle, sha256_file

__all__ = ["atomic_write_bytes", "file_entry", "io_spec", "load_bundle", "measure_latency",
           "verify_bundle", "write_manifest"]

_ONNX_KEYS = {"onnx_sequence": ("sequence", False), "onnx_step": ("step", False),
              "onnx_sequence_int8": ("sequence", True), "onnx_step_int8": ("step", True)}


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it onto ``path``."""
    # mode 0644: a bundle is meant to be copied and shared
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), mode)


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (pretty-printed, keys in insertion order)."""
    path = Path(bundle_dir) / MANIFEST
    atomic_write_bytes(path, (json.dumps(manifest, indent=2) + "\n").encode())
    return path


def io_spec(model: onnx.ModelProto) -> dict[str, list[dict]]:
    """Inputs and outputs of an ONNX graph: name, shape (int or symbolic name), dtype."""
    def spec(value) -> dict:
        dims = [d.dim_param if d.dim_param else int(d.dim_value)
                for d in value.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        return {"name": value.name, "shape": dims, "dtype": str(dtype)}

    return {"inputs": [spec(v) for v in model.graph.input],
            "outputs": [spec(v) for v in model.graph.output]}


def file_entry(path: Path, **extra: Any) -> dict[str, Any]:
    """Manifest entry of one written file: its name in the bundle, SHA-256, size, extras."""
    return {"path": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
            **extra}


def load_bundle(bundle_dir: str | Path, threads: int = 1, int8: bool = False,
                modes: tuple[str, ...] = ("sequence", "step")) -> EdgeBundle:
    """Open a bundle's ONNX graphs in onnxruntime after checking them against the manifest.

    Parameters
    ----------
    bundle_dir : str or Path
    threads : int
        onnxruntime intra-op threads.
    int8 : bool
        Open the int8-quantized graphs instead of the float32 ones.
    modes : tuple of {"sequence", "step"}

    Returns
    -------
    EdgeBundle
        ``predict(x)``, ``streamer(batch)``, ``normalize(raw)`` and the ``manifest``.

    Raises
    ------
    ExportError
        No manifest, a file missing or changed since export (SHA-256), inputs/outputs or state
        widths that differ from the manifest.
    """
    try:
        return EdgeBundle(bundle_dir, threads=threads, int8=int8, modes=tuple(modes))
    except BundleError as exc:
        raise ExportError(str(exc)) from None


def verify_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """Check every file the manifest lists; return the manifest.

    ONNX graphs are opened in onnxruntime and compared with the manifest (names, shapes, state
    widths, architecture); the TorchScript file is loaded with ``torch.jit.load`` and its
    ``state_dims`` and ``arch`` compared; every file's SHA-256 must match.

    Raises
    ------
    ExportError
        The first mismatch found, naming the file.
    """
    try:
        manifest = _edge.load_manifest(bundle_dir)
        for key in manifest["files"]:
            if key in _ONNX_KEYS:
                mode, int8 = _ONNX_KEYS[key]
                EdgeBundle(bundle_dir, threads=1, int8=int8, modes=(mode,))
            else:
                path = _edge.check_file(bundle_dir, manifest, key)
                if key == "torchscript":
                    _check_torchscript(path, manifest)
    except BundleError as exc:
        raise ExportError(str(exc)) from None
    return manifest


def _check_torchscript(path: Path, manifest: dict) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # TorchScript's deprecation
        warnings.simplefilter("ignore", category=DeprecationWarning)
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # torch raises RuntimeError and friends for bad archives
            raise BundleError(f"cannot load {path} with torch.jit.load: {exc}") from None
    dims = list(module.state_dims)
    if dims != list(manifest["model"]["state_dims"]):
        raise BundleError(f"{path.name} has state widths {dims} but the manifest says "
                          f"{manifest['model']['state_dims']}")
    arch, want = getattr(module, "arch", "lru"), manifest["model"].get("arch", "lru")
    if arch != want:
        raise BundleError(f"{path.name} holds a {arch!r} network but the manifest says {want!r}")
    chunk = str(getattr(module, "chunk", 0) or "scan")  # no chunk attribute: the Scan
    if chunk != _edge.manifest_chunk(manifest):
        raise BundleError(f"{path.name} has sequence graph {chunk!r} but the manifest's "
                          f"sequence_graph says {_edge.manifest_chunk(manifest)!r}; re-export")


def measure_latency(bundle_dir: str | Path, mode: str = "sequence", seq_len: int | None = None,
                    threads: int | None = None, min_time_s: float = 1.0, *, warmup: int = 5,
                    min_repeats: int = 20, int8: bool = False, record: bool = False
                    ) -> dict[str, Any]:
    """Latency of one sample (batch 1) of a bundle in onnxruntime with fixed threads.

    Parameters
    ----------
    bundle_dir : str or Path
    mode : {"sequence", "step"}
        ``sequence``: one ``model.onnx`` call on a sequence of ``seq_len`` tokens (default:
        the manifest's training length); ``step``: one ``model_step.onnx`` call (one token).
    seq_len : int, optional
    threads : int, optional
        onnxruntime intra-op threads (default 1); inter-op threads are 1.
    min_time_s : float
        Timed work per measurement, seconds (at least ``min_repeats`` calls).
    int8 : bool
        Time the quantized graph.
    record : bool
        Also store the result in the manifest under ``latency[<mode>]`` (``<mode>_int8``).

    Returns
    -------
    dict
        ``p50_ms``, ``p90_ms``, ``p99_ms``, ``mean_ms``, ``iqr_ms``, ``min_ms`` (milliseconds
        per sequence or per token), ``n_samples``, ``threads``, ``seq_len``, ``unit``,
        ``method`` (how it was measured) and ``machine`` (incl. the 1-minute load average).

    Raises
    ------
    ExportError
        The bundle fails its checks, or an argument is out of range.

    Examples
    --------
    >>> r = measure_latency("runs/best/bundle", mode="step", threads=1)  # doctest: +SKIP
    >>> r["p50_ms"] < 2.0  # doctest: +SKIP
    True
    """
    try:
        result = _edge.measure_latency(bundle_dir, mode, seq_len=seq_len, threads=threads,
                                       min_time_s=min_time_s, warmup=warmup,
                                       min_repeats=min_repeats, int8=int8)
        if record:
            manifest = _edge.load_manifest(bundle_dir)
            key = mode + ("_int8" if int8 else "")
            manifest.setdefault("latency", {})[key] = result
            write_manifest(Path(bundle_dir), manifest)
    except BundleError as exc:
        raise ExportError(str(exc)) from None
    return result
