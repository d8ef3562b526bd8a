"""The budgeted job (``compressm-tune --budget 0.4x`` or ``--budget-ms X``, no sub-command).

Its flags are :class:`~compressm_tune.search.TuneConfig`'s fields; the command line only
changes the default device to auto.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compressm_tune.cli._flags import add_fields

__all__ = ["BUDGET_MISSED", "add_tune_args", "check_data_flags", "run"]

TUNE = "compressm_tune.search:TuneConfig"
BUDGET_MISSED = 3  # exit status when no model meets the budget as measured
DATA = ("dataset", "data_path", "data_dir", "val_fraction")
DEVICE = ("device", "cuda_graphs", "precision")
_FLAGS = ("budget", "budget_ms", "budget_mj", "latency_mode", "arch", *DATA, "trials", "steps",
          "blocks", "hidden", "state_dims", "baseline", "profile", "drift_check", "storage",
          "study", "out", "seed", "pareto", "threads", *DEVICE)


def add_tune_args(parser: argparse.ArgumentParser) -> None:
    """The job's flags, as a group of the top-level parser."""
    group = parser.add_argument_group(
        "the budgeted job (no sub-command)",
        "search in-training reduction schedules for the most accurate model whose exported "
        "ONNX latency on this machine meets the budget; export it and measure it")
    add_fields(group, TUNE, _FLAGS, defaults={"budget_ms": None, "device": "auto"})


def check_data_flags(args: argparse.Namespace) -> None:
    """``--data`` and ``--data-dir`` belong to one dataset each; say so in flags (the data
    package names its own parameters)."""
    from compressm_tune.errors import ConfigError

    for flag, name, owner in (("--data", "data_path", "npz"), ("--data-dir", "data_dir", "smnist")):
        if getattr(args, name) is not None and args.dataset != owner:
            raise ConfigError(f"{flag} is only used with --dataset {owner}, not "
                              f"--dataset {args.dataset}")


def run(args: argparse.Namespace) -> int:
    """Run the job; 0 when the chosen model meets the budget as measured, else 3."""
    from compressm_tune.errors import ConfigError
    from compressm_tune.search import TuneConfig, run_tune

    check_data_flags(args)
    for name in ("last.pt", "metrics.jsonl"):  # the job would overwrite its summary.json
        if (Path(args.out) / name).is_file():
            raise ConfigError(f"--out {args.out} holds a training run ({name}); choose another "
                              "folder for the job")
    config = TuneConfig(**{name: getattr(args, name) for name in _FLAGS})
    if args.quiet:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no study-created line
    summary = run_tune(config, progress=not args.quiet)
    if summary.get("finalized") is False:
        return 0  # another worker of the same study exports and reports (it said so)
    print()
    print(open(f"{config.out}/report.md").read().split("\n![")[0])
    print(f"run directory: {config.out} (model.onnx, model.ts, manifest.json, summary.json, "
          "report.md)")
    return 0 if summary["meets_budget"] else BUDGET_MISSED
