"""In-training reduction in real runs: its share of training time, accuracy at full length, order.

Groups of training runs (one torch thread per run, ``--workers`` in parallel):
  mnist1d     the default network (4 blocks, H=64, N=256, 1500 steps, eval every 100): full;
              tau=0.04 attempted every 5 steps in the window; tau=0.04 at evaluations only
              (the paper's schedule; ``--extra`` adds eval every 50); from scratch at the final
              widths of both; then an interleaved step-time grid, so speed-ups do not hang on
              the machine's load. -> compression_default.*, and time shares -> reduction_share.*
  lti-share   the default network on lti-sysid (300 steps), both schedules: time shares only.
  order       lti-sysid, one block, small H: does the final width land near the true order (4
              complex LRU states)? tau, window, H, weighting and safety-net sweeps, fixed-width
              references, the full model's HSV spectrum and post-training truncation.
              -> sysid_order.*
  vs-scratch  mnist1d, harder compression (tau=0.1, unweighted and input-weighted) against a
              model trained from scratch at its final widths, paired by seed.
              -> compression_vs_scratch.*

Time is taken through the Reducer's and Trainer's ``phase`` hook: an exclusive clock (a nested
phase pauses its parent) around the named phases, so no library code is patched.

    python benchmarks/bench_reduction_share.py [--groups mnist1d,lti-share,order,vs-scratch]
        [--seeds 3] [--workers 2] [--quick] [--render]
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleave, machine, machine_line, mean_std, parser, pool_map, write  # noqa: E402,I001

from compressm_tune._table import markdown_table  # noqa: E402

DEFAULT_NET = {"blocks": 4, "hidden": 64, "state": 256, "batch": 64}
GROUPS = ("mnist1d", "lti-share", "order", "vs-scratch")
TRUE_COMPLEX_ORDER = 4  # lti-sysid: 8 real states in 4 conjugate pairs -> 4 complex states
CORE = ("scores", "plan", "cut", "moments")  # inside Reducer.attempt
SAFETY = ("safety_validate",)  # validations inside an attempt (the safety net)
CAUSED = ("post_validate", "close_window")  # trainer work only reduction causes
STEP_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 228, 256)
NO_ROLLBACK = 1e9  # checked but never rolled back, so every cut's validation is still logged


class Clock:
    """Exclusive wall time per named phase; ``phase`` is what the Reducer/Trainer hook takes.
    A validation inside an attempt counts as ``safety_validate``; one outside an evaluation
    (the trainer's re-validation after an attempt) as ``post_validate``."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.stack: list[list[Any]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        names = [f[0] for f in self.stack]
        if name == "validate":
            name = ("safety_validate" if "attempt" in names
                    else "validate" if "eval" in names else "post_validate")
        now = time.perf_counter()
        if self.stack:
            self.stack[-1][2] += now - self.stack[-1][1]
        self.stack.append([name, now, 0.0])
        self.counts[name] += 1
        try:
            yield
        finally:
            end = time.perf_counter()
            label, start, acc = self.stack.pop()
            self.totals[label] += acc + end - start
            if self.stack:
                self.stack[-1][1] = end


def _run(job: dict[str, Any]) -> dict[str, Any]:
    """One training run in a worker process (1 thread)."""
    import torch

    from compressm_tune.data import load_dataset
    from compressm_tune.models import SSMConfig, dropout_for
    from compressm_tune.reduction import ReduceConfig, Reducer, ReductionPolicy
    from compressm_tune.training import TrainConfig, Trainer

    torch.set_num_threads(1)
    clock = Clock()
    data = load_dataset(job["dataset"], seed=job["seed"])
    net = job["net"]
    mcfg = SSMConfig(d_input=data.d_input, d_output=data.d_output, d_model=net["hidden"],
                     state_dims=job.get("dims") or [net["state"]] * net["blocks"],
                     dropout=dropout_for(data.task),
                     pooling="mean" if data.task == "classification" else "none")
    tcfg = TrainConfig(steps=job["steps"], batch_size=net["batch"], eval_every=job["eval_every"],
                       seed=job["seed"], threads=1)
    metric = "accuracy" if data.task == "classification" else "loss"
    reducer = None
    if "tau" in job:
        reducer = Reducer(ReduceConfig(
            policy=ReductionPolicy("tau", job["tau"], weighting=job.get("weighting", "none")),
            window=job.get("window", 0.1), every=job.get("every"),
            max_drop=job.get("max_drop", 0.02), schedule="window"), phase=clock.phase)
    out = Path(tempfile.mkdtemp(prefix="bench-share-"))
    trainer = Trainer(mcfg, tcfg, data, out, reducer=reducer, progress=False, phase=clock.phase)
    t0 = time.perf_counter()
    summary = trainer.fit()
    result = {**job, "test": summary["test_best"][metric],
              "test_last": summary["test_last"][metric],
              "final_dims": summary["final_state_dims"], "train_time_s": summary["train_time_s"],
              "fit_wall_s": time.perf_counter() - t0, "phase_s": dict(clock.totals),
              "phase_n": dict(clock.counts), "load_avg_1m": os.getloadavg()[0]}
    result["steps_s"] = summary["train_time_s"] - _reduction_s(result)
    result.update(_diagnose(out, job, data, metric))
    shutil.rmtree(out, ignore_errors=True)
    return result


def _diagnose(out: Path, job: dict[str, Any], data, metric: str) -> dict[str, Any]:
    """Widths over time and every cut with the validation around it, from ``metrics.jsonl``;
    with ``analyze_order`` the full model's HSV spectrum, leading modes and truncation."""
    from compressm_tune.reduction import CALIBRATION, layer_hsv, layer_inputs, truncate_layer
    from compressm_tune.training import evaluate, model_from_checkpoint

    actions: dict[str, int] = defaultdict(int)
    trajectory, cut_log = [], []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for c in rec.get("reduction", []):
            actions[c["action"]] += 1
            if c["action"] in ("cut", "rollback"):
                cut_log.append([rec["step"], c["layer"], c["n"], c["rank"], c["action"],
                                c.get("val_before", {}).get(metric),
                                c.get("val_after", {}).get(metric)])
        if rec.get("reduction") or rec.get("budget_cut"):
            trajectory.append([rec["step"], rec["state_dims"]])
    diag: dict[str, Any] = {"actions": dict(actions), "dims_trajectory": trajectory,
                            "cut_log": cut_log}
    if not job.get("analyze_order"):
        return diag
    best = model_from_checkpoint(out / "best.pt")
    layer = best.ssm_layers()[0]
    calib = layer_inputs(best, data.x_train[:CALIBRATION], lru=True)[0]
    lam, b, c, _ = (t.detach().numpy() if hasattr(t, "detach") else t for t in layer.system())
    score = np.linalg.norm(b, axis=1) * np.linalg.norm(c, axis=0) / (1 - np.abs(lam) ** 2)
    diag["top_modes_abs"] = [float(v) for v in np.abs(lam[np.argsort(-score)[:8]])]
    poles = np.array([complex(*p) for p in data.info["poles"]])
    diag["true_pole_abs"] = sorted({round(float(v), 4) for v in np.abs(poles)})
    for suffix, inputs in (("", None), ("_weighted", calib)):
        hsv = layer_hsv(layer, inputs)
        diag["hsv_head" + suffix] = [float(g) for g in hsv[:16] / hsv[0]]
        diag["hsv_share" + suffix] = {str(r): float(np.cumsum(hsv)[r - 1] / hsv.sum())
                                      for r in (2, 4, 8, 16, 32)}
        diag["post_trunc" + suffix] = {}
        for r in (4, 8, 16):
            model = model_from_checkpoint(out / "best.pt")
            truncate_layer(model.ssm_layers()[0], r, inputs=inputs)
            diag["post_trunc" + suffix][str(r)] = evaluate(model, data.x_test, data.y_test,
                                                           data.task)[metric]
    return diag


ORDER_SETTINGS = [  # (method, hidden, extra job keys); all: 1 block, N=256, no pooling
    ("full", 16, {"analyze_order": True}), ("fixed-4", 16, {"dims": [4]}),
    ("fixed-8", 16, {"dims": [8]}), ("tau0.04", 16, {"tau": 0.04}), ("tau0.2", 16, {"tau": 0.2}),
    ("tau0.1-window0.5", 16, {"tau": 0.1, "window": 0.5}),
    ("tau0.2-window0.5-nodrop", 16, {"tau": 0.2, "window": 0.5, "max_drop": NO_ROLLBACK}),
    ("full", 4, {"analyze_order": True}), ("fixed-4", 4, {"dims": [4]}),
    ("tau0.1-window0.5", 4, {"tau": 0.1, "window": 0.5}),
    ("tau0.2-window0.5-nodrop", 4, {"tau": 0.2, "window": 0.5, "max_drop": NO_ROLLBACK}),
    ("w-tau0.04", 16, {"tau": 0.04, "weighting": "input"}),
    ("w-tau0.1-window0.5", 16, {"tau": 0.1, "window": 0.5, "weighting": "input"}),
    ("w-tau0.1-window0.5-drop0.5", 16, {"tau": 0.1, "window": 0.5, "weighting": "input",
                                        "max_drop": 0.5}),
    ("w-tau0.2-window0.5-nodrop", 16, {"tau": 0.2, "window": 0.5, "weighting": "input",
                                       "max_drop": NO_ROLLBACK}),
    ("w-tau0.1-window0.5", 4, {"tau": 0.1, "window": 0.5, "weighting": "input"}),
    ("w-tau0.2-window0.5-nodrop", 4, {"tau": 0.2, "window": 0.5, "weighting": "input",
                                      "max_drop": NO_ROLLBACK}),
]
VS_SCRATCH = (("tau0.1-every5", {"tau": 0.1, "every": 5}),
              ("w-tau0.1-every5", {"tau": 0.1, "every": 5, "weighting": "input"}))


def _jobs(groups, seeds: dict[str, int], steps: dict[str, int], extra: bool) -> list[dict]:
    jobs = []
    mn = {"dataset": "mnist1d", "net": DEFAULT_NET, "steps": steps["mnist1d"], "eval_every": 100}
    for seed in range(seeds["mnist1d"]):  # longest first
        if "mnist1d" in groups:
            jobs += [{**mn, "group": "mnist1d", "seed": seed, "method": m, **x} for m, x in (
                ("full", {}), ("tau0.04-every5", {"tau": 0.04, "every": 5}),
                ("tau0.04-evals", {"tau": 0.04}),
                *([("tau0.04-evals50", {"tau": 0.04, "eval_every": 50})] if extra else []))]
        if "vs-scratch" in groups:
            jobs += [{**mn, "group": "vs-scratch", "seed": seed, "method": m, **x}
                     for m, x in VS_SCRATCH]
    if "lti-share" in groups:
        lti = {"dataset": "lti-sysid", "group": "lti-share", "net": DEFAULT_NET,
               "steps": steps["lti-share"], "eval_every": max(1, steps["lti-share"] // 10)}
        jobs += [{**lti, "seed": seed, "method": m, "tau": 0.04, **x}
                 for seed in range(seeds["lti-share"])
                 for m, x in (("tau0.04-every5", {"every": 5}), ("tau0.04-evals", {}))]
    if "order" in groups:
        jobs += [{"dataset": "lti-sysid", "group": "order", "steps": steps["order"],
                  "eval_every": 50, "seed": seed, "method": m, **x,
                  **({"every": 5} if "tau" in x else {}),
                  "net": {"blocks": 1, "hidden": h, "state": 256, "batch": 32}}
                 for seed in range(seeds["order"]) for m, h, x in ORDER_SETTINGS]
    return jobs


def _scratch_job(r: dict) -> dict | None:
    """Small-from-scratch at the final widths of a finished mnist1d reduction run, or None."""
    if r["group"] == "vs-scratch" and "tau" in r:
        method = "scratch-" + r["method"]
    elif r["group"] == "mnist1d" and r["method"] in ("tau0.04-every5", "tau0.04-evals"):
        method = "scratch-" + r["method"].split("-", 1)[1]
    else:
        return None
    keep = ("dataset", "group", "net", "steps", "eval_every", "seed")
    return {**{k: r[k] for k in keep}, "method": method, "dims": r["final_dims"]}


def _step_times(net: dict[str, int], repeats: int = 3, steps: int = 12) -> dict[str, float]:
    """Median ms per training step of the mnist1d network at uniform widths, interleaved."""
    import torch
    import torch.nn.functional as F

    from compressm_tune.data import load_dataset
    from compressm_tune.models import SSMConfig, SSMModel
    from compressm_tune.training.optim import build_optimizer

    torch.set_num_threads(1)
    data = load_dataset("mnist1d", seed=0)
    x, y = data.x_train[:net["batch"]], data.y_train[:net["batch"]]

    def candidate(n):
        model = SSMModel(SSMConfig(d_input=1, d_output=10, d_model=net["hidden"],
                                   state_dims=[n] * net["blocks"]))
        opt = build_optimizer(model, 3e-3, 0.05, 0.5)

        def run():
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
        return run

    times = interleave({str(n): candidate(n) for n in STEP_GRID}, repeats)
    return {n: float(np.median(t[0])) / steps for n, t in times.items()}


def _modelled_train_s(r: dict[str, Any], grid: dict[str, float]) -> float:
    """Seconds of a run's steps from the step-time grid along its width trajectory (a step at
    widths N_1..N_k costs the mean over layers of the uniform-width step time)."""
    ns, ts = np.array([int(k) for k in grid], dtype=float), np.array(list(grid.values()))
    dims = r.get("dims") or [r["net"]["state"]] * r["net"]["blocks"]
    changes, total = dict((s, d) for s, d in r.get("dims_trajectory", [])), 0.0
    for step in range(r["steps"]):
        dims = changes.get(step, dims)
        total += float(np.mean(np.interp(dims, ns, ts))) / 1e3
    return total


def _reduction_s(r: dict[str, Any]) -> float:
    """Seconds spent in or because of reduction (the attempt with all it holds, and CAUSED)."""
    return sum(r["phase_s"].get(p, 0.0) for p in ("attempt", *CORE, *SAFETY, *CAUSED))


def _fmt(values, scale: float = 1.0, spec: str = "{:.3g} ± {:.2g}") -> str:
    return spec.format(*mean_std(scale * v for v in values))


def _share_md(results: list[dict]) -> str:
    """Per run: its cuts, the shares of fit wall time, and each phase's per-call cost."""
    phases, rows = CORE + SAFETY + CAUSED + ("eval",), []
    groups = {"core": CORE, "Reducer total": ("attempt", *CORE, *SAFETY), "caused": CAUSED,
              "all": ("attempt", *CORE, *SAFETY, *CAUSED)}
    for key in dict.fromkeys((r["group"], r["method"]) for r in results if "tau" in r):
        sel = [r for r in results if (r["group"], r["method"]) == key]
        rows.append([f"{sel[0]['dataset']} {key[1]}", len(sel), sel[0]["steps"],
                     _fmt(r["fit_wall_s"] for r in sel),
                     "{:.1f} / {:.1f}".format(*(mean_std(r["actions"].get(a, 0) for r in sel)[0]
                                                for a in ("cut", "rollback"))),
                     *(_fmt((sum(r["phase_s"].get(p, 0.0) for p in names) / r["fit_wall_s"]
                             for r in sel), 100, "{:.2f} ± {:.2f}") for names in groups.values()),
                     *("{:.0f} ms × {:.0f}".format(
                         mean_std(1e3 * r["phase_s"].get(p, 0) / max(1, r["phase_n"].get(p, 0))
                                  for r in sel)[0], mean_std(r["phase_n"].get(p, 0)
                                                             for r in sel)[0]) for p in phases)])
    return markdown_table(["run", "seeds", "steps", "fit wall s", "cuts / rollbacks per run",
                           *(f"{g} %" for g in groups), *(f"{p} (per call × calls)"
                                                         for p in phases)], rows)


def _compression_md(results: list[dict], step_ms: dict | None) -> str:
    full = {r["seed"]: r for r in results if r["method"] == "full"}
    out = []
    for method in ("full", "tau0.04-every5", "tau0.04-evals", "tau0.04-evals50",
                   "scratch-every5", "scratch-evals"):
        sel = sorted((r for r in results if r["method"] == method), key=lambda r: r["seed"])
        if not sel:
            continue
        paired = [(r, full[r["seed"]]) for r in sel if r["seed"] in full]
        row = [method, _fmt((r["test"] for r in sel), 100, "{:.2f} ± {:.2f}"),
               _fmt((r["test_last"] for r in sel), 100, "{:.2f} ± {:.2f}"),
               _fmt((f["test"] - r["test"] for r, f in paired), 100, "{:+.2f} ± {:.2f}"),
               "; ".join(",".join(map(str, r["final_dims"])) for r in sel),
               "; ".join(f"{r['actions'].get('cut', 0)}/{r['actions'].get('rollback', 0)}"
                         for r in sel), _fmt(r["train_time_s"] for r in sel),
               _fmt((f["train_time_s"] / r["train_time_s"] for r, f in paired), 1,
                    "{:.2f} ± {:.2f}x")]
        if step_ms:
            row.append(_fmt((_modelled_train_s(f, step_ms) / (_modelled_train_s(r, step_ms)
                             * (1 + _reduction_s(r) / r["steps_s"])) for r, f in paired),
                            1, "{:.2f} ± {:.2f}x"))
        out.append(row)
    headers = ["method", "test acc % (best ckpt)", "test acc % (last)",
               "points lost vs full (paired)", "final dims per seed", "cuts / rollbacks per seed",
               "train time s (loaded)", "speed-up (train time, loaded)"]
    return markdown_table(headers + (["modelled speed-up (interleaved step times along the "
                                      "run's widths, plus its reduction overhead)"]
                                     if step_ms else []), out)


def _vs_md(results: list[dict]) -> str:
    out = []
    for method, _ in VS_SCRATCH:
        ours = {r["seed"]: r for r in results if r["method"] == method}
        theirs = {r["seed"]: r for r in results if r["method"] == "scratch-" + method}
        seeds = sorted(set(ours) & set(theirs))
        if seeds:
            diff = [100 * (ours[s]["test"] - theirs[s]["test"]) for s in seeds]
            out.append([method, len(seeds),
                        _fmt((ours[s]["test"] for s in seeds), 100, "{:.2f} ± {:.2f}"),
                        _fmt((theirs[s]["test"] for s in seeds), 100, "{:.2f} ± {:.2f}"),
                        " / ".join(f"{d:+.2f}" for d in diff), f"{mean_std(diff)[0]:+.2f}",
                        "; ".join(",".join(map(str, ours[s]["final_dims"])) for s in seeds)])
    return markdown_table(["method", "seeds", "CompreSSM test acc %",
                           "scratch at its final widths %", "difference per seed (points)",
                           "mean difference", "final widths per seed"], out)


def _order_md(results: list[dict]) -> str:
    out = []
    for method, hidden, _ in ORDER_SETTINGS:
        sel = sorted((r for r in results if r["method"] == method
                      and r["net"]["hidden"] == hidden), key=lambda r: r["seed"])
        if not sel:
            continue
        cuts = [c for r in sel for c in r.get("cut_log", []) if c[4] == "cut"]
        extra = []
        for suffix, label in (("", "unweighted"), ("_weighted", "input-weighted")):
            if "post_trunc" + suffix in sel[0]:
                extra.append(f"{label}: " + ", ".join(
                    f"r={k}: {mean_std(r['post_trunc' + suffix][k] for r in sel)[0]:.2e}"
                    for k in sel[0]["post_trunc" + suffix]) + ", HSV share of top 4/8: " +
                    "/".join(f"{mean_std(r['hsv_share' + suffix][k] for r in sel)[0]:.2f}"
                             for k in ("4", "8")))
        if "top_modes_abs" in sel[0]:
            tops = [v for r in sel for v in r["top_modes_abs"]]
            extra.append(f"|lambda| of the 8 top-scored modes: {min(tops):.3f}-{max(tops):.3f}")
        out.append([method, hidden, _fmt((r["test"] for r in sel), 1, "{:.2e} ± {:.1e}"),
                    "; ".join(str(r["final_dims"][0]) for r in sel),
                    "/".join(f"{r['actions'].get('cut', 0)}c{r['actions'].get('rollback', 0)}r"
                             for r in sel) if "tau" in sel[0] else "-",
                    f"steps {min(c[0] for c in cuts)}-{max(c[0] for c in cuts)}, val MSE "
                    f"{min(c[5] for c in cuts):.2f}-{max(c[5] for c in cuts):.2f}"
                    if cuts else "-", _fmt(r["train_time_s"] for r in sel),
                    "; ".join(extra) or "-"])
    return markdown_table(["method", "H", "test MSE (mean ± sd)", "final N per seed",
                           "cuts c / rollbacks r per seed",
                           "when the cuts happened (val MSE before each)", "train time s",
                           "full model: post-training truncation test MSE, no fine-tune"], out)


def _scatter(results: list[dict], x, y, label, title: str, xlabel: str, ylabel: str,
             log: bool = False, vline: float | None = None):
    def plot(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        labels = list(dict.fromkeys(label(r) for r in results))
        for i, name in enumerate(labels):
            sel = [r for r in results if label(r) == name]
            ax.scatter([x(r) for r in sel], [y(r) for r in sel], label=name,
                       marker="os^Dv<>"[i % 7], color=plt.cm.tab20(i / max(1, len(labels))))
        if vline:
            ax.axvline(vline, color="k", ls="--", lw=1, label="true order (complex)")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        if log:
            ax.set(xscale="log", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return plot


NOTES = {  # what each output's runs are, in the Markdown
    "reduction_share": "Shares of `Trainer.fit()` wall time (final test excluded), mean ± sd. "
    "*core*: scores (HSVs), plan, cut and moment carry-over inside `Reducer.attempt`; *Reducer "
    "total*: the whole attempt with its safety net (checkpoint, validation, rollback); *caused "
    "in trainer*: re-validation after an attempt and the window close. lti-share evaluates "
    "every steps/10, so one evaluation falls in the window.",
    "compression_default": "Default network (4 blocks, H=64, N=256), tau=0.04, window 10%, "
    "max-drop 0.02; *every5*: attempts every 5 steps, *evals*: at evaluations only; "
    "*scratch-X*: from scratch at tau0.04-X's widths. Paired by seed. Modelled speed-up: step "
    "times from an interleaved grid after the runs (ms per step: {grid}).",
    "compression_vs_scratch": "mnist1d, default network, tau=0.1 every 5 steps in a 10% window; "
    "*w-*: input-weighted HSVs; scratch: the same network at the run's final widths, same seed.",
    "sysid_order": "lti-sysid: a real system of order 8 (4 conjugate pole pairs, so 4 complex "
    "LRU states). 1 block, N=256, batch 32, eval every 50, attempts every 5 steps, max-drop 0.02 "
    "unless *nodrop* / *drop0.5*; *w-*: input-weighted HSVs; *fixed-k*: trained at N=k. Right: "
    "the full model truncated after training, and its top-4/8 HSV share.",
}


def _report(results: list[dict], meta: dict, results_dir: Path, only: str | None = None) -> None:
    """Write each output whose runs are present (``only``: just that one)."""
    head = machine_line(meta["machine"]) + (
        f" One torch thread per run, {meta['workers']} runs in parallel; wall time "
        f"{meta['wall_s'] / 60:.1f} min; steps per group {meta['steps']}.")
    step_ms = meta.get("step_ms")
    outputs = {
        "reduction_share": (("mnist1d", "lti-share"), "In-training reduction: share of "
                            "training time", _share_md, None),
        "compression_default": (("mnist1d",), "CompreSSM on mnist1d, default network and "
                                "length", lambda sel: _compression_md(sel, step_ms),
                                lambda sel: _scatter(
                                    sel, lambda r: _modelled_train_s(r, step_ms) if step_ms
                                    else r["train_time_s"], lambda r: 100 * r["test"],
                                    lambda r: r["method"], "mnist1d, default network",
                                    "train time s", "test accuracy %")),
        "compression_vs_scratch": (("vs-scratch",), "CompreSSM vs small-from-scratch at the "
                                   "same widths", _vs_md, None),
        "sysid_order": (("order",), "lti-sysid: does the final width land near the true order?",
                        _order_md, lambda sel: _scatter(
                            sel, lambda r: r["final_dims"][0], lambda r: r["test"],
                            lambda r: f"{r['method']} H={r['net']['hidden']}",
                            "lti-sysid, 1 block", "final N (complex states)", "test MSE",
                            log=True, vline=TRUE_COMPLEX_ORDER)),
    }
    for name, (groups, title, table, plot) in outputs.items():
        sel = [r for r in results if r["group"] in groups]
        if not sel or only not in (None, name) or (name == "reduction_share" and not any(
                "tau" in r for r in sel)):
            continue
        notes = NOTES[name].format(grid=", ".join(f"N={k}: {v:.0f}"
                                                  for k, v in (step_ms or {}).items()))
        write(results_dir / name, {**meta, "results": sel},
              "\n".join([f"# {title}", "", head, "", notes, "", table(sel)]),
              plot(sel) if plot else None)


def main() -> None:
    ap = parser(__doc__, "", seeds=3, workers=True)
    ap.add_argument("--groups", default=",".join(GROUPS))
    ap.add_argument("--lti-seeds", type=int, default=1)
    ap.add_argument("--order-seeds", type=int, default=2)
    ap.add_argument("--steps", default=None, help="per group, e.g. mnist1d=1500,order=1000")
    ap.add_argument("--extra", action="store_true", help="mnist1d: also evals every 50 steps")
    ap.add_argument("--no-scratch", dest="scratch", action="store_false",
                    help="skip small-from-scratch at the final widths")
    ap.add_argument("--methods", default=None, help="run only these methods (comma-separated)")
    ap.add_argument("--render", action="store_true",
                    help="rewrite the Markdown/PNG from the JSON in --results-dir, no training")
    args = ap.parse_args()
    groups = args.groups.split(",")
    if args.render:
        for name in NOTES:
            if (path := args.results_dir / f"{name}.json").exists():
                payload = json.loads(path.read_text())
                _report(payload.pop("results"), payload, args.results_dir, only=name)
        return
    steps = ({"mnist1d": 40, "lti-share": 30, "order": 30} if args.quick
             else {"mnist1d": 1500, "lti-share": 300, "order": 1000})
    steps |= {k: int(v) for k, v in (kv.split("=") for kv in (args.steps or "").split(",") if kv)}
    seeds = {"mnist1d": args.seeds, "lti-share": args.lti_seeds, "order": args.order_seeds}
    jobs = _jobs(groups, seeds, steps, args.extra)
    if args.methods:
        jobs = [j for j in jobs if j["method"] in args.methods.split(",")]
    if args.quick:  # evaluations (and so the paper-schedule attempts) inside the short window
        for j in jobs:
            j["eval_every"] = 2
    t0, load = time.time(), os.getloadavg()[0]
    results = pool_map(_run, jobs, args.workers, _scratch_job if args.scratch else lambda r: None,
                       line=lambda r: (f"{r['group']} seed={r['seed']} {r['method']}: "
                                       f"test={r['test']:.4g} dims={r['final_dims']} "
                                       f"train={r['train_time_s']:.1f}s "
                                       f"load={r['load_avg_1m']:.1f}"))
    meta = {"machine": machine(load), "wall_s": time.time() - t0, "workers": args.workers,
            "steps": steps}
    if any(r["group"] == "mnist1d" and r["method"] == "full" for r in results):
        meta["step_ms"] = _step_times(DEFAULT_NET, repeats=1 if args.quick else 3)
    _report(results, meta, args.results_dir)


if __name__ == "__main__":
    main()
