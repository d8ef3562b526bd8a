"""``compressm-tune train``: train one network, optionally reducing it while it trains.

Flags are generated from :class:`SSMConfig`, :class:`TrainConfig` and :class:`ReduceConfig`;
the adapters below cover what does not map one to one: ``--state-dim N --blocks K`` (one
width per block), ``--dropout`` (its default depends on the task) and ``--reduce SPEC``
(with ``--select``/``--weighting``, a reduction policy).

Under ``torchrun`` (``torchrun --nproc-per-node K --no-python compressm-tune train ...``)
every rank joins one process group (NCCL on GPUs, gloo on CPU) and trains its share of the
global batch (see :mod:`compressm_tune.training.distributed`); rank 0 writes the folder and
prints the result. A user error is printed by rank 0 alone (every rank meets the same one);
a lost rank is reported by every rank that survives it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compressm_tune.cli import tune
from compressm_tune.cli._flags import add_fields, constant, fields_of

__all__ = ["add_parser", "run"]

MODEL = "compressm_tune.models:SSMConfig"
TRAIN = "compressm_tune.training:TrainConfig"
REDUCE = "compressm_tune.reduction:ReduceConfig"
_TRAIN_FLAGS = ("steps", "batch_size", "lr", "ssm_lr_factor", "weight_decay", "warmup_frac",
                "eval_every", "seed", "threads", "dist_timeout")
_REDUCE_FLAGS = ("window", "every", "schedule", "max_drop")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``train`` to the sub-commands."""
    p = sub.add_parser("train", help="train an SSM network, optionally compressing it in training",
                       description="Train an SSM network; with --reduce, shrink its state "
                                   "widths during the first steps (LRU: balanced truncation; "
                                   "selective, mamba: data-driven state selection).")
    add_fields(p, tune.TUNE, tune.DATA)
    add_fields(p, MODEL, ("arch",))
    state_dims = fields_of(MODEL)["state_dims"].default
    p.add_argument("--blocks", type=int, default=len(state_dims),
                   help=f"SSM blocks (default: {len(state_dims)})")
    add_fields(p, MODEL, ("d_model",))
    add_fields(p, MODEL, ("head_dim", "n_groups"))
    p.add_argument("--state-dim", type=int, default=state_dims[0],
                   help=f"N, initial state width of every block (default: {state_dims[0]})")
    p.add_argument("--dropout", type=float, default=None,
                   help="(0.1 for classification, 0 for regression: on a real-valued target "
                        "dropout's noise outweighs what is left to learn)")
    add_fields(p, TRAIN, _TRAIN_FLAGS)
    add_fields(p, TRAIN, tune.DEVICE, defaults={"device": "auto"})
    p.add_argument("--reduce", default=None, metavar="SPEC",
                   help="in-training reduction policy: tau=0.04 (discard 4%% of the Hankel "
                        "singular value sum, or of the state importance sum for selective "
                        "layers), rank=16 or fraction=0.25; off by default")
    add_fields(p, REDUCE, _REDUCE_FLAGS)
    p.add_argument("--select", default=None,
                   choices=constant("compressm_tune.reduction:SELECTS"),
                   help="which states to keep (default: largest; others are ablations)")
    p.add_argument("--weighting", default=None,
                   choices=constant("compressm_tune.reduction:WEIGHTINGS"),
                   help="LRU layers: rank states by their own HSVs (none, the paper's) or by "
                        "HSVs weighted with the covariance of the layer's inputs on the "
                        "calibration sequences (input); default: input for the adaptive "
                        "schedule, none (the paper's) for the others")
    add_fields(p, REDUCE, ("moments",))
    add_fields(p, tune.ADAPTIVE, tune.ADAPTIVE_FLAGS)
    add_fields(p, TRAIN, ("mamba2_scan", "log_spectrum"))
    p.add_argument("--out", default="runs/train", help="run directory (default: runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Train, print the result table and, with a spectrum logged, plot it; under torchrun,
    in a process group left at the end."""
    from compressm_tune.errors import CompressmError, RankLostError
    from compressm_tune.training import distributed

    if not distributed.launched():
        return _train(args)
    try:
        args.device = distributed.init_from_env(args.device, args.dist_timeout)
        return _train(args)
    except CompressmError as exc:
        if distributed.current() is None or distributed.current().main or isinstance(
                exc, RankLostError):
            raise
        return 2  # rank 0 says it (the CLI's USER_ERROR)
    finally:
        distributed.teardown()


def _train(args: argparse.Namespace) -> int:
    from compressm_tune._table import markdown_table
    from compressm_tune.data import load_dataset
    from compressm_tune.errors import ConfigError
    from compressm_tune.models import SSMConfig, dropout_for
    from compressm_tune.training import TrainConfig, Trainer, distributed

    tune.check_data_flags(args)
    data = load_dataset(args.dataset, path=args.data_path, data_dir=args.data_dir,
                        val_fraction=args.val_fraction, seed=args.seed)
    model_config = SSMConfig(
        arch=args.arch, d_input=data.d_input, d_output=data.d_output, d_model=args.d_model,
        state_dims=[args.state_dim] * args.blocks, head_dim=args.head_dim,
        n_groups=args.n_groups,
        dropout=dropout_for(data.task) if args.dropout is None else args.dropout,
        pooling=data.pooling,
    )
    config = TrainConfig(**{name: getattr(args, name)
                            for name in (*_TRAIN_FLAGS, *tune.DEVICE, "mamba2_scan",
                                         "log_spectrum")})
    ranks = distributed.current()
    last = Path(args.out) / "last.pt"
    refusal = None
    if ranks is None or ranks.main:  # rank 0's folder is the run's
        if args.resume and not last.is_file():
            refusal = ConfigError(f"--resume: there is no {last} to continue from; run without "
                                  "--resume to start")
        elif not args.resume and last.is_file():  # starting afresh would overwrite that run
            refusal = ConfigError(f"{args.out} holds a run ({last}): add --resume to continue "
                                  "it, or choose another --out")
    if ranks is not None:
        distributed.unanimous(refusal, ranks)
    elif refusal is not None:
        raise refusal
    trainer = Trainer(model_config, config, data, args.out, reducer=_reducer(args),
                      resume=args.resume, progress=not (args.no_progress or args.quiet))
    s = trainer.fit()
    if not trainer.main:
        return 0
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
        from compressm_tune.training import plot_hsv_trajectories, read_metrics

        records = read_metrics(Path(args.out) / "metrics.jsonl")
        plot = plot_hsv_trajectories(records, Path(args.out) / "hsv.png")
        print(f"HSV plot: {plot}" if plot else "HSV plot: none (no spectrum was logged)")
    print(f"\ncheckpoints, metrics.jsonl and summary.json in {args.out}")
    return 0


def _reducer(args: argparse.Namespace):
    """``--reduce SPEC`` and its companions as a :class:`Reducer` (None without ``--reduce``)."""
    from dataclasses import replace

    from compressm_tune.errors import ConfigError
    from compressm_tune.reduction import ReduceConfig, Reducer, ReductionPolicy

    if args.reduce is None:
        return None
    policy = ReductionPolicy.parse(args.reduce)
    if not 0 < args.window <= 1:
        raise ConfigError(f"--window is a share of the steps: 0 < WINDOW <= 1, got {args.window}")
    if not args.max_drop >= 0:  # NaN too
        raise ConfigError(f"--max-drop must be >= 0 (inf: no safety net), got {args.max_drop}")
    if int(args.window * args.steps) < 1:
        raise ConfigError(f"--reduce: the window ({args.window:g} of {args.steps} steps) holds "
                          "no step to cut at; raise --window or --steps")
    if args.select:
        policy = replace(policy, select=args.select)
    weighting = args.weighting or ("input" if args.schedule == "adaptive" else None)
    if weighting:
        policy = replace(policy, weighting=weighting)
    return Reducer(ReduceConfig(policy=policy, moments=args.moments,
                                adaptive=tune.adaptive_config(args),
                                **{name: getattr(args, name) for name in _REDUCE_FLAGS}))
