"""In-training state truncation of selective (Mamba-style S6) models, several seeds.

Methods, per dataset and seed (every model: selective blocks, N=128 at the start):
  full              N=128 throughout
  compressm-tau     in-training truncation by data-driven state importance (the tau rule on
                    the importance sum), window 10%, cuts attempted every few steps
  scratch-tau       a model trained from scratch at the final widths of compressm-tau
  random/magnitude  compressm-tau's exact cut schedule (same steps, layers, ranks) replayed
                    keeping random states, or the slowest-decaying ones (smallest mean |A|)

Datasets: MNIST-1D, and selective copying (Gu & Dao 2023), where which tokens to keep depends
on the input: the task selectivity exists for. Runs, tables and the plot come from
``bench_compression.py``; this script only chooses the settings and jobs.
Output: bench_results/selective.{json,md,png}.

    python benchmarks/bench_selective.py [--seeds 3] [--workers 2] [--tau 0.1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_compression as bc  # noqa: E402
from _common import RESULTS, machine, write  # noqa: E402

SETTINGS = {
    "mnist1d": {"arch": "selective", "blocks": 2, "hidden": 32, "state": 128, "steps": 600,
                "batch": 64, "eval_every": 50, "reduce_every": 5},
    "selective-copy": {"arch": "selective", "blocks": 2, "hidden": 32, "state": 128,
                       "steps": 600, "batch": 64, "eval_every": 50, "reduce_every": 5},
}


def _jobs(datasets: list[str], seeds: list[int], taus: list[float]) -> list[dict]:
    return [{"dataset": d, "seed": seed, "method": method, "settings": SETTINGS[d], **extra}
            for d in datasets for seed in seeds
            for method, extra in [("full", {})] + [(f"compressm-{t}", {"tau": t}) for t in taus]]


def _jobs_phase2(first: list[dict], taus: list[float]) -> list[dict]:
    jobs = []
    for r in first:
        if "tau" not in r:
            continue
        base = {"dataset": r["dataset"], "seed": r["seed"], "settings": SETTINGS[r["dataset"]]}
        jobs.append({**base, "method": f"scratch-{r['tau']}", "dims": r["final_dims"]})
        if r["tau"] == max(taus):
            for select in ("random", "magnitude"):
                jobs.append({**base, "method": f"{select}-{r['tau']}", "schedule": r["cuts"],
                             "select": select})
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--datasets", default="mnist1d,selective-copy")
    ap.add_argument("--taus", default="0.1", help="comma-separated tau values")
    ap.add_argument("--steps", type=int, default=None, help="override the steps per run")
    ap.add_argument("--quick", action="store_true", help="40 steps: a smoke test of the script")
    args = ap.parse_args()
    for s in SETTINGS.values():
        if args.steps:
            s.update(steps=args.steps)
        if args.quick:
            s.update(steps=40, eval_every=10, reduce_every=2)
    datasets, seeds = args.datasets.split(","), list(range(args.seeds))
    taus = [float(t) for t in args.taus.split(",")]
    t0 = time.time()
    first = bc._pool_map(_jobs(datasets, seeds, taus), args.workers)
    results = first + bc._pool_map(_jobs_phase2(first, taus), args.workers)
    for r in results:
        r.pop("checkpoint", None)
        r.pop("settings", None)
    wall = time.time() - t0
    order = ["full", *[f"{m}-{t}" for t in taus for m in ("compressm", "scratch")],
             *[f"{m}-{max(taus)}" for m in ("random", "magnitude")]]
    md = [f"# Selective SSM: in-training state truncation ({args.seeds} seeds)", "",
          f"Machine: {machine()['cpu']}, {machine()['cores']} cores; one torch thread per run, "
          f"{args.workers} runs in parallel; wall time {wall / 60:.1f} min; 1-min load "
          f"{machine()['load_avg_1m']:.2f} at the end. Settings: `{json.dumps(SETTINGS)}`. Test "
          "metric at the best validation checkpoint of the final widths (selective-copy: "
          "per-token accuracy over the answer positions); train time excludes evaluation and "
          "includes reduction.", ""]
    for d in datasets:
        md += [f"## {d}", "", bc._table(results, d, order), ""]
    write("selective", {"machine": machine(), "settings": SETTINGS, "seeds": seeds,
                        "taus": taus, "wall_s": wall, "results": results}, "\n".join(md))
    bc._plot(results, RESULTS / "selective.png", order)
    print("\n".join(md))


if __name__ == "__main__":
    main()
