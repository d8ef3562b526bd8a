"""``compressm-tune export``: a checkpoint to a checked bundle (:func:`export_bundle`).

The exporter's options are keyword arguments of ``export_bundle``, not a config dataclass,
so its flags are written out here.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

from compressm_tune.cli._flags import constant

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``export CHECKPOINT --out DIR [--format] [--mode] [--opset] [--quantize] ...``."""
    opsets = constant("compressm_tune.exporter:SUPPORTED_OPSETS")
    default_opset = constant("compressm_tune.exporter:DEFAULT_OPSET")
    lo, hi = opsets[0], opsets[-1]
    p = sub.add_parser(
        "export", help="export a checkpoint to ONNX / TorchScript with a checked manifest",
        description="Write model.onnx (sequence), model_step.onnx (streaming), model.ts "
                    "(TorchScript), run.py (numpy + onnxruntime edge runner) and manifest.json, "
                    "after checking every engine against eager torch (max abs error).")
    p.add_argument("checkpoint", help="checkpoint written by `compressm-tune train` (e.g. "
                                      "runs/train/best.pt), or a local Hugging Face-style Mamba "
                                      "folder (config.json + model.safetensors, e.g. from "
                                      "`compressm-tune compress`)")
    p.add_argument("--out", default=None,
                   help="bundle folder (default: <checkpoint folder>/bundle; for a model folder "
                        "<folder>/bundle)")
    p.add_argument("--format", dest="formats", default="onnx,torchscript",
                   help="comma-separated: onnx, torchscript (default: both)")
    p.add_argument("--mode", dest="modes", default="sequence,step",
                   help="ONNX graphs, comma-separated: sequence, step (default: both)")
    p.add_argument("--opset", type=int, default=default_opset,
                   help=f"ONNX opset, {lo}..{hi} (default: {default_opset})")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="also write dynamically int8-quantized ONNX graphs and record their "
                        "size and test-split accuracy change")
    p.add_argument("--chunk", default="auto",
                   help="sequence graph: auto (time the candidates, keep the fastest), scan "
                        "(per-token Scan) or a chunk length T (default: auto)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch / onnxruntime intra-op threads for the checks (default: 1)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed absolute output error vs eager torch (default: 1e-4)")
    p.add_argument("--bench", action="store_true",
                   help="then measure onnxruntime latency (batch 1) and record it in the "
                        "manifest")
    p.add_argument("--min-time-s", type=float, default=1.0,
                   help="--bench: timed seconds per mode (default: 1.0)")
    p.set_defaults(func=run)
    return p


def _chunk_arg(text: str) -> int | str:
    """``--chunk``: "auto", "scan" or an integer (checked by ``export_bundle``)."""
    if text in ("auto", "scan"):
        return text
    try:
        return int(text)
    except ValueError:
        from compressm_tune.errors import ExportOptionError

        raise ExportOptionError(f"--chunk must be auto, scan or an integer >= 1, got "
                                f"{text!r}") from None


@contextlib.contextmanager
def _as_checkpoint(source: Path) -> Iterator[Path]:
    """A checkpoint path for ``source``: itself, or for a Hugging Face-style model folder a
    temporary checkpoint of the model it holds (removed afterwards)."""
    if not source.is_dir():
        yield source
        return
    if (source / "manifest.json").is_file() and not (source / "config.json").is_file():
        raise _bundle_given(source)
    from compressm_tune.models import from_hf_folder
    from compressm_tune.training import save_checkpoint

    model = from_hf_folder(source)
    with tempfile.TemporaryDirectory(prefix="compressm-export-") as tmp:
        path = Path(tmp) / f"{source.name or 'model'}.pt"
        save_checkpoint(path, model, source={"hf_folder": str(source.resolve())})
        yield path


def _bundle_given(folder: Path) -> Exception:
    """The one-line error for a bundle given where a checkpoint belongs: a bundle runs as it
    is (also one written by an older version), and re-exporting starts from its checkpoint."""
    import json

    from compressm_tune.errors import ExportOptionError

    try:
        origin = json.loads((folder / "manifest.json").read_text())["source"]["checkpoint"]
        origin = f" (its manifest names {origin})"
    except (OSError, ValueError, KeyError, TypeError):
        origin = ""
    return ExportOptionError(
        f"{folder} is an exported bundle, not a checkpoint: it runs as it is, whichever "
        f"version wrote it (python3 {folder / 'run.py'} --help); to export it again, give "
        f"the checkpoint it was written from{origin}")


def run(args: argparse.Namespace) -> int:
    """Export, print the bundle's files, parity and graph choice; time it with ``--bench``."""
    from compressm_tune._table import markdown_table
    from compressm_tune.exporter import DEFAULT_SEQ_LEN, export_bundle, measure_latency

    if args.bench and not 0 < args.min_time_s < math.inf:  # before anything is written
        from compressm_tune.errors import ExportOptionError

        raise ExportOptionError(f"--min-time-s must be > 0 and finite, got {args.min_time_s}")
    source = Path(args.checkpoint)
    out = Path(args.out) if args.out else (
        source if source.is_dir() else source.parent) / "bundle"
    with _as_checkpoint(source) as checkpoint:
        m = export_bundle(checkpoint, out, formats=args.formats, modes=args.modes,
                          opset=args.opset, quantize=args.quantize, threads=args.threads,
                          chunk=_chunk_arg(args.chunk), tolerance=args.tolerance)
    rows = [[e["path"], e["bytes"], e["sha256"][:12]] for e in m["files"].values()]
    print(markdown_table(["file", "bytes", "sha256"], rows))
    par = m["parity"]
    worst = par["worst"]
    print(f"\nstate dims {m['model']['state_dims']}, opset {m['opset']}; parity: "
          f"{len(par['checks'])} checks, max abs error {par['max_abs_error']:.3g} "
          f"(tolerance {par['tolerance']:g}; worst {worst['engine']} {worst['mode']} "
          f"batch={worst['batch']} length={worst['length']})")
    graph = m["sequence_graph"]
    print(f"sequence graph: {graph['variant']}"
          + (f" (T={graph['chunk']})" if graph["chunk"] else "") + f", {graph['chosen_by']}")
    q = m["quantization"]
    if q:
        acc = q["accuracy"]
        change = (f"{acc['metric']} {acc['float32'][acc['metric']]:.4g} -> "
                  f"{acc['int8'][acc['metric']]:.4g}" if "metric" in acc else acc["skipped"])
        print(f"int8: {q['size']['float32_bytes']} -> {q['size']['int8_bytes']} bytes; {change}")
    if args.bench and "onnx" in m["formats"]:
        # a checkpoint without its dataset (an imported model) records no training length:
        # time the length the export chose its graph and checked parity at
        seq_len = None if m["task"].get("seq_len") else DEFAULT_SEQ_LEN
        if seq_len:
            print(f"no training length recorded: latency timed on {seq_len}-token sequences")
        for mode in m["modes"]:
            r = measure_latency(out, mode, seq_len=seq_len, threads=args.threads,
                                min_time_s=args.min_time_s, record=True)
            print(f"latency {mode}: p50 {r['p50_ms']:.4f}, p90 {r['p90_ms']:.4f} "
                  f"({r['unit']}; threads={r['threads']}, batch 1)")
    print(f"\nbundle in {out} (copy the folder to a device; run: python3 run.py --bench)")
    return 0
