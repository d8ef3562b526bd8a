"""Reduction schedules compared: today's default (``window``) against ``settle``, several seeds.

Methods, per dataset and seed (tau=0.04, window 10%, max-drop 0.02, moments reset):
  full     N=256 throughout, no reduction (the reference accuracy / MSE)
  window   the paper's schedule, today's default of ``train --reduce tau=0.04``: a tau cut at
           every evaluation inside the window (eval every 50 of 600 steps: one attempt, step 50)
  settle   cut when the target width (the fixed point of repeated tau cuts) has settled,
           checks spread over the same window (training/_settle.py)
  scratch  trained from scratch at settle's final widths, same seed: whether what settle
           loses against window is the cuts or the width itself
  scratch-quarter  from scratch at a quarter of window's final widths (the issue's target:
           >= 4x fewer states at <= 1 point lost): whether that width can hold the accuracy
           at all at these settings

Runs use the small settings of ``bench_compression.py`` (600 steps; MNIST-1D 2 blocks H=32,
lti-sysid 1 block H=16; N=256), one torch thread each, two in parallel, jobs interleaved by seed
so every method sees the same load. Output: bench_results/schedule.{json,md,png}.

    python benchmarks/bench_schedule.py [--seeds 3] [--workers 2] [--datasets mnist1d,lti-sysid]
        [--steps N] [--name schedule]
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

METHODS = ("full", "window", "settle", "scratch", "scratch-quarter")
TAU = 0.04


def _jobs(datasets: list[str], seeds: list[int]) -> list[dict]:
    jobs = []
    for seed in seeds:  # interleaved: every seed runs all methods on all datasets back to back
        for d in datasets:
            for method in METHODS[:3]:
                job = {"dataset": d, "seed": seed, "method": method}
                if method != "full":
                    job.update(tau=TAU, every=None, reduce_schedule=method)
                jobs.append(job)
    return jobs


def _table(results: list[dict], dataset: str) -> str:
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
        vs_window = [sum(by[("window", r["seed"])]["final_dims"]) / sum(r["final_dims"])
                     for r in sel if ("window", r["seed"]) in by]
        lost = [(r["test"] / by[("window", r["seed"])]["test"] - 1) * 100 if regression
                else (by[("window", r["seed"])]["test"] - r["test"]) * 100
                for r in sel if ("window", r["seed"]) in by]
        t = [r["train_time_s"] for r in sel]
        speed = [by[("full", r["seed"])]["train_time_s"] / r["train_time_s"]
                 for r in sel if ("full", r["seed"]) in by]
        m, sd = mean_std(test)
        out.append([
            method, f"{m:.4f} ± {sd:.4f}" if regression else f"{100 * m:.2f} ± {100 * sd:.2f}",
            "; ".join(",".join(map(str, r["final_dims"])) for r in sel),
            "{:.2f} ± {:.2f}x".format(*mean_std(vs_window)) if vs_window else "-",
            "{:+.2f} ± {:.2f}".format(*mean_std(lost)) if lost else "-",
            "{:.1f} ± {:.1f}".format(*mean_std(t)),
            "{:.2f} ± {:.2f}x".format(*mean_std(speed)) if speed else "-",
            "; ".join(str(len(r.get("cuts", []))) for r in sel),
            f"{mean_std(states)[0]:.0f}",
        ])
    metric = "test MSE" if regression else "test accuracy %"
    loss_col = "MSE change vs window % (paired)" if regression else "points lost vs window"
    return markdown_table(["schedule", f"{metric} (mean ± sd)", "final dims per seed",
                           "fewer states than window (paired)", loss_col, "train time s",
                           "speed-up vs full (paired)", "cuts per seed", "mean total states"],
                          out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--datasets", default="mnist1d,lti-sysid")
    ap.add_argument("--steps", type=int, default=None,
                    help="override the steps per run (evaluations stay 12 per run)")
    ap.add_argument("--name", default="schedule", help="bench_results/NAME.{json,md,png}")
    args = ap.parse_args()
    if args.steps:
        for s in SETTINGS.values():
            s.update(steps=args.steps, eval_every=max(1, args.steps // 12))
    datasets, seeds = args.datasets.split(","), list(range(args.seeds))
    load_before = os.getloadavg()[0]
    t0 = time.time()
    results = _pool_map(_jobs(datasets, seeds), args.workers)
    results += _pool_map([{"dataset": r["dataset"], "seed": r["seed"], "method": "scratch",
                           "dims": r["final_dims"]}
                          for r in results if r["method"] == "settle"]
                         + [{"dataset": r["dataset"], "seed": r["seed"],
                             "method": "scratch-quarter",
                             "dims": [max(1, n // 4) for n in r["final_dims"]]}
                            for r in results if r["method"] == "window"], args.workers)
    wall = time.time() - t0
    for r in results:
        r.pop("checkpoint", None)
    md = [f"# Reduction schedules: window (today's default) vs settle ({args.seeds} seeds)", "",
          f"Machine: {machine()['cpu']}, {machine()['cores']} cores, shared with other jobs "
          f"(1-min load {load_before:.1f} before, {os.getloadavg()[0]:.1f} after); one torch "
          f"thread per run, {args.workers} runs in parallel, jobs interleaved by seed; wall "
          f"time {wall / 60:.1f} min. Settings (smaller than the default `train`, to fit the "
          f"shared machine): `{SETTINGS}` with attempts as each schedule places them (no "
          f"reduce_every), tau={TAU}, window 10%, max-drop 0.02. Test metric at the best "
          "validation checkpoint of the final widths; train time excludes evaluation and "
          "includes reduction. Paired columns compare runs of the same seed.", ""]
    for d in datasets:
        md += [f"## {d}", "", _table(results, d), ""]
    write(args.name, {"machine": machine(), "settings": SETTINGS, "seeds": seeds, "tau": TAU,
                       "wall_s": wall, "results": results}, "\n".join(md))
    _plot(results, RESULTS / f"{args.name}.png", order=list(METHODS))
    print("\n".join(md))


if __name__ == "__main__":
    main()
