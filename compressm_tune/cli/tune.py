"""The budgeted job (``compressm-tune --budget 0.4x`` or ``--budget-ms X``, no sub-command).

Its flags are :class:`~compressm_tune.search.TuneConfig`'s fields; the command line only
changes the default device to auto.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from compressm_tune.cli._flags import add_fields

__all__ = ["ADAPTIVE", "ADAPTIVE_FLAGS", "BUDGET_MISSED", "adaptive_config", "add_tune_args",
           "check_data_flags", "pinned", "run"]

TUNE = "compressm_tune.search:TuneConfig"
ADAPTIVE = "compressm_tune.reduction:AdaptiveConfig"
ADAPTIVE_FLAGS = ("checks", "noise", "span", "by", "latest", "recover")  # the adaptive schedule's
BUDGET_MISSED = 3  # exit status when no model meets the budget as measured
DATA = ("dataset", "data_path", "data_dir", "val_fraction")
DEVICE = ("device", "cuda_graphs", "precision")
_FLAGS = ("budget", "budget_ms", "budget_mj", "latency_mode", "arch", *DATA, "trials", "steps",
          "blocks", "hidden", "state_dims", "baseline", "profile", "drift_check", "storage",
          "artifacts", "study", "workers", "out", "seed", "pareto", "threads", *DEVICE,
          "mamba2_scan")


def add_tune_args(parser: argparse.ArgumentParser) -> None:
    """The job's flags, as a group of the top-level parser."""
    group = parser.add_argument_group(
        "the budgeted job (no sub-command)",
        "search in-training reduction schedules for the most accurate model whose exported "
        "ONNX latency on this machine meets the budget; export it and measure it")
    add_fields(group, TUNE, _FLAGS, defaults={"budget_ms": None, "device": "auto"})
    add_fields(group, ADAPTIVE, ADAPTIVE_FLAGS)


def adaptive_config(args: argparse.Namespace):
    """The adaptive schedule's settings from their flags (an ``AdaptiveConfig``)."""
    from compressm_tune.reduction import AdaptiveConfig

    return AdaptiveConfig(**{name: getattr(args, name) for name in ADAPTIVE_FLAGS})


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
    config = TuneConfig(**{name: getattr(args, name) for name in _FLAGS},
                        adaptive=adaptive_config(args))
    if config.workers > 1:
        return _run_workers(args.argv, config.workers, config.device)
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


def pinned(workers: int, device: str, gpus: int, visible: str | None) -> list[dict[str, str]]:
    """The environment each of ``workers`` local workers adds to this one's: with ``gpus``
    CUDA devices (and a ``device`` that may use them) one ``CUDA_VISIBLE_DEVICES`` entry each,
    round-robin over the devices this process sees (``visible``, its own setting, or
    0..gpus-1); nothing on CPU."""
    if gpus < 1 or device == "cpu":
        return [{} for _ in range(workers)]
    ids = [d.strip() for d in visible.split(",")][:gpus] if visible else [
        str(i) for i in range(gpus)]
    return [{"CUDA_VISIBLE_DEVICES": ids[i % len(ids)]} for i in range(workers)]


def _run_workers(argv: list[str], workers: int, device: str) -> int:
    """Run the same command as ``workers`` processes of one worker each (pinned by
    :func:`pinned`) and wait for all; the exit status is the highest of theirs (0 when
    every worker finished and the finalizer's model meets the budget)."""
    import torch

    envs = pinned(workers, device, torch.cuda.device_count(),
                  os.environ.get("CUDA_VISIBLE_DEVICES"))
    command = [sys.executable, "-m", "compressm_tune.cli", *argv, "--workers", "1"]
    procs = [subprocess.Popen(command, env={**os.environ, **env}) for env in envs]
    try:
        return max(p.wait() for p in procs)
    finally:  # an interrupt reached them too (one process group); wait for their bookkeeping
        for p in procs:
            p.wait()
