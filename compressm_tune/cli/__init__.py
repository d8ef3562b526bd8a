"""Command line: argument parsing only; every sub-command calls into the package.

Errors the user can cause are :class:`~compressm_tune.errors.CompressmError` subclasses; they
are printed as one line and exit with status 2 (an interrupt exits 130 and says how to resume).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from compressm_tune.errors import CompressmError

__all__ = ["main", "build_parser"]


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    from compressm_tune.training import DATASETS

    parser.add_argument("--dataset", default="mnist1d", choices=DATASETS,
                        help="built-in or user dataset (default: mnist1d)")
    parser.add_argument("--data", dest="data_path", default=None,
                        help="path of the .npz file for --dataset npz")
    parser.add_argument("--data-dir", default=None,
                        help="directory with MNIST IDX files for --dataset smnist")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of train held out for validation (default: 0.1)")


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    from compressm_tune._device import PRECISIONS

    parser.add_argument("--device", default="auto",
                        help="where training runs: auto (a CUDA GPU if there is one), cpu, "
                             "cuda or cuda:N (default: auto)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="on CUDA, launch every kernel of every step from Python instead "
                             "of replaying a captured graph (slower; for debugging)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="training arithmetic: fp32; tf32 (CUDA: float32 products on the "
                             "tensor cores); bf16 (autocast projections, scans in float32) "
                             "(default: fp32)")


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    from compressm_tune.models import ARCHS, SSMConfig
    from compressm_tune.reduction._policies import SELECTS, WEIGHTINGS
    from compressm_tune.training import TrainConfig
    from compressm_tune.training.reducer import MOMENT_POLICIES, SCHEDULES, ReduceConfig

    m, t, r = SSMConfig(), TrainConfig(), ReduceConfig()
    p = sub.add_parser("train", help="train an SSM network, optionally compressing it in training",
                       description="Train an SSM network; with --reduce, shrink its state "
                                   "widths during the first steps (LRU: balanced truncation; "
                                   "selective, mamba: data-driven state selection).")
    _add_data_args(p)
    p.add_argument("--arch", default=m.arch, choices=ARCHS,
                   help=f"SSM layer: lru (LTI, complex diagonal), selective (a bare S6 "
                        f"layer) or mamba (Mamba's block: expansion, conv, gate, S6) ({m.arch})")
    p.add_argument("--blocks", type=int, default=m.n_blocks, help=f"SSM blocks ({m.n_blocks})")
    p.add_argument("--hidden", type=int, default=m.d_model, help=f"H, model width ({m.d_model})")
    p.add_argument("--state-dim", type=int, default=m.state_dims[0],
                   help=f"N, initial state width of every block ({m.state_dims[0]})")
    p.add_argument("--dropout", type=float, default=None,
                   help="(0.1 for classification, 0 for regression: on a real-valued target "
                        "dropout's noise outweighs what is left to learn)")
    p.add_argument("--steps", type=int, default=t.steps, help=f"optimizer steps ({t.steps})")
    p.add_argument("--batch-size", type=int, default=t.batch_size, help=f"({t.batch_size})")
    p.add_argument("--lr", type=float, default=t.lr, help=f"peak learning rate ({t.lr})")
    p.add_argument("--ssm-lr-factor", type=float, default=t.ssm_lr_factor,
                   help=f"LR multiplier of the recurrence's parameters ({t.ssm_lr_factor})")
    p.add_argument("--weight-decay", type=float, default=t.weight_decay, help=f"({t.weight_decay})")
    p.add_argument("--warmup", dest="warmup_frac", type=float, default=t.warmup_frac,
                   help=f"share of steps in linear LR warm-up ({t.warmup_frac})")
    p.add_argument("--eval-every", type=int, default=t.eval_every, help=f"({t.eval_every})")
    p.add_argument("--seed", type=int, default=t.seed, help=f"({t.seed})")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    _add_device_args(p)
    p.add_argument("--reduce", default=None, metavar="SPEC",
                   help="in-training reduction policy: tau=0.04 (discard 4%% of the Hankel "
                        "singular value sum, or of the state importance sum for selective "
                        "layers), rank=16 or fraction=0.25; off by default")
    p.add_argument("--window", type=float, default=r.window,
                   help=f"share of steps in which cuts are attempted ({r.window})")
    p.add_argument("--reduce-every", type=int, default=None,
                   help="steps between cut attempts inside the window (default: every "
                        "evaluation)")
    p.add_argument("--schedule", default=r.schedule, choices=SCHEDULES,
                   help="when cuts happen inside the window: window (the paper's: a tau cut at "
                        "every attempt) or settle (cut when the spectrum's target width has "
                        "settled, toward that width; best measured with --weighting input; "
                        f"see README) ({r.schedule})")
    p.add_argument("--max-drop", type=float, default=r.max_drop,
                   help="roll back a cut that loses more validation accuracy (or relative "
                        f"loss) than this and freeze the layer ({r.max_drop}); regression: "
                        "0.1 (a young model's MSE rises a few percent at a cut, then recovers)")
    p.add_argument("--select", default=None, choices=SELECTS,
                   help="which states to keep (default: largest; others are ablations)")
    p.add_argument("--weighting", default=None, choices=WEIGHTINGS,
                   help="LRU layers: rank states by their own HSVs (none, the paper's) or by "
                        "HSVs weighted with the covariance of the layer's inputs on the "
                        "calibration sequences (input); default: none")
    p.add_argument("--moments", default=r.moments, choices=MOMENT_POLICIES,
                   help=f"Adam moments of a cut layer ({r.moments})")
    p.add_argument("--log-spectrum", action="store_true",
                   help="log every layer's HSVs at every evaluation and plot them "
                        "(OUT/hsv.png)")
    p.add_argument("--out", default="runs/train", help="run directory (default: runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from compressm_tune._table import markdown_table
    from compressm_tune.errors import ConfigError
    from compressm_tune.models import SSMConfig, dropout_for
    from compressm_tune.training import TrainConfig, Trainer, load_dataset

    data = load_dataset(args.dataset, path=args.data_path, data_dir=args.data_dir,
                        val_fraction=args.val_fraction, seed=args.seed)
    model_config = SSMConfig(
        arch=args.arch, d_input=data.d_input, d_output=data.d_output, d_model=args.hidden,
        state_dims=[args.state_dim] * args.blocks,
        dropout=dropout_for(data.task) if args.dropout is None else args.dropout,
        pooling=data.pooling,
    )
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        ssm_lr_factor=args.ssm_lr_factor, weight_decay=args.weight_decay,
        warmup_frac=args.warmup_frac, eval_every=args.eval_every, seed=args.seed,
        threads=args.threads, log_spectrum=args.log_spectrum, device=args.device,
        precision=args.precision, cuda_graphs=args.cuda_graphs,
    )
    if args.resume and not (Path(args.out) / "last.pt").is_file():
        raise ConfigError(f"--resume: there is no {Path(args.out) / 'last.pt'} to continue "
                          "from; run without --resume to start")
    trainer = Trainer(model_config, config, data, args.out, reducer=_reducer(args),
                      resume=args.resume, progress=not args.no_progress)
    s = trainer.fit()
    metric = "accuracy" if data.task == "classification" else "loss"
    print()
    print(markdown_table(
        ["dataset", "steps", "state dims", f"val best {metric}", f"test {metric} (best ckpt)",
         f"test {metric} (last)", "train time s"],
        [[s["dataset"], s["steps"], s["final_state_dims"],
          s["val_best"] if metric == "accuracy" else -s["val_best"],
          s["test_best"][metric], s["test_last"][metric], s["train_time_s"]]],
    ))
    if args.log_spectrum or args.reduce:
        from compressm_tune.training.plots import plot_hsv_trajectories, read_metrics

        records = read_metrics(Path(args.out) / "metrics.jsonl")
        plot = plot_hsv_trajectories(records, Path(args.out) / "hsv.png")
        print(f"HSV plot: {plot}" if plot else "HSV plot: none (no spectrum was logged)")
    print(f"\ncheckpoints, metrics.jsonl and summary.json in {args.out}")
    return 0


def _reducer(args: argparse.Namespace):
    from dataclasses import replace

    from compressm_tune.errors import ConfigError
    from compressm_tune.reduction import ReductionPolicy
    from compressm_tune.training.reducer import ReduceConfig, Reducer

    if args.reduce is None:
        return None
    policy = ReductionPolicy.parse(args.reduce)
    if int(args.window * args.steps) < 1:
        raise ConfigError(f"--reduce: the window ({args.window:g} of {args.steps} steps) holds "
                          "no step to cut at; raise --window or --steps")
    if args.select:
        policy = replace(policy, select=args.select)
    if args.weighting:
        policy = replace(policy, weighting=args.weighting)
    return Reducer(ReduceConfig(policy=policy, window=args.window, every=args.reduce_every,
                                max_drop=args.max_drop, moments=args.moments,
                                schedule=args.schedule))


def _add_tune_args(parser: argparse.ArgumentParser) -> None:
    from compressm_tune.models import ARCHS
    from compressm_tune.search import LATENCY_MODES, TuneConfig

    d = TuneConfig(budget_ms=1.0)
    g = parser.add_argument_group(
        "the budgeted job (no sub-command)",
        "search in-training reduction schedules for the most accurate model whose exported "
        "ONNX latency on this machine meets the budget; export it and measure it")
    g.add_argument("--budget-ms", type=float, help="per-sample latency budget in ms "
                   "(onnxruntime, batch 1; per sequence, or per token with --latency-mode step)")
    g.add_argument("--budget-mj", type=float, default=None, help="per-sample energy budget, mJ")
    g.add_argument("--latency-mode", choices=LATENCY_MODES, default=d.latency_mode)
    g.add_argument("--arch", choices=ARCHS, default=d.arch,
                   help=f"SSM layer of every trial: lru, selective or mamba ({d.arch})")
    _add_data_args(g)
    g.add_argument("--trials", type=int, default=d.trials, help=f"({d.trials})")
    g.add_argument("--steps", type=int, default=d.steps, help=f"steps per trial ({d.steps})")
    g.add_argument("--blocks", type=int, default=d.blocks, help=f"({d.blocks})")
    g.add_argument("--hidden", type=int, default=d.hidden, help=f"({d.hidden})")
    g.add_argument("--state-dims", default=",".join(map(str, d.state_dims)),
                   help="initial widths the search may start from "
                        f"({','.join(map(str, d.state_dims))})")
    g.add_argument("--profile", default=None, help="profile JSON (default: this device's, "
                   "cached or measured)")
    g.add_argument("--no-drift-check", dest="drift_check", action="store_false",
                   help="predict from the profile as stored: skip re-timing three of its "
                        "models and rescaling when this machine has drifted from it")
    g.add_argument("--storage", default=None, help="Optuna storage: SQLAlchemy URL or "
                   "journal:PATH (default: OUT/study.db); rerunning resumes the study")
    g.add_argument("--study", default=d.study, help=f"study name ({d.study})")
    g.add_argument("--out", default=d.out, help=f"run directory ({d.out})")
    g.add_argument("--seed", type=int, default=d.seed, help=f"({d.seed})")
    g.add_argument("--pareto", action="store_true",
                   help="multi-objective search (accuracy vs latency, NSGA-II)")
    g.add_argument("--threads", type=int, default=None, help="torch threads for training")
    _add_device_args(g)


def _widths(text: str) -> tuple[int, ...]:
    from compressm_tune.errors import ConfigError

    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise ConfigError(f"--state-dims must be comma-separated integers, got {text!r}") from None


def _tune(args: argparse.Namespace) -> int:
    from compressm_tune.search import TuneConfig, run_tune

    config = TuneConfig(
        budget_ms=args.budget_ms, budget_mj=args.budget_mj, latency_mode=args.latency_mode,
        arch=args.arch, dataset=args.dataset, data_path=args.data_path, data_dir=args.data_dir,
        val_fraction=args.val_fraction,
        trials=args.trials, steps=args.steps, blocks=args.blocks, hidden=args.hidden,
        state_dims=_widths(args.state_dims),
        profile=args.profile, drift_check=args.drift_check, storage=args.storage,
        study=args.study, out=args.out, seed=args.seed, pareto=args.pareto, threads=args.threads,
        device=args.device, precision=args.precision, cuda_graphs=args.cuda_graphs)
    summary = run_tune(config)
    if summary.get("finalized") is False:
        return 0  # another worker of the same study exports and reports (it said so)
    print()
    print(open(f"{config.out}/report.md").read().split("\n![")[0])
    print(f"run directory: {config.out} (model.onnx, model.ts, manifest.json, summary.json, "
          "report.md)")
    return 0 if summary["meets_budget"] else 1


def build_parser() -> argparse.ArgumentParser:
    """The full ``compressm-tune`` argument parser."""
    from compressm_tune.exporter import add_export_parser
    from compressm_tune.hardware import add_compare_parser, add_profile_parser

    parser = argparse.ArgumentParser(
        prog="compressm-tune",
        description="Compress state-space models while they train and ship them within a "
                    "latency/energy budget.")
    _add_tune_args(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(sub)
    add_export_parser(sub)
    add_profile_parser(sub)
    add_compare_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``compressm-tune`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None and args.budget_ms is not None:
        args.func = _tune
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    # SIGTERM (schedulers, `docker stop`) ends a run as Ctrl-C does: the running trial and
    # checkpoint bookkeeping finish through the same KeyboardInterrupt path
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args) or 0)
    except CompressmError as exc:
        print(f"compressm-tune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        how = ("rerun with --resume" if args.command == "train" else
               "rerun the same command: finished trials are kept" if args.command is None else
               "rerun the command")
        print(f"compressm-tune: interrupted; what was finished is saved ({how})",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
