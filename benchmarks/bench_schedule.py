"""Reduction schedules compared: today's default (``window``) against ``settle``, several seeds.

Methods, per dataset and seed (tau=0.04, window 10%, max-drop 0.02, moments reset):
  full     N=256 throughout, no reduction (the reference accuracy / MSE)
  window   the paper's schedule, today's default of ``train --reduce tau=0.04``: a tau cut at
           every evaluation inside the window (eval every 50 of 600 steps: one attempt, step 50)
  settle   cut when the target width (the fixed point of repeated tau cuts) has settled,
           checks spread over the same window (compressm_tune/reduction/_schedules.py)
  settle-input   the same on input-weighted Hankel singular values (``weighting=input``)
  settle-input-drop0.1   (regression only) the same with max-drop 0.1 (a cut may raise the
           validation MSE by 10% before it is rolled back, instead of 2%)
  settle-input-window0.5   (regression only) settle-input with checks over the first half of
           training (``--window 0.5``) instead of the first 10%
  scratch  trained from scratch at settle's final widths, same seed: whether what settle
           loses against window is the cuts or the width itself
  scratch-quarter  from scratch at a quarter of window's final widths (the issue's target:
           >= 4x fewer states at <= 1 point lost): whether that width can hold the accuracy
           at all at these settings
  full-dropout0, full-dropout0.1   no reduction, dropout 0 or 0.1 (every other method uses
           ``train``'s default: 0.1 for classification, 0 for regression)

Runs use the small settings of ``bench_compression.py`` (600 steps; MNIST-1D 2 blocks H=32,
lti-sysid 1 block H=16; N=256) or, for the datasets named by ``--default-network``, the default
``train`` network and schedule (4 blocks, H=64, N=256, 1500 steps, batch 64, eval every 100);
one torch thread each, two in parallel, jobs interleaved by seed so every method sees the same
load. Output: bench_results/NAME.{json,md,png}.

    python benchmarks/bench_schedule.py [--seeds 3] [--workers 2] [--datasets mnist1d,lti-sysid]
        [--steps N] [--default-network mnist1d] [--methods full,window,settle]
        [--reference window] [--name schedule]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, mean_std, write  # noqa: E402
from bench_compression import SETTINGS, _plot, _pool_map  # noqa: E402

from compressm_tune._table import markdown_table  # noqa: E402

TAU = 0.04
_REDUCE = {"tau": TAU, "every": None}
TRAINED = {  # method -> the job's reduction settings (None: no reduction)
    "full": None,
    "window": {**_REDUCE, "reduce_schedule": "window"},
    "settle": {**_REDUCE, "reduce_schedule": "settle"},
    "settle-input": {**_REDUCE, "reduce_schedule": "settle", "weighting": "input"},
    "settle-input-drop0.1": {**_REDUCE, "reduce_schedule": "settle", "weighting": "input",
                             "max_drop": 0.1},
    "settle-input-window0.5": {**_REDUCE, "reduce_schedule": "settle", "weighting": "input",
                               "window": 0.5},
    # no reduction, dropout set (the others use `train`'s: 0.1 classification, 0 regression)
    "full-dropout0": {"dropout": 0.0},
    "full-dropout0.1": {"dropout": 0.1},
}
REGRESSION_ONLY = {"settle-input-drop0.1", "settle-input-window0.5"}
METHODS = (*TRAINED, "scratch", "scratch-quarter")
# the default `train` network and schedule (``--default-network``)
DEFAULT_NETWORK = {"blocks": 4, "hidden": 64, "state": 256, "steps": 1500, "batch": 64,
                   "eval_every": 100, "reduce_every": 5}


def _jobs(datasets: list[str], seeds: list[int], methods: list[str]) -> list[dict]:
    jobs = []
    for seed in seeds:  # interleaved: every seed runs all methods on all datasets back to back
        for d in datasets:
            for method in methods:
                if method not in TRAINED or (method in REGRESSION_ONLY and d != "lti-sysid"):
                    continue
                jobs.append({"dataset": d, "seed": seed, "method": method,
                             **(TRAINED[method] or {})})
    return jobs


def _table(results: list[dict], dataset: str, ref: str = "window") -> str:
    rows = [r for r in results if r["dataset"] == dataset]
    by = {(r["method"], r["seed"]): r for r in rows}
    regression = dataset == "lti-sysid"
    out = []
    for method in METHODS:
        sel = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seed"])
        if not sel:
            continue
        test = [r["test"] for r in sel]
        states = [sum(r["final_dims"]) for r in sel]
        vs_window = [sum(by[(ref, r["seed"])]["final_dims"]) / sum(r["final_dims"])
                     for r in sel if (ref, r["seed"]) in by]
        lost = [(r["test"] / by[(ref, r["seed"])]["test"] - 1) * 100 if regression
                else (by[(ref, r["seed"])]["test"] - r["test"]) * 100
                for r in sel if (ref, r["seed"]) in by]
        t = [r["train_time_s"] for r in sel]
        speed = [by[("full", r["seed"])]["train_time_s"] / r["train_time_s"]
                 for r in sel if ("full", r["seed"]) in by]
        m, sd = mean_std(test)
        out.append([
            method, f"{m:.3g} ± {sd:.2g}" if regression else f"{100 * m:.2f} ± {100 * sd:.2f}",
            "; ".join(",".join(map(str, r["final_dims"])) for r in sel),
            "{:.2f} ± {:.2f}x".format(*mean_std(vs_window)) if vs_window else "-",
            "{:+.2f} ± {:.2f}".format(*mean_std(lost)) if lost else "-",
            "{:.1f} ± {:.1f}".format(*mean_std(t)),
            "{:.2f} ± {:.2f}x".format(*mean_std(speed)) if speed else "-",
            "; ".join(str(len(r.get("cuts", []))) for r in sel),
            "; ".join(_rollbacks(r, regression) for r in sel),
            "; ".join(str(_best_step(r, regression)) for r in sel),
            f"{mean_std(states)[0]:.0f}",
        ])
    metric = "test MSE" if regression else "test accuracy %"
    loss_col = (f"MSE change vs {ref} % (paired)" if regression
                else f"points lost vs {ref} (paired)")
    return markdown_table(["method", f"{metric} (mean ± sd)", "final dims per seed",
                           f"fewer states than {ref} (paired)", loss_col, "train time s",
                           "speed-up vs full (paired)", "cuts per seed",
                           "rollbacks per seed (val change)", "best val at step, per seed",
                           "mean total states"], out)


def _rollbacks(run: dict, regression: bool) -> str:
    """A run's rolled-back cuts, each with the validation change it caused (MSE: relative)."""
    return ", ".join(
        f"layer {layer} {n}->{rank} at step {step} ("
        + (f"{(after / before - 1) * 100:+.1f}%" if regression
           else f"{(after - before) * 100:+.1f} pts") + ")"
        for step, layer, n, rank, before, after in run.get("rollbacks", [])) or "0"


