"""CompreSSM against its baselines on MNIST-1D and lti-sysid, several seeds.

Methods, per dataset and seed:
  full            N=256 throughout
  compressm-tau   in-training balanced truncation, tau in {0.01, 0.02, 0.04}, window 10%
  compressm-slice tau=0.04 with the paper's Adam-moment slicing instead of our reset
  scratch-tau     a model trained from scratch at the final widths of compressm-tau
  post-training   the full model's best checkpoint truncated to compressm-0.04's widths
                  (no fine-tune, and with a fine-tune of 10% of the steps)
  random/magnitude  compressm-0.04's exact cut schedule (same steps, layers, ranks) replayed
                  with random balanced states or the magnitude heuristic; no rollback

Every run uses one torch thread; two runs go in parallel on the two cores, so all methods see
the same conditions. Output: bench_results/compression.{json,md,png}.

    python benchmarks/bench_compression.py [--seeds 3] [--workers 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, mean_std, write  # noqa: E402

from compressm_tune.reduction import ReduceConfig, Reducer, SettleConfig  # noqa: E402

TAUS = (0.01, 0.02, 0.04)
SETTINGS = {  # small enough that ~70 runs fit in ~30 minutes on 2 cores
    "mnist1d": {"blocks": 2, "hidden": 32, "state": 256, "steps": 600, "batch": 64,
                "eval_every": 50, "reduce_every": 5},
    "lti-sysid": {"blocks": 1, "hidden": 16, "state": 256, "steps": 600, "batch": 32,
                  "eval_every": 50, "reduce_every": 5},
}


def _run(job: dict[str, Any]) -> dict[str, Any]:
    """One training run in a worker process (1 thread)."""
    import torch

    from compressm_tune.data import load_dataset
    from compressm_tune.models import SSMConfig, dropout_for
    from compressm_tune.reduction import ReductionPolicy, truncate_layer
    from compressm_tune.training import (
        TrainConfig,
        Trainer,
        evaluate,
        model_from_checkpoint,
    )
    torch.set_num_threads(1)
    s = job["settings"]
    data = load_dataset(job["dataset"], seed=job["seed"])
    dims = job.get("dims") or [s["state"]] * s["blocks"]
    mcfg = SSMConfig(arch=s.get("arch", "lru"), d_input=data.d_input, d_output=data.d_output,
                     d_model=s["hidden"], state_dims=dims, pooling=data.pooling,
                     dropout=job.get("dropout", s.get("dropout", dropout_for(data.task))))
    tcfg = TrainConfig(steps=s["steps"], batch_size=s["batch"], eval_every=s["eval_every"],
                       seed=job["seed"], threads=1)
    metric = "accuracy" if data.task == "classification" else "loss"
    out = Path(tempfile.mkdtemp(prefix="bench-"))
    reducer = None
    if "tau" in job:
        reducer = Reducer(ReduceConfig(policy=ReductionPolicy(
                                           "tau", job["tau"],
                                           weighting=job.get("weighting", "none")),
                                       every=job.get("every", s["reduce_every"]),
                                       moments=job.get("moments", "reset"),
                                       max_drop=job.get("max_drop", 0.02),
                                       window=job.get("window", 0.1),
                                       schedule=job.get("reduce_schedule", "window"),
                                       settle=SettleConfig(**job.get("settle", {}))))
    elif "schedule" in job:
        reducer = _Replay(job["schedule"], ReduceConfig(
            policy=ReductionPolicy("tau", 0.0, select=job["select"], seed=job["seed"]),
            every=s["reduce_every"], max_drop=float("inf")))
    result: dict[str, Any] = {k: v for k, v in job.items() if k not in ("schedule", "settings")}

    if job["method"] == "post-training":
        full = model_from_checkpoint(job["checkpoint"])
        for layer, rank in zip(full.ssm_layers(), job["target"], strict=True):
            truncate_layer(layer, rank)
        result["test_no_finetune"] = evaluate(full, data.x_test, data.y_test, data.task)[metric]
        ft = replace(tcfg, steps=max(1, s["steps"] // 10), lr=tcfg.lr * 0.3)
        summary = Trainer(mcfg, ft, data, out, model=full, progress=False).fit()
        result["train_time_s"] = job["full_time_s"] + summary["train_time_s"]
    else:
        summary = Trainer(mcfg, tcfg, data, out, reducer=reducer, progress=False).fit()
        result["train_time_s"] = summary["train_time_s"]
        result["checkpoint"] = str(out / "best.pt")
        result.update(_run_log(out / "metrics.jsonl", metric))
    result["test"] = summary["test_best"][metric]
    result["final_dims"] = summary["final_state_dims"]
    return result


def _run_log(metrics: Path, metric: str) -> dict[str, list]:
    """What a run's ``metrics.jsonl`` says: the cuts that stuck ``cuts`` [(step, layer, rank)],
    the cuts rolled back ``rollbacks`` [(step, layer, width, rank, val before, val after)], the
    validation curve ``val_curve`` [(step, val)], in ``metric``."""
    log: dict[str, list] = {"cuts": [], "rollbacks": [], "val_curve": []}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if "val" in rec:
            log["val_curve"].append([rec["step"], rec["val"][metric]])
        for layer in rec.get("reduction", []):
            if layer["action"] == "cut":
                log["cuts"].append([rec["step"], layer["layer"], layer["rank"]])
            elif layer["action"] == "rollback":
                log["rollbacks"].append([rec["step"], layer["layer"], layer["n"], layer["rank"],
                                         layer["val_before"][metric],
                                         layer["val_after"][metric]])
    return log


class _Replay(Reducer):
    """Cut exactly where and to what a recorded run cut, with another selection rule."""

    def __init__(self, schedule: list[list[int]], config: ReduceConfig) -> None:
        super().__init__(config)
        self.schedule = {(step, layer): rank for step, layer, rank in schedule}

    def plan(self, layer: int, hsv: Any, step: int) -> int | None:
        return self.schedule.get((step, layer))


def _jobs_phase1(datasets, seeds):
    jobs = []
    for d in datasets:
        for seed in seeds:
            jobs.append({"dataset": d, "seed": seed, "method": "full"})
            for tau in TAUS:
                jobs.append({"dataset": d, "seed": seed, "method": f"compressm-{tau}", "tau": tau})
            jobs.append({"dataset": d, "seed": seed, "method": "compressm-0.04-slice",
                         "tau": 0.04, "moments": "slice"})
    return jobs


def _jobs_phase2(first: list[dict[str, Any]]):
    by = {(r["dataset"], r["seed"], r["method"]): r for r in first}
    jobs = []
    for (d, seed, method), r in by.items():
        if method in {f"compressm-{t}" for t in TAUS}:
            jobs.append({"dataset": d, "seed": seed, "method": f"scratch-{method.split('-')[1]}",
                         "dims": r["final_dims"]})
        if method == "compressm-0.04":
            for select in ("random", "magnitude"):
                jobs.append({"dataset": d, "seed": seed, "method": f"{select}-0.04",
                             "schedule": r["cuts"], "select": select})
            full = by[(d, seed, "full")]
            jobs.append({"dataset": d, "seed": seed, "method": "post-training",
                         "checkpoint": full["checkpoint"], "target": r["final_dims"],
                         "full_time_s": full["train_time_s"]})
    return jobs


def _pool_map(jobs, workers):
    for job in jobs:
        job.setdefault("settings", SETTINGS.get(job["dataset"]))
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        results = []
        for i, r in enumerate(pool.imap_unordered(_run, jobs), 1):
            print(f"[{i}/{len(jobs)}] {r['dataset']} seed={r['seed']} {r['method']}: "
                  f"test={r['test']:.4f} dims={r['final_dims']} t={r['train_time_s']:.1f}s",
                  flush=True)
            results.append(r)
    return results


ORDER = ["full", "compressm-0.01", "compressm-0.02", "compressm-0.04", "compressm-0.04-slice",
         "scratch-0.01", "scratch-0.02", "scratch-0.04", "post-training", "random-0.04",
         "magnitude-0.04"]


def _table(results, dataset, order=ORDER):
    from compressm_tune._table import markdown_table

    rows = [r for r in results if r["dataset"] == dataset]
    full_time = {r["seed"]: r["train_time_s"] for r in rows if r["method"] == "full"}
    metric = "test MSE" if dataset == "lti-sysid" else "test accuracy"
    out_rows = []
    for method in order:
        sel = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seed"])
        if not sel:
            continue
        m, sd = mean_std([r["test"] for r in sel])
        t, tsd = mean_std([r["train_time_s"] for r in sel])
        speed = mean_std([full_time[r["seed"]] / r["train_time_s"] for r in sel])[0]
        extra = ""
        if method == "post-training":
            nm, nsd = mean_std([r["test_no_finetune"] for r in sel])
            extra = f" (no fine-tune: {nm:.4f} ± {nsd:.4f})"
        out_rows.append([method, f"{m:.4f} ± {sd:.4f}{extra}",
                         "; ".join(",".join(map(str, r["final_dims"])) for r in sel),
                         f"{t:.1f} ± {tsd:.1f}", f"{speed:.2f}x"])
    return markdown_table(["method", f"{metric} (mean ± sd)", "final dims per seed",
                           "train time s", "speed-up vs full"], out_rows)


def _plot(results, path, order=ORDER):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in results})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
    for ax, d in zip(axes[0], datasets, strict=True):
        for i, method in enumerate(order):
            sel = [r for r in results if r["dataset"] == d and r["method"] == method]
            if sel:
                ax.scatter([sum(r["final_dims"]) for r in sel], [r["test"] for r in sel],
                           label=method, s=24, color=plt.cm.tab20(i / len(order)),
                           marker="os^Dv<>"[i % 7])
        ax.set(xscale="log", xlabel="total state dims (sum over layers)",
               ylabel="test MSE" if d == "lti-sysid" else "test accuracy", title=d)
        if d == "lti-sysid":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--datasets", default="mnist1d,lti-sysid")
    ap.add_argument("--quick", action="store_true", help="60 steps: a smoke test of the script")
    args = ap.parse_args()
    if args.quick:
        for s in SETTINGS.values():
            s.update(steps=40, eval_every=10, reduce_every=2)
    datasets = args.datasets.split(",")
    seeds = list(range(args.seeds))
    t0 = time.time()
    first = _pool_map(_jobs_phase1(datasets, seeds), args.workers)
    second = _pool_map(_jobs_phase2(first), args.workers)
    results = first + second
    for r in results:
        r.pop("checkpoint", None)
    wall = time.time() - t0
    md = [f"# CompreSSM vs baselines ({args.seeds} seeds)", "",
          f"Machine: {machine()['cpu']}, {machine()['cores']} cores; one torch thread per run, "
          f"{args.workers} runs in parallel; wall time {wall / 60:.1f} min. Settings: "
          f"`{json.dumps(SETTINGS)}`. Test metric at the best validation checkpoint of the "
          "final widths; train time excludes evaluation and includes reduction.", ""]
    for d in datasets:
        md += [f"## {d}", "", _table(results, d), ""]
    write("compression", {"machine": machine(), "settings": SETTINGS, "seeds": seeds,
                          "wall_s": wall, "results": results}, "\n".join(md))
    _plot(results, RESULTS / "compression.png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
