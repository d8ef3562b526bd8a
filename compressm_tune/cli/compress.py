"""``compressm-tune compress``: cut a pretrained model folder's states, write a new folder.

Flags are :class:`~compressm_tune.search.CompressConfig`'s fields; the folder is a positional
argument and ``--out`` is required.
"""

from __future__ import annotations

import argparse

from compressm_tune.cli._flags import add_fields

__all__ = ["add_parser", "run"]

CONFIG = "compressm_tune.search:CompressConfig"
_FLAGS = ("data", "keep", "tau", "budget_ms", "budget", "score", "calibration",
          "eval_sequences", "finetune_steps", "finetune_reduce", "distill", "lr", "batch_size",
          "mamba2_scan", "seed", "profile", "threads")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``compress HF_DIR --out DIR (--keep R | --tau T | --budget-ms MS | --budget 0.3x)``."""
    p = sub.add_parser(
        "compress", help="compress a pretrained Hugging Face-style Mamba folder after training",
        description="Score every layer's states on calibration text (input-weighted), cut each "
                    "layer to its width (--keep, --tau, or the widths whose predicted latency "
                    "meets --budget-ms / --budget), optionally fine-tune, and write a Hugging "
                    "Face-style folder (config.json with per-layer state_sizes, "
                    "model.safetensors, compress_summary.json).")
    p.add_argument("model", metavar="HF_DIR",
                   help="local folder with config.json and model.safetensors (Mamba)")
    p.add_argument("--out", required=True, help="output folder (replaced if it holds only an "
                                                "earlier output)")
    add_fields(p, CONFIG, _FLAGS)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Compress, print the widths and bits per token before and after."""
    from compressm_tune._table import markdown_table
    from compressm_tune.search import CompressConfig, compress_folder

    config = CompressConfig(model=args.model, out=args.out,
                            **{name: getattr(args, name) for name in _FLAGS})
    s = compress_folder(config, progress=not (args.no_progress or args.quiet))
    metric = s["metric"]
    rows = [["before", s["before"]["state_dims"], s["before"][metric]],
            ["after the cut", s["after_cut"]["state_dims"], s["after_cut"][metric]]]
    if "after_finetune" in s:
        ft = s["after_finetune"]
        rows.append([f"after {ft['steps']} fine-tune steps", ft["state_dims"], ft[metric]])
    print(markdown_table(["model", "state dims", f"held-out {metric}"], rows))
    if "budget" in s:
        b = s["budget"]
        print(f"\nbudget {b['budget_ms']:.4g} ms: predicted {b['predicted_ms']:.4g} ms "
              f"(full model {b['predicted_full_ms']:.4g} ms)")
        for note in b["notes"]:
            print(f"note: {note}")
    print(f"\ncompressed model in {args.out} (config.json, model.safetensors, "
          "compress_summary.json)")
    return 0
