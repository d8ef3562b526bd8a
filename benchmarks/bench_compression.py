"""In-training compression against its baselines: seeds x methods x datasets, one thread per run.

``--mode baselines`` (-> compression.*): MNIST-1D and lti-sysid, LRU N=256: full; compressm-tau
(window 10%); compressm-0.04-slice (Adam moments sliced, not reset); scratch-tau (trained from
scratch at compressm-tau's final widths); post-training (the full model truncated to
compressm-0.04's widths, with and without a short fine-tune); random/magnitude-0.04 (the same
cut schedule replayed with another state selection). ``schedule`` (-> schedule.*): the
reduction schedules, dropout variants and scratch at settle's / a quarter of window's widths,
paired against ``--reference``. ``selective`` (-> selective.*): the selective layer (N=128) on
MNIST-1D and selective-copy. ``mamba`` (-> mamba_mnist1d[_STEPS].*): the Mamba block (N=16)
against the LRU (N=256). ``lm`` (-> mamba_lm.*): character-level LM on the stdlib's sources
(``pystdlib-chars``, 2 blocks H=64, 1000 steps) per ``--arch``: full, compressed (tau every 10
steps), settle (input-weighted) and scratch at compressed's widths, metric bits/char. Small
networks (2 blocks H=32; lti-sysid 1 block H=16; 600 steps);
``--default-network`` runs the default ``train`` network. Test metric at the best validation
checkpoint of the final widths; train time excludes evaluation and includes reduction.

    python benchmarks/bench_compression.py [--mode baselines] [--seeds 3] [--workers 2]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402,I001
    float_list, machine, machine_line, mean_std, parser, pool_map, states_vs_test, write,
)

from compressm_tune.reduction import ReduceConfig, Reducer, SettleConfig  # noqa: E402

SMALL = {"blocks": 2, "hidden": 32, "state": 256, "steps": 600, "batch": 64, "eval_every": 50,
         "reduce_every": 5}
SETTINGS = {"mnist1d": SMALL, "lti-sysid": {**SMALL, "blocks": 1, "hidden": 16, "batch": 32},
            "selective-copy": {**SMALL, "arch": "selective", "state": 128},
            "pystdlib-chars": {"blocks": 2, "hidden": 64, "steps": 1000, "batch": 32, "lr": 3e-3,
                               "eval_every": 100, "reduce_every": 10}}
LM_STATE = {"lru": 64, "selective": 16, "mamba": 16}  # lm mode: starting width per layer
DEFAULT_NETWORK = {"blocks": 4, "hidden": 64, "state": 256, "steps": 1500, "batch": 64,
                   "eval_every": 100, "reduce_every": 5}
MODES = {"baselines": ("compression", "mnist1d,lti-sysid", "0.01,0.02,0.04", 3),
         "schedule": ("schedule", "mnist1d,lti-sysid", "0.04", 3),
         "selective": ("selective", "mnist1d,selective-copy", "0.1", 3),
         "mamba": ("mamba_mnist1d", "mnist1d", "0.1", 2),
         "lm": ("mamba_lm", "pystdlib-chars", "0.04", 3)}

# schedule mode: method -> the job's reduction settings (None: no reduction)
_SCHED = {"every": None}
TRAINED = {
    "full": None,
    "window": {**_SCHED, "reduce_schedule": "window"},
    "settle": {**_SCHED, "reduce_schedule": "settle"},
    "settle-input": {**_SCHED, "reduce_schedule": "settle", "weighting": "input"},
    "settle-input-drop0.1": {**_SCHED, "reduce_schedule": "settle", "weighting": "input",
                             "max_drop": 0.1},
    "settle-input-window0.5": {**_SCHED, "reduce_schedule": "settle", "weighting": "input",
                               "window": 0.5},
    "full-dropout0": {"dropout": 0.0},  # the others use `train`'s dropout for the task
    "full-dropout0.1": {"dropout": 0.1},
}
REGRESSION_ONLY = {"settle-input-drop0.1", "settle-input-window0.5"}
SCHEDULE_METHODS = (*TRAINED, "scratch", "scratch-quarter")


def _run(job: dict[str, Any]) -> dict[str, Any]:
    """One training run in a worker process (1 thread)."""
    import torch

    from compressm_tune.data import load_dataset
    from compressm_tune.models import SSMConfig, dropout_for
    from compressm_tune.reduction import ReductionPolicy, truncate_layer
    from compressm_tune.training import TrainConfig, Trainer, evaluate, model_from_checkpoint

    torch.set_num_threads(1)
    s = job["settings"]
    data = load_dataset(job["dataset"], seed=job["seed"])
    mcfg = SSMConfig(arch=s.get("arch", "lru"), d_input=data.d_input, d_output=data.d_output,
                     d_model=s["hidden"], state_dims=job.get("dims") or [s["state"]] * s["blocks"],
                     pooling=data.pooling,
                     dropout=job.get("dropout", s.get("dropout", dropout_for(data.task))))
    tcfg = TrainConfig(steps=s["steps"], batch_size=s["batch"], eval_every=s["eval_every"],
                       seed=job["seed"], threads=1, **({"lr": s["lr"]} if "lr" in s else {}))
    metric = data.info.get("bits_name") or ("accuracy" if data.task == "classification"
                                             else "loss")
    out = Path(tempfile.mkdtemp(prefix="bench-"))
    reducer = None
    if "tau" in job:
        reducer = Reducer(ReduceConfig(
            policy=ReductionPolicy("tau", job["tau"], weighting=job.get("weighting", "none")),
            every=job.get("every", s["reduce_every"]), moments=job.get("moments", "reset"),
            max_drop=job.get("max_drop", 0.02), window=job.get("window", 0.1),
            schedule=job.get("reduce_schedule", "window"), settle=SettleConfig()))
    elif "schedule" in job:
        reducer = _Replay(job["schedule"], ReduceConfig(
            policy=ReductionPolicy("tau", 0.0, select=job["select"], seed=job["seed"]),
            every=s["reduce_every"], max_drop=float("inf"), schedule="window"))
    result = {k: v for k, v in job.items() if k not in ("schedule", "settings")}
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
    result["test"] = result[f"test_{metric}"] = summary["test_best"][metric]
    result["final_dims"] = summary["final_state_dims"]
    return result


def _run_log(metrics: Path, metric: str) -> dict[str, list]:
    """A run's cuts [(step, layer, rank)], rolled-back cuts [(step, layer, width, rank, val
    before, val after)] and validation curve [(step, val)], from its ``metrics.jsonl``."""
    log: dict[str, list] = {"cuts": [], "rollbacks": [], "val_curve": []}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if "val" in rec:
            log["val_curve"].append([rec["step"], rec["val"][metric]])
        for c in rec.get("reduction", []):
            if c["action"] == "cut":
                log["cuts"].append([rec["step"], c["layer"], c["rank"]])
            elif c["action"] == "rollback":
                log["rollbacks"].append([rec["step"], c["layer"], c["n"], c["rank"],
                                         c["val_before"][metric], c["val_after"][metric]])
    return log


class _Replay(Reducer):
    """Cut exactly where and to what a recorded run cut, with another selection rule."""

    def __init__(self, schedule: list[list[int]], config: ReduceConfig) -> None:
        super().__init__(config)
        self.schedule = {(step, layer): rank for step, layer, rank in schedule}

    def plan(self, layer: int, hsv: Any, step: int) -> int | None:
        return self.schedule.get((step, layer))


def _job(d: str, seed: int, method: str, **extra) -> dict[str, Any]:
    return {"dataset": d, "seed": seed, "method": method, "settings": SETTINGS[d], **extra}


def _first_jobs(mode: str, datasets, seeds, taus, methods) -> list[dict]:
    if mode == "schedule":  # interleaved: every seed runs all methods back to back
        return [_job(d, seed, m, **({"tau": taus[0], **TRAINED[m]} if TRAINED[m] and
                                    "dropout" not in TRAINED[m] else TRAINED[m] or {}))
                for seed in seeds for d in datasets for m in methods
                if m in TRAINED and (m not in REGRESSION_ONLY or d == "lti-sysid")]
    if mode == "lm":  # compressed, full, settle per seed back to back; scratch follows
        s = SETTINGS["pystdlib-chars"]
        return [{"dataset": datasets[0], "seed": seed, "method": m, "variant": m, "arch": arch,
                 "settings": {**s, "arch": arch, "state": LM_STATE[arch]}, **extra}
                for arch in methods for seed in seeds for m, extra in (
                    ("compressed", {"tau": taus[0], "every": s["reduce_every"]}), ("full", {}),
                    ("settle", {"tau": taus[0], "every": None, "reduce_schedule": "settle",
                                "weighting": "input"}))]
    if mode == "mamba":
        lru = {**SETTINGS["mnist1d"], "arch": "lru"}
        mamba = {**SETTINGS["mnist1d"], "arch": "mamba", "state": 16}
        return [{"dataset": "mnist1d", "seed": seed, "method": m, "settings": s, **extra}
                for seed in seeds for m, s, extra in
                [("lru-full", lru, {}), ("full", mamba, {})]
                + [(f"compressm-{t}", mamba, {"tau": t}) for t in taus]]
    jobs = []
    for d in datasets:
        for seed in seeds:
            jobs.append(_job(d, seed, "full"))
            jobs += [_job(d, seed, f"compressm-{t}", tau=t) for t in taus]
            if mode == "baselines":
                jobs.append(_job(d, seed, "compressm-0.04-slice", tau=0.04, moments="slice"))
    return jobs


def _second_jobs(mode: str, first: list[dict], taus) -> list[dict]:
    by = {(r["dataset"], r["seed"], r["method"]): r for r in first}
    jobs = []
    if mode == "lm":
        return [{**{k: r[k] for k in ("dataset", "seed", "arch")}, "method": "scratch",
                 "variant": "scratch", "dims": r["final_dims"], "settings": {
                     **SETTINGS[r["dataset"]], "arch": r["arch"], "state": LM_STATE[r["arch"]]}}
                for r in first if r["method"] == "compressed"]
    for (d, seed, method), r in by.items():
        if mode == "schedule":
            if method == "settle":
                jobs.append(_job(d, seed, "scratch", dims=r["final_dims"]))
            if method == "window":
                jobs.append(_job(d, seed, "scratch-quarter",
                                 dims=[max(1, n // 4) for n in r["final_dims"]]))
            continue
        if mode == "mamba" or not method.startswith("compressm-") or "slice" in method:
            continue
        jobs.append(_job(d, seed, f"scratch-{r['tau']}", dims=r["final_dims"]))
        if r["tau"] == (0.04 if mode == "baselines" else max(taus)):
            jobs += [_job(d, seed, f"{sel}-{r['tau']}", schedule=r["cuts"], select=sel)
                     for sel in ("random", "magnitude")]
        if mode == "baselines" and r["tau"] == 0.04:
            full = by[(d, seed, "full")]
            jobs.append(_job(d, seed, "post-training", checkpoint=full["checkpoint"],
                             target=r["final_dims"], full_time_s=full["train_time_s"]))
    return jobs


def _order(mode: str, taus) -> list[str]:
    if mode == "schedule":
        return list(SCHEDULE_METHODS)
    if mode == "mamba":
        return ["lru-full", "full", *[f"compressm-{t}" for t in taus]]
    if mode == "lm":
        return ["full", "compressed", "settle", "scratch"]
    top = 0.04 if mode == "baselines" else max(taus)
    return ["full", *[f"compressm-{t}" for t in taus],
            *(["compressm-0.04-slice"] if mode == "baselines" else []),
            *[f"scratch-{t}" for t in taus],
            *(["post-training"] if mode == "baselines" else []),
            f"random-{top}", f"magnitude-{top}"]


def _table(results: list[dict], dataset: str, order: list[str], ref: str | None) -> str:
    """Per method: test metric, final widths, train time and speed-up vs full; with ``ref``
    also paired columns against that method and the rollbacks and best-validation steps."""
    from compressm_tune._table import markdown_table

    rows = [r for r in results if r["dataset"] == dataset]
    by = {(r["method"], r["seed"]): r for r in rows}
    regression = dataset in ("lti-sysid", "pystdlib-chars")  # lower is better
    name = {"lti-sysid": "test MSE", "pystdlib-chars": "test bits/char"}.get(dataset)
    out = []
    for method in order:
        sel = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seed"])
        if not sel:
            continue
        m, sd = mean_std(r["test"] for r in sel)
        test = f"{m:.4g} ± {sd:.2g}" if regression else f"{100 * m:.2f} ± {100 * sd:.2f}"
        if "test_no_finetune" in sel[0]:
            test += " (no fine-tune: {:.4f} ± {:.4f})".format(
                *mean_std(r["test_no_finetune"] for r in sel))
        speed = [by[("full", r["seed"])]["train_time_s"] / r["train_time_s"]
                 for r in sel if ("full", r["seed"]) in by]
        row = [method, test, "; ".join(",".join(map(str, r["final_dims"])) for r in sel),
               "{:.1f} ± {:.1f}".format(*mean_std(r["train_time_s"] for r in sel)),
               "{:.2f} ± {:.2f}x".format(*mean_std(speed)) if speed else "-"]
        if ref:
            paired = [(r, by[(ref, r["seed"])]) for r in sel if (ref, r["seed"]) in by]
            fewer = [sum(b["final_dims"]) / sum(r["final_dims"]) for r, b in paired]
            lost = [(r["test"] / b["test"] - 1) * 100 if regression
                    else (b["test"] - r["test"]) * 100 for r, b in paired]
            row += ["{:.2f} ± {:.2f}x".format(*mean_std(fewer)) if fewer else "-",
                    "{:+.2f} ± {:.2f}".format(*mean_std(lost)) if lost else "-",
                    "; ".join(str(len(r.get("cuts", []))) for r in sel),
                    "; ".join(_rollbacks(r, regression) for r in sel),
                    "; ".join(str(_best_step(r, regression)) for r in sel)]
        out.append(row)
    headers = ["method", f"{name or 'test accuracy %'} (mean ± sd)",
               "final dims per seed", "train time s", "speed-up vs full (paired)"]
    if ref:
        headers += [f"fewer states than {ref} (paired)",
                    f"{name} change vs {ref} % (paired)" if regression
                    else f"points lost vs {ref} (paired)", "cuts per seed",
                    "rollbacks per seed (val change)", "best val at step, per seed"]
    return markdown_table(headers, out)


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
    return (min if regression else max)(curve, key=lambda sv: sv[1])[0] if curve else "-"


def main() -> None:
    ap = parser(__doc__, "", seeds=None, workers=True)
    ap.add_argument("--mode", choices=MODES, default="baselines")
    ap.add_argument("--seeds", type=int, default=None, help="default 3 (mamba: 2)")
    ap.add_argument("--datasets", default=None, help="comma-separated (default per mode)")
    ap.add_argument("--taus", type=float_list, default=None, help="comma-separated tau values")
    ap.add_argument("--steps", type=int, default=None, help="override the steps per run")
    ap.add_argument("--default-network", default="",
                    help="datasets (comma-separated) run at the default train network")
    ap.add_argument("--methods", default=",".join(SCHEDULE_METHODS),
                    help="schedule mode: a subset of " + ", ".join(SCHEDULE_METHODS))
    ap.add_argument("--reference", default="window", help="schedule mode: the paired method")
    ap.add_argument("--arch", default="lru", help="lm mode: architectures, e.g. lru,mamba")
    ap.add_argument("--state", default="", help=f"lm mode: starting widths, e.g. mamba=64 "
                    f"(default {LM_STATE})")
    args = ap.parse_args()
    name, datasets, taus, seeds = MODES[args.mode]
    datasets = (args.datasets or datasets).split(",")
    taus, seeds = args.taus or float_list(taus), list(range(args.seeds or seeds))
    methods = args.methods.split(",")
    LM_STATE.update({a: int(n) for a, n in (kv.split("=") for kv in args.state.split(",") if kv)})
    if unknown := set(methods + [args.reference]) - set(SCHEDULE_METHODS):
        ap.error(f"unknown method(s) {sorted(unknown)}; choose from {SCHEDULE_METHODS}")
    if args.mode == "selective":
        SETTINGS["mnist1d"] = {**SMALL, "arch": "selective", "state": 128}
    for d in filter(None, args.default_network.split(",")):
        SETTINGS[d] = dict(DEFAULT_NETWORK)
    for s in SETTINGS.values():
        if args.steps:
            s.update(steps=args.steps, eval_every=max(1, args.steps // 12))
        if args.quick:
            s.update(steps=40, eval_every=10, reduce_every=2)
    if not args.name:
        args.name = f"{name}_{args.steps}" if args.mode == "mamba" and args.steps else name
    t0, load = time.time(), machine()["load_avg_1m"]

    def line(r):
        return f"{r['dataset']} {r['seed']} {r['method']}: {r['test']:.4f} {r['final_dims']}"

    first = pool_map(_run, _first_jobs(args.mode, datasets, seeds, taus,
                                       args.arch.split(",") if args.mode == "lm" else methods),
                     args.workers, line=line)
    second = [j for j in _second_jobs(args.mode, first, taus)
              if args.mode != "schedule" or j["method"] in methods]
    results = first + pool_map(_run, second, args.workers, line=line)
    for r in results:
        r.pop("checkpoint", None)
    m, order = machine(load), _order(args.mode, taus)
    used = {d: SETTINGS[d] for d in datasets} if args.mode != "mamba" else SETTINGS["mnist1d"]
    ran = [k for k in order if any(r["method"] == k for r in results)]
    md = [f"# {args.mode}: {', '.join(ran)} ({len(seeds)} seeds)", "", machine_line(m),
          f"One torch thread per run, {args.workers} runs in parallel; wall time "
          f"{(time.time() - t0) / 60:.1f} min. Settings: `{json.dumps(used)}`, taus {taus}. "
          "Test metric at the best validation checkpoint of the final widths; train time "
          "excludes evaluation and includes reduction.", ""]
    ref = {"schedule": args.reference, "lm": "full"}.get(args.mode)
    for d in datasets:
        for arch in sorted({r.get("arch", "") for r in results}):
            md += [f"## {d} {arch}", "", _table([r for r in results if r.get("arch", "") == arch],
                                                 d, order, ref), ""]
    if args.mode == "mamba":
        lru, mamba = (mean_std(r["test"] for r in results if r["method"] == k)[0]
                      for k in ("lru-full", "full"))
        md.append(f"Gap, full Mamba (N=16) minus LRU (N=256): {100 * (mamba - lru):+.1f} "
                  f"points ({mamba:.4f} vs {lru:.4f}).")
    write(args.results_dir / args.name,
          {"machine": m, "mode": args.mode, "settings": SETTINGS, "seeds": seeds, "taus": taus,
           "tau": taus[0], "wall_s": time.time() - t0, "results": results}, "\n".join(md),
          lambda path: states_vs_test(results, order, path, lambda d: d == "lti-sysid"))


if __name__ == "__main__":
    main()