def _best_step(run: dict, regression: bool) -> int | str:
    """The step of the best validation score (the checkpoint the test metric comes from)."""
    curve = run.get("val_curve")
    if not curve:
        return "-"
    pick = min if regression else max
    return pick(curve, key=lambda sv: sv[1])[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--datasets", default="mnist1d,lti-sysid")
    ap.add_argument("--steps", type=int, default=None,
                    help="override the steps per run of the small networks (evaluations stay "
                         "12 per run)")
    ap.add_argument("--default-network", default="",
                    help="datasets (comma-separated) run at the default train network")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated subset of {', '.join(METHODS)}")
    ap.add_argument("--reference", default="window",
                    help="the method the paired columns compare with (window)")
    ap.add_argument("--name", default="schedule", help="bench_results/NAME.{json,md,png}")
    args = ap.parse_args()
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        sys.exit(f"unknown --methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if args.reference not in METHODS:  # known but not run: the paired columns show "-"
        sys.exit(f"unknown --reference {args.reference!r}; choose from {', '.join(METHODS)}")
    if args.steps:
        for s in SETTINGS.values():
            s.update(steps=args.steps, eval_every=max(1, args.steps // 12))
    for d in filter(None, args.default_network.split(",")):
        SETTINGS[d] = dict(DEFAULT_NETWORK)
    datasets, seeds = args.datasets.split(","), list(range(args.seeds))
    load_before = os.getloadavg()[0]
    t0 = time.time()
    results = _pool_map(_jobs(datasets, seeds, methods), args.workers)
    results += _pool_map([{"dataset": r["dataset"], "seed": r["seed"], "method": "scratch",
                           "dims": r["final_dims"]}
                          for r in results if r["method"] == "settle" and "scratch" in methods]
                         + [{"dataset": r["dataset"], "seed": r["seed"],
                             "method": "scratch-quarter",
                             "dims": [max(1, n // 4) for n in r["final_dims"]]}
                            for r in results
                            if r["method"] == "window" and "scratch-quarter" in methods],
                         args.workers)
    wall = time.time() - t0
    for r in results:
        r.pop("checkpoint", None)
    md = [f"# Compared: {', '.join(methods)} ({args.seeds} seeds; paired columns vs "
          f"{args.reference})", "",
          f"Machine: {machine()['cpu']}, {machine()['cores']} cores, shared with other jobs "
          f"(1-min load {load_before:.1f} before, {os.getloadavg()[0]:.1f} after); one torch "
          f"thread per run, {args.workers} runs in parallel, jobs interleaved by seed; wall "
          f"time {wall / 60:.1f} min. Settings per dataset (the default `train` network is "
          f"{DEFAULT_NETWORK}; smaller ones fit the shared machine): "
          f"`{ {d: SETTINGS[d] for d in datasets} }` with attempts as each schedule places "
          f"them (no reduce_every), tau={TAU}, window 10%, max-drop 0.02 unless the method "
          "says otherwise; dropout as `train` sets it (0.1 for classification, 0 for "
          "regression) unless the settings name it. Test metric at the best "
          "validation checkpoint of the final widths; train time excludes evaluation and "
          "includes reduction. Paired columns compare runs of the same seed.", ""]
    for d in datasets:
        md += [f"## {d}", "", _table(results, d, args.reference), ""]
    write(args.name, {"machine": machine(), "settings": SETTINGS, "seeds": seeds, "tau": TAU,
                       "wall_s": wall, "results": results}, "\n".join(md))
    _plot(results, RESULTS / f"{args.name}.png", order=list(METHODS))
    print("\n".join(md))


if __name__ == "__main__":
    main()
