"""In-training reduction in real runs: its share of training time, accuracy at full length, order.

Three groups of training runs (one torch thread per run, ``--workers`` runs in parallel):

  mnist1d   the default network (4 blocks, H=64, N=256, 1500 steps, batch 64, eval every 100):
            full; tau=0.04 with attempts every 5 steps in the window (as bench_compression);
            tau=0.04 with attempts only at evaluations (the paper's schedule; at the default
            eval_every=100 that is one attempt, at step 100; ``--extra`` adds eval_every=50);
            small-from-scratch at the final widths of both, queued as soon as they finish; then
            an interleaved step-time grid, so speed-ups do not hang on the machine's load.
  lti-share the default network on lti-sysid (300 steps, one evaluation in the window):
            tau=0.04, every 5 steps and evaluations only -- only for the time share.
  order     lti-sysid with one block, no pooling, small H: does the final width land near the
            true order (8 real states = 4 complex-conjugate pairs, i.e. 4 complex LRU states)?
            Sweeps tau, window, H and the safety net; full and fixed-width references; the full
            model's HSV spectrum, leading modes and post-training truncation to 4, 8, 16 states.
  vs-scratch mnist1d, default network and length, harder compression (tau=0.1 every 5 steps,
            unweighted and input-weighted): each run against a model trained from scratch at
            its final widths, paired by seed. Does CompreSSM beat small-from-scratch where the
            small width costs accuracy?

Time is measured from the benchmark side: the Reducer and the Trainer are subclassed and the
functions the reducer module calls (``layer_hsv``/``state_scores``, ``truncate_layer``/
``reduce_layer``) are wrapped with timers, so the library code is untouched. Every timer is
exclusive (a nested phase's time is not counted again in its parent).

Outputs: bench_results/reduction_share.{json,md} (time shares), compression_default.{json,md,png}
(mnist1d at the default length), sysid_order.{json,md,png} (lti-sysid order),
compression_vs_scratch.{json,md} (harder compression against scratch). ``--render``
rewrites the Markdown and plots from the JSON without training.

    python benchmarks/bench_reduction_share.py --snapshot [--groups mnist1d,lti-share,order]
        [--seeds 3] [--workers 2] [--quick] [--render [--step-times]]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
if os.environ.get("BENCH_CODE"):  # --snapshot: the committed package, not a tree being edited
    sys.path.insert(0, os.environ["BENCH_CODE"])
from _common import RESULTS, machine, mean_std, write  # noqa: E402

DEFAULT_NET = {"blocks": 4, "hidden": 64, "state": 256, "batch": 64}
GROUPS = ("mnist1d", "lti-share", "order", "vs-scratch")
TRUE_COMPLEX_ORDER = 4  # lti-sysid: 8 real states in 4 conjugate pairs -> 4 complex states
# Phases timed inside Reducer.attempt, and what each one is.
CORE = ("hsv", "plan", "truncate", "optimizer", "attempt_other")
SAFETY = ("checkpoint", "safety_validate", "restore")
CAUSED = ("post_validate", "cadence_eval", "close_window")  # trainer work the reducer causes


# --------------------------------------------------------------------------------- timing


class _Clock:
    """Exclusive wall-time per named phase (a nested phase pauses its parent)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.stack: list[list[Any]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
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

    def inside(self, name: str) -> bool:
        return any(frame[0] == name for frame in self.stack)


_CLOCK = _Clock()  # the running job's clock (a worker runs its jobs one after another)


def _instrument(clock: _Clock):
    """A Reducer factory timed through its phase hook, and a Trainer timed by overrides."""
    from compressm_tune.reduction import Reducer
    from compressm_tune.training import Trainer

    global _CLOCK
    _CLOCK = clock
    inner = {"scores": "hsv", "cut": "truncate", "moments": "optimizer"}  # timed in attempts

    def reducer_phase(name: str):
        if name not in inner:
            return clock.phase(name)
        return clock.phase(inner[name]) if clock.inside("attempt") else contextlib.nullcontext()

    def timed_reducer(config):
        return Reducer(config, phase=reducer_phase)

    class TimedTrainer(Trainer):
        _validates_in_eval = 0

        def _evaluate_and_save(self, losses):
            cfg = self.config
            regular = self.step % cfg.eval_every == 0 or self.step == cfg.steps
            self._validates_in_eval = 0
            with clock.phase("eval" if regular else "cadence_eval"):
                return super()._evaluate_and_save(losses)

        def validate(self):
            if clock.inside("attempt"):
                with clock.phase("safety_validate"):
                    return super().validate()
            self._validates_in_eval += 1
            if self._validates_in_eval > 1:  # the trainer's re-validation after a cut attempt
                with clock.phase("post_validate"):
                    return super().validate()
            return super().validate()

        def save(self, name):
            if clock.inside("attempt"):
                with clock.phase("checkpoint"):
                    return super().save(name)
            return super().save(name)

        def summarize(self):
            with clock.phase("summarize"):
                return super().summarize()

        def restore(self, path):
            with clock.phase("restore"):
                return super().restore(path)

    return timed_reducer, TimedTrainer


# --------------------------------------------------------------------------------- one run


def _layer(block):
    """A block's SSM layer (``block.ssm``; ``block.lru`` in older trees)."""
    return block.ssm if hasattr(block, "ssm") else block.lru


def _snapshot() -> str:
    """Export the committed ``compressm_tune`` (plus the built kernel) to a temp dir."""
    root = RESULTS.parent
    dest = Path(tempfile.mkdtemp(prefix="bench-code-"))
    archive = subprocess.run(["git", "archive", "HEAD", "compressm_tune"], cwd=root,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for so in (root / "compressm_tune").rglob("*.so"):
        target = dest / so.relative_to(root)
        target.write_bytes(so.read_bytes())
    return str(dest)


def _run(job: dict[str, Any]) -> dict[str, Any]:
    """One training run in a worker process (1 thread)."""
    import torch

    from compressm_tune.data import load_dataset
    from compressm_tune.models import SSMConfig, dropout_for
    from compressm_tune.reduction import ReduceConfig, ReductionPolicy
    from compressm_tune.training import TrainConfig

    torch.set_num_threads(1)
    clock = _Clock()
    TimedReducer, TimedTrainer = _instrument(clock)
    data = load_dataset(job["dataset"], seed=job["seed"])
    net = job["net"]
    dims = job.get("dims") or [net["state"]] * net["blocks"]
    mcfg = SSMConfig(d_input=data.d_input, d_output=data.d_output, d_model=net["hidden"],
                     state_dims=dims, dropout=net.get("dropout", dropout_for(data.task)),
                     pooling="mean" if data.task == "classification" else "none")
    tcfg = TrainConfig(steps=job["steps"], batch_size=net["batch"], eval_every=job["eval_every"],
                       seed=job["seed"], threads=1)
    metric = "accuracy" if data.task == "classification" else "loss"
    reducer = None
    if "tau" in job:
        reducer = TimedReducer(ReduceConfig(
            policy=ReductionPolicy("tau", job["tau"], weighting=job.get("weighting", "none")),
            window=job.get("window", 0.1),
            every=job.get("every"), max_drop=job.get("max_drop", 0.02)))
    out = Path(tempfile.mkdtemp(prefix="bench-share-"))
    trainer = TimedTrainer(mcfg, tcfg, data, out, reducer=reducer, progress=False)
    t0 = time.perf_counter()
    summary = trainer.fit()
    fit_s = time.perf_counter() - t0 - clock.totals.get("summarize", 0.0)
    result = {k: v for k, v in job.items() if k != "net"}
    result.update(
        net=net, test=summary["test_best"][metric], test_last=summary["test_last"][metric],
        final_dims=summary["final_state_dims"], train_time_s=summary["train_time_s"],
        fit_wall_s=fit_s, phase_s=dict(clock.totals), phase_n=dict(clock.counts),
        load_avg_1m=os.getloadavg()[0],
        code=str(Path(sys.modules["compressm_tune"].__file__).parent),
    )
    result["steps_s"] = summary["train_time_s"] - clock.totals.get("attempt", 0.0) - sum(
        clock.totals.get(p, 0.0) for p in CORE + SAFETY if p != "attempt_other")
    result.update(_diagnose(out, job, data))
    shutil.rmtree(out, ignore_errors=True)
    return result


def _diagnose(out: Path, job: dict[str, Any], data) -> dict[str, Any]:
    """What a finished run directory tells beyond its summary: widths over time, every cut
    with the validation score around it, and (``analyze_order``) the full lti model's spectrum,
    its leading modes and post-training truncation."""
    import numpy as np

    from compressm_tune.reduction import CALIBRATION, layer_hsv, layer_inputs, truncate_layer
    from compressm_tune.training import evaluate, model_from_checkpoint

    metric = "accuracy" if data.task == "classification" else "loss"
    diag: dict[str, Any] = {}
    actions: dict[str, int] = defaultdict(int)
    trajectory, cut_log = [], []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for layer in rec.get("reduction", []):
            actions[layer["action"]] += 1
            if layer["action"] in ("cut", "rollback"):
                cut_log.append([rec["step"], layer["layer"], layer["n"], layer["rank"],
                                layer["action"], layer.get("val_before", {}).get(metric),
                                layer.get("val_after", {}).get(metric)])
        if rec.get("reduction") or rec.get("budget_cut"):
            trajectory.append([rec["step"], rec["state_dims"]])
    diag["actions"], diag["dims_trajectory"] = dict(actions), trajectory
    diag["cut_log"] = cut_log  # [step, layer, n, rank, action, val before, val after]
    if job.get("analyze_order"):  # full lti model: HSV spectrum and post-training truncation
        best = model_from_checkpoint(out / "best.pt")
        layer = _layer(best.blocks[0])
        calib = layer_inputs(best, data.x_train[:CALIBRATION], lru=True)[0]
        lam, b, c, _ = layer.system()
        lam, b, c = lam.detach().numpy(), b.detach().numpy(), c.detach().numpy()
        mode = np.linalg.norm(b, axis=1) * np.linalg.norm(c, axis=0) / (1 - np.abs(lam) ** 2)
        top = np.argsort(-mode)[:8]  # modes with the largest own Hankel score
        diag["top_modes_abs"] = [float(v) for v in np.abs(lam[top])]
        diag["lambda_abs_quantiles"] = [float(v) for v in np.quantile(np.abs(lam),
                                                                      [0, 0.5, 1])]
        poles = np.array([complex(*p) for p in data.info["poles"]])
        diag["true_pole_abs"] = sorted({round(float(v), 4) for v in np.abs(poles)})
        for suffix, inputs in (("", None), ("_weighted", calib)):  # unweighted, input-weighted
            hsv = layer_hsv(layer, inputs)
            diag["hsv_head" + suffix] = [float(g) for g in hsv[:16] / hsv[0]]
            diag["hsv_share" + suffix] = {str(r): float(np.cumsum(hsv)[r - 1] / hsv.sum())
                                          for r in (2, 4, 8, 16, 32)}
            diag["post_trunc" + suffix] = {}
            for r in (4, 8, 16):
                model = model_from_checkpoint(out / "best.pt")
                truncate_layer(_layer(model.blocks[0]), r, inputs=inputs)
                diag["post_trunc" + suffix][str(r)] = evaluate(model, data.x_test, data.y_test,
                                                               data.task)[metric]
    return diag


# --------------------------------------------------------------------------------- jobs


def _mnist_jobs(seeds, steps, extra):
    base = {"dataset": "mnist1d", "group": "mnist1d", "net": DEFAULT_NET, "steps": steps,
            "eval_every": 100}
    jobs = []
    for seed in seeds:
        jobs.append({**base, "seed": seed, "method": "full"})
        jobs.append({**base, "seed": seed, "method": "tau0.04-every5", "tau": 0.04, "every": 5})
        jobs.append({**base, "seed": seed, "method": "tau0.04-evals", "tau": 0.04})
        if extra:
            jobs.append({**base, "seed": seed, "method": "tau0.04-evals50", "tau": 0.04,
                         "eval_every": 50})
    return jobs


def _lti_share_jobs(seeds, steps):
    base = {"dataset": "lti-sysid", "group": "lti-share", "net": DEFAULT_NET, "steps": steps,
            "eval_every": max(1, steps // 10)}  # one evaluation in the 10% window
    return [j for seed in seeds for j in (
        {**base, "seed": seed, "method": "tau0.04-every5", "tau": 0.04, "every": 5},
        {**base, "seed": seed, "method": "tau0.04-evals", "tau": 0.04})]


# *nodrop*: checked but never rolled back, so every cut's validation is still logged (an
# infinite max-drop would skip the validations altogether)
NO_ROLLBACK = 1e9
ORDER_SETTINGS = [  # (method, hidden, extra job keys); all: 1 block, N=256, no pooling
    ("full", 16, {"analyze_order": True}),
    ("fixed-4", 16, {"dims": [4]}),
    ("fixed-8", 16, {"dims": [8]}),
    ("tau0.04", 16, {"tau": 0.04, "every": 5}),
    ("tau0.2", 16, {"tau": 0.2, "every": 5}),
    ("tau0.1-window0.5", 16, {"tau": 0.1, "every": 5, "window": 0.5}),
    ("tau0.2-window0.5-nodrop", 16, {"tau": 0.2, "every": 5, "window": 0.5,
                                     "max_drop": NO_ROLLBACK}),
    ("full", 4, {"analyze_order": True}),
    ("fixed-4", 4, {"dims": [4]}),
    ("tau0.1-window0.5", 4, {"tau": 0.1, "every": 5, "window": 0.5}),
    ("tau0.2-window0.5-nodrop", 4, {"tau": 0.2, "every": 5, "window": 0.5,
                                    "max_drop": NO_ROLLBACK}),
    # input-weighted HSVs (--weighting input): the same schedules
    ("w-tau0.04", 16, {"tau": 0.04, "every": 5, "weighting": "input"}),
    ("w-tau0.1-window0.5", 16, {"tau": 0.1, "every": 5, "window": 0.5, "weighting": "input"}),
    ("w-tau0.1-window0.5-drop0.5", 16, {"tau": 0.1, "every": 5, "window": 0.5,
                                        "weighting": "input", "max_drop": 0.5}),
    ("w-tau0.2-window0.5-nodrop", 16, {"tau": 0.2, "every": 5, "window": 0.5,
                                       "weighting": "input", "max_drop": NO_ROLLBACK}),
    ("w-tau0.1-window0.5", 4, {"tau": 0.1, "every": 5, "window": 0.5, "weighting": "input"}),
    ("w-tau0.2-window0.5-nodrop", 4, {"tau": 0.2, "every": 5, "window": 0.5,
                                      "weighting": "input", "max_drop": NO_ROLLBACK}),
]


def _order_jobs(seeds, steps):
    jobs = []
    for seed in seeds:
        for method, hidden, extra in ORDER_SETTINGS:
            net = {"blocks": 1, "hidden": hidden, "state": 256, "batch": 32}
            jobs.append({"dataset": "lti-sysid", "group": "order", "net": net, "steps": steps,
                         "eval_every": 50, "seed": seed, "method": method, **extra})
    return jobs


VS_SCRATCH = (("tau0.1-every5", {"tau": 0.1, "every": 5}),
              ("w-tau0.1-every5", {"tau": 0.1, "every": 5, "weighting": "input"}))


def _vs_scratch_jobs(seeds, steps):
    base = {"dataset": "mnist1d", "group": "vs-scratch", "net": DEFAULT_NET, "steps": steps,
            "eval_every": 100}
    return [{**base, "seed": seed, "method": method, **extra}
            for seed in seeds for method, extra in VS_SCRATCH]


def _scratch_job(r):
    """Small-from-scratch at the final widths of a finished mnist1d reduction run, or None."""
    if r["group"] == "vs-scratch" and "tau" in r:
        method = "scratch-" + r["method"]
    elif r["group"] == "mnist1d" and r["method"] in ("tau0.04-every5", "tau0.04-evals"):
        method = "scratch-" + r["method"].split("-", 1)[1]
    else:
        return None
    return {"dataset": r["dataset"], "group": r["group"], "net": r["net"], "steps": r["steps"],
            "eval_every": r["eval_every"], "seed": r["seed"], "method": method,
            "dims": r["final_dims"]}


def _pool_map(jobs, workers, follow_up):
    """Run ``jobs``; a finished run's ``follow_up(result)`` job (if any) is queued at once."""
    import queue

    ctx = mp.get_context("spawn")
    done: queue.Queue = queue.Queue()
    results = []
    with ctx.Pool(workers) as pool:
        def submit(job):
            pool.apply_async(_run, (job,), callback=done.put, error_callback=done.put)

        for job in jobs:
            submit(job)
        pending = len(jobs)
        while pending:
            r = done.get()
            pending -= 1
            if isinstance(r, BaseException):
                raise r
            print(f"[{len(results) + 1}] {r['group']} seed={r['seed']} {r['method']} "
                  f"H={r['net']['hidden']}: test={r['test']:.4g} dims={r['final_dims']} "
                  f"train={r['train_time_s']:.1f}s fit={r['fit_wall_s']:.1f}s "
                  f"actions={r['actions']} load={r['load_avg_1m']:.1f}", flush=True)
            results.append(r)
            extra = follow_up(r)
            if extra is not None:
                submit(extra)
                pending += 1
    return results


# --------------------------------------------------------------------------------- reports


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _ms(values) -> str:
    m, sd = mean_std(values)
    return f"{m:.3g} ± {sd:.2g}"


def _pct(values) -> str:
    m, sd = mean_std([100 * v for v in values])
    return f"{m:.2f} ± {sd:.2f}"


def _share_runs(results):
    """The seeds of each share run (group, method), in table order; empty ones skipped."""
    for group in ("mnist1d", "lti-share"):
        for method in ("tau0.04-every5", "tau0.04-evals", "tau0.04-evals50"):
            sel = [r for r in results if r["group"] == group and r["method"] == method]
            if sel:
                yield sel


def _share_md(results) -> str:
    from compressm_tune._table import markdown_table

    rows = []
    for sel in _share_runs(results):

        def part(r, names):
            return sum(r["phase_s"].get(p, 0.0) for p in names)

        def core(r):
            return part(r, CORE[:-1]) + r["phase_s"].get("attempt", 0.0)

        rows.append([
            f"{sel[0]['dataset']} {sel[0]['method']}", len(sel), sel[0]["steps"],
            _ms([r["fit_wall_s"] for r in sel]),
            sum(r["actions"].get("cut", 0) for r in sel) / len(sel),
            sum(r["actions"].get("rollback", 0) for r in sel) / len(sel),
            _pct([core(r) / r["fit_wall_s"] for r in sel]),
            _pct([part(r, SAFETY) / r["fit_wall_s"] for r in sel]),
            _pct([(core(r) + part(r, SAFETY)) / r["fit_wall_s"] for r in sel]),
            _pct([part(r, CAUSED) / r["fit_wall_s"] for r in sel]),
            _pct([(core(r) + part(r, SAFETY) + part(r, CAUSED)) / r["fit_wall_s"]
                  for r in sel]),
        ])
    table = markdown_table(
        ["run", "seeds", "steps", "fit wall s", "cuts/run", "rollbacks/run",
         "core % (HSV+plan+truncate+optimizer)", "safety net % (pre-cut ckpt+validate+restore)",
         "Reducer total %", "caused in trainer % (re-validate, extra evals)",
         "all reduction-caused %"], rows)
    detail_rows = []
    phases = CORE[:-1] + SAFETY + CAUSED
    for group in ("mnist1d", "lti-share"):
        for method in ("tau0.04-every5", "tau0.04-evals", "tau0.04-evals50"):
            sel = [r for r in results if r["group"] == group and r["method"] == method]
            if not sel:
                continue
            cells = [f"{sel[0]['dataset']} {sel[0]['method']}"]
            for p in phases:
                ms = [1e3 * r["phase_s"].get(p, 0.0) / max(1, r["phase_n"].get(p, 0))
                      for r in sel]
                n = mean_std([r["phase_n"].get(p, 0) for r in sel])[0]
                cells.append(f"{mean_std(ms)[0]:.0f} ms × {n:.0f}" if n else "-")
            other_ms = mean_std([1e3 * r["phase_s"].get("attempt", 0.0) for r in sel])[0]
            cells.append(f"{other_ms:.0f} ms")
            detail_rows.append(cells)
    detail = markdown_table(["run"] + [f"{p} (mean per call × calls)" for p in phases]
                            + ["attempt other (total)"], detail_rows)
    return table + "\n\nPer-call cost of each phase (means over seeds):\n\n" + detail


def _cutting_attempts(r: dict[str, Any]) -> int:
    """Attempts that changed some width or rolled back (at most the number of attempts)."""
    prev = r.get("dims") or [r["net"]["state"]] * r["net"]["blocks"]
    changed = 0
    for _, dims in r.get("dims_trajectory", []):
        changed += dims != prev
        prev = dims
    return min(r["phase_n"].get("attempt", 0), changed + r["actions"].get("rollback", 0))


def _share_fix_md(results) -> str:
    """Shares re-costed from this run's per-call times under alternative designs (estimates)."""
    from compressm_tune._table import markdown_table

    rows = []
    for sel in _share_runs(results):
        measured, once, lean, core = [], [], [], []
        for r in sel:
            ph, n = r["phase_s"], r["phase_n"]

            def per_call(name, ph=ph, n=n):
                return ph.get(name, 0.0) / max(1, n.get(name, 0))

            core_s = sum(ph.get(p, 0.0) for p in ("hsv", "plan", "truncate", "optimizer",
                                                  "attempt"))
            k = _cutting_attempts(r)
            safety_once = k * (per_call("safety_validate") + per_call("checkpoint")) + ph.get(
                "restore", 0.0)
            caused = sum(ph.get(p, 0.0) for p in CAUSED)
            total = core_s + sum(ph.get(p, 0.0) for p in SAFETY) + caused
            wall = r["fit_wall_s"]
            measured.append(total / wall)
            once.append((core_s + safety_once + caused) / wall)
            lean.append((core_s + safety_once + k * per_call("safety_validate")) / wall)
            core.append(core_s / wall)
        rows.append([f"{sel[0]['dataset']} {sel[0]['method']}",
                     f"{mean_std([_cutting_attempts(r) for r in sel])[0]:.0f}",
                     _pct(measured), _pct(once), _pct(lean), _pct(core)])
    return markdown_table(
        ["run", "attempts that cut or roll back", "measured (all reduction-caused) %",
         "A: one safety validation + checkpoint per cutting attempt %",
         "B: A, and no re-validation / extra eval points (2 validations per cutting attempt) %",
         "core alone (HSV + truncation + optimizer) %"], rows)


def _share_reading(results) -> str:
    """The figures that matter, in words (from this run's results)."""
    lines = ["## Reading it", ""]
    for group, method in (("mnist1d", "tau0.04-every5"), ("mnist1d", "tau0.04-evals"),
                          ("lti-share", "tau0.04-every5"), ("lti-share", "tau0.04-evals")):
        sel = [r for r in results if r["group"] == group and r["method"] == method]
        if not sel:
            continue

        def share(names, sel=sel):
            return mean_std([100 * sum(r["phase_s"].get(p, 0.0) for p in names)
                             / r["fit_wall_s"] for r in sel])

        val = share(("safety_validate", "post_validate", "cadence_eval"))
        core = share(("hsv", "plan", "truncate", "optimizer", "attempt"))
        total = share(CORE[:-1] + ("attempt",) + SAFETY + CAUSED)
        n_val = mean_std([r["phase_n"].get("safety_validate", 0) for r in sel])[0]
        n_att = mean_std([r["phase_n"].get("attempt", 0) for r in sel])[0]
        lines.append(
            f"- {sel[0]['dataset']} {sel[0]['method']} ({len(sel)} seed(s), {n_att:.0f} attempts, "
            f"{n_val:.0f} safety validations per run): everything reduction causes is "
            f"{total[0]:.1f} ± {total[1]:.1f}% of the fit wall time; whole-split validation "
            f"passes (safety net, re-validation, extra evaluation points) are "
            f"{val[0]:.1f} ± {val[1]:.1f}%, HSVs + truncation + optimizer rebuild "
            f"{core[0]:.1f} ± {core[1]:.1f}%.")
    return "\n".join(lines)


def _compression_reading(results) -> str:
    rows = [r for r in results if r["group"] == "mnist1d"]
    lines = ["## Reading it", ""]
    for method in ("tau0.04-every5", "tau0.04-evals"):
        sel = [r for r in rows if r["method"] == method]
        if not sel:
            continue
        shrink = []
        for r in sel:  # width kept per attempt, while every layer was still being cut
            traj = [d for _, d in r["dims_trajectory"]]
            for a, b in zip(traj, traj[1:], strict=False):
                if all(y < x for x, y in zip(a, b, strict=True)):
                    shrink.append(sum(b) / sum(a))
        frozen = sum(r["actions"].get("rollback", 0) for r in sel)
        text = (f"- {method}: {mean_std([r['phase_n'].get('attempt', 0) for r in sel])[0]:.0f} "
                f"attempts per run; {frozen} rollbacks in {len(sel)} runs (each freezes its "
                "layer for the rest of the window)")
        if shrink:
            text += (f"; while all layers were still cut, an attempt kept "
                     f"{100 * mean_std(shrink)[0]:.0f} ± {100 * mean_std(shrink)[1]:.0f}% of "
                     "the states (tau applies per attempt, so the cut compounds with the "
                     "number of attempts)")
        lines.append(text + ".")
    return "\n".join(lines)


def _order_reading(results) -> str:
    rows = [r for r in results if r["group"] == "order"]
    full = [r for r in rows if r["method"] == "full" and "top_modes_abs" in r]
    lines = ["## Reading it", ""]
    if full:
        tops = [v for r in full for v in r["top_modes_abs"]]
        lines.append(
            f"- The true poles have |p| in {min(full[0]['true_pole_abs']):.2f}-"
            f"{max(full[0]['true_pole_abs']):.2f}; the 8 modes with the largest Hankel score in "
            f"the trained full layers have |lambda| {min(tops):.3f}-{max(tops):.3f} (the init "
            "ring is [0.9, 0.999]): the HSV ranking is led by slow near-unit-circle modes, not "
            "by modes at the system's poles, and the spectrum has no knee (top-4 share of the "
            "HSV sum: " + ", ".join(f"{r['hsv_share']['4']:.2f}" for r in full) + ").")
    kept = [r for r in rows if "tau" in r and r["actions"].get("rollback", 0)]
    if kept:
        lines.append(
            f"- With the safety net (max-drop 0.02), {len(kept)} of "
            f"{sum('tau' in r for r in rows)} reduction runs were stopped by a rollback "
            f"(which freezes the only layer); their final N: "
            f"{min(r['final_dims'][0] for r in kept)}-{max(r['final_dims'][0] for r in kept)}.")
    weighted = [r for r in rows if r.get("weighting") == "input" and "drop" not in r["method"]]
    unweighted = [r for r in rows if "tau" in r and r.get("weighting", "none") == "none"
                  and "nodrop" not in r["method"]]
    if weighted and unweighted:
        def span(sel):
            ns = [r["final_dims"][0] for r in sel]
            return (f"N={min(ns)}-{max(ns)}, test MSE {min(r['test'] for r in sel):.1e}-"
                    f"{max(r['test'] for r in sel):.1e}")
        lines.append(
            f"- Input-weighted HSVs (`--weighting input`, the *w-* rows), with a safety net: "
            f"{span(weighted)}; the same schedules unweighted: {span(unweighted)}. The "
            "layer's input is the 1-D signal spread over H channels by the encoder, so the "
            "unweighted Gramian counts H-1 input directions the data never excites.")
    loose = [r for r in rows if "drop0.5" in r["method"]]
    if loose:
        lines.append(
            "- Input-weighted with a looser safety net (max-drop 0.5): N=" +
            "; ".join(str(r["final_dims"][0]) for r in loose) + ", test MSE " +
            "; ".join(f"{r['test']:.1e}" for r in loose) + ".")
    for r in full:
        if "post_trunc_weighted" in r:
            lines.append(
                f"- Full model (H={r['net']['hidden']}, seed {r['seed']}) truncated after "
                "training without fine-tuning, to 4 / 8 / 16 states: unweighted MSE " +
                " / ".join(f"{r['post_trunc'][k]:.2g}" for k in ("4", "8", "16")) +
                ", input-weighted " +
                " / ".join(f"{r['post_trunc_weighted'][k]:.2g}" for k in ("4", "8", "16")) +
                f" (full: {r['test']:.2g}).")
    nodrops = [r for r in rows if "nodrop" in r["method"]]
    for label, nodrop in (("", [r for r in nodrops if r.get("weighting", "none") == "none"]),
                          (" (input-weighted)", [r for r in nodrops
                                                 if r.get("weighting") == "input"])):
        if not nodrop:
            continue
        ns = [r["final_dims"][0] for r in nodrop]
        cuts = [c for r in nodrop for c in r.get("cut_log", []) if c[4] == "cut"]
        lines.append(
            f"- Without it{label}, tau=0.2 over a 50% window cuts to N={min(ns)}-{max(ns)} "
            f"with test MSE {min(r['test'] for r in nodrop):.2f}-"
            f"{max(r['test'] for r in nodrop):.2f} (predicting 0 scores ~1). Every cut falls in "
            "steps "
            f"{min(c[0] for c in cuts)}-{max(c[0] for c in cuts)}, at validation MSE "
            f"{min(c[5] for c in cuts):.2f}-{max(c[5] for c in cuts):.2f}: before the model "
            "has learned the system, so the HSVs describe the initialization.")
    return "\n".join(lines)


def _compression_md(results, step_ms=None) -> str:
    from compressm_tune._table import markdown_table

    rows = [r for r in results if r["group"] == "mnist1d"]
    full = {r["seed"]: r for r in rows if r["method"] == "full"}
    out = []
    for method in ("full", "tau0.04-every5", "tau0.04-evals", "tau0.04-evals50",
                   "scratch-every5", "scratch-evals"):
        sel = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seed"])
        if not sel:
            continue
        acc = mean_std([100 * r["test"] for r in sel])
        last = mean_std([100 * r["test_last"] for r in sel])
        gap = mean_std([100 * (full[r["seed"]]["test"] - r["test"]) for r in sel])
        ratio = mean_std([full[r["seed"]]["train_time_s"] / r["train_time_s"] for r in sel])
        wall_ratio = mean_std([full[r["seed"]]["fit_wall_s"] / r["fit_wall_s"] for r in sel])
        model_cells = []
        if step_ms:
            import numpy as np

            ns = np.array([int(k) for k in step_ms], dtype=float)
            ts = np.array(list(step_ms.values()))
            steady = mean_std([step_ms[str(r["net"]["state"])]
                               / float(np.mean(np.interp(r["final_dims"], ns, ts)))
                               for r in sel])
            modelled = mean_std([_modelled_train_s(full[r["seed"]], step_ms)
                                 / (_modelled_train_s(r, step_ms) * (1 + _reduction_s(r)
                                                                     / r["steps_s"]))
                                 for r in sel])
            model_cells = [f"{steady[0]:.2f} ± {steady[1]:.2f}x",
                           f"{modelled[0]:.2f} ± {modelled[1]:.2f}x"]
        out.append([
            method, f"{acc[0]:.2f} ± {acc[1]:.2f} [{min(100 * r['test'] for r in sel):.1f}, "
            f"{max(100 * r['test'] for r in sel):.1f}]", f"{last[0]:.2f} ± {last[1]:.2f}",
            f"{gap[0]:+.2f} ± {gap[1]:.2f}",
            "; ".join(",".join(map(str, r["final_dims"])) for r in sel),
            "; ".join(f"{r['actions'].get('cut', 0)}/{r['actions'].get('rollback', 0)}/"
                      f"{max([c[0] for c in r.get('cut_log', []) if c[4] == 'cut'], default='-')}"
                      for r in sel) if "tau" in sel[0] else "-",
            _ms([r["train_time_s"] for r in sel]), f"{ratio[0]:.2f} ± {ratio[1]:.2f}x",
            f"{wall_ratio[0]:.2f} ± {wall_ratio[1]:.2f}x", *model_cells,
        ])
    headers = ["method", "test acc % best ckpt (mean ± sd [min, max])", "test acc % last",
               "points lost vs full (paired)", "final dims per seed",
               "cuts / rollbacks / step of last cut, per seed", "train time s (loaded)",
               "speed-up (train time, loaded)", "speed-up (fit wall incl. evals, loaded)"]
    if step_ms:
        headers += ["step-time speed-up at final widths (interleaved)",
                    "modelled train-time speed-up (interleaved step times along this run's "
                    "widths, plus its reduction overhead)"]
    return markdown_table(headers, out)


def _vs_md(results) -> str:
    """Per reduction method: its accuracy, the scratch model's at the same widths, and the
    paired difference per seed."""
    from compressm_tune._table import markdown_table

    out, reading = [], ["## Reading it", ""]
    for method, _ in VS_SCRATCH:
        ours = {r["seed"]: r for r in results if r["method"] == method}
        theirs = {r["seed"]: r for r in results if r["method"] == "scratch-" + method}
        seeds = sorted(set(ours) & set(theirs))
        if not seeds:
            continue
        diff = [100 * (ours[s]["test"] - theirs[s]["test"]) for s in seeds]
        out.append([
            method, len(seeds), _pct([ours[s]["test"] for s in seeds]),
            _pct([theirs[s]["test"] for s in seeds]),
            " / ".join(f"{d:+.2f}" for d in diff), f"{mean_std(diff)[0]:+.2f}",
            "; ".join(",".join(map(str, ours[s]["final_dims"])) for s in seeds),
            _ms([ours[s]["train_time_s"] for s in seeds]),
            _ms([theirs[s]["train_time_s"] for s in seeds]),
        ])
        wins = sum(d > 0 for d in diff)
        reading.append(
            f"- {method}: CompreSSM {mean_std([100 * ours[s]['test'] for s in seeds])[0]:.2f}% "
            f"vs scratch {mean_std([100 * theirs[s]['test'] for s in seeds])[0]:.2f}% at the "
            f"same widths; ahead in {wins} of {len(seeds)} seeds, by "
            f"{mean_std(diff)[0]:+.2f} ± {mean_std(diff)[1]:.2f} points.")
    table = markdown_table(
        ["method", "seeds", "CompreSSM test acc %", "scratch at its final widths %",
         "difference per seed (points)", "mean difference", "final widths per seed",
         "CompreSSM train s", "scratch train s"], out)
    return table + "\n\n" + "\n".join(reading)


def _reduction_s(r: dict[str, Any]) -> float:
    """Seconds spent in or because of reduction in a run (all phases but eval/summarize)."""
    return sum(r["phase_s"].get(p, 0.0) for p in CORE[:-1] + ("attempt",) + SAFETY + CAUSED)


def _order_md(results) -> str:
    from compressm_tune._table import markdown_table

    rows = [r for r in results if r["group"] == "order"]
    out = []
    for method, hidden, _ in ORDER_SETTINGS:
        sel = sorted((r for r in rows if r["method"] == method and r["net"]["hidden"] == hidden),
                     key=lambda r: r["seed"])
        if not sel:
            continue
        mse = mean_std([r["test"] for r in sel])
        extra = ""
        cuts = [c for r in sel for c in r.get("cut_log", []) if c[4] == "cut"]
        when = (f"steps {min(c[0] for c in cuts)}-{max(c[0] for c in cuts)}, val MSE "
                f"{min(c[5] for c in cuts):.2f}-{max(c[5] for c in cuts):.2f}") if cuts else "-"
        for suffix, label in (("", "unweighted"), ("_weighted", "input-weighted")):
            if "post_trunc" + suffix not in sel[0]:
                continue
            extra += f"{'; ' if extra else ''}{label}: " + ", ".join(
                f"r={k}: {mean_std([r['post_trunc' + suffix][k] for r in sel])[0]:.2e}"
                for k in sel[0]["post_trunc" + suffix])
            extra += ", HSV share of top 4/8: " + "/".join(
                f"{mean_std([r['hsv_share' + suffix][k] for r in sel])[0]:.2f}"
                for k in ("4", "8"))
        if "top_modes_abs" in sel[0]:
            tops = [v for r in sel for v in r["top_modes_abs"]]
            extra += f"; |lambda| of the 8 top-scored modes: {min(tops):.3f}-{max(tops):.3f}"
        out.append([
            method, hidden, f"{mse[0]:.2e} ± {mse[1]:.1e}",
            "; ".join(str(r["final_dims"][0]) for r in sel),
            f"{mean_std([r['final_dims'][0] for r in sel])[0]:.0f}",
            "/".join(f"{r['actions'].get('cut', 0)}c{r['actions'].get('rollback', 0)}r"
                     for r in sel) if "tau" in sel[0] else "-",
            when, _ms([r["train_time_s"] for r in sel]), extra or "-",
        ])
    return markdown_table(
        ["method", "H", "test MSE (mean ± sd)", "final N per seed",
         f"mean N (true: {TRUE_COMPLEX_ORDER} complex)", "cuts c / rollbacks r per seed",
         "when the cuts happened (val MSE before each)", "train time s",
         "full model: post-training truncation test MSE (no fine-tune)"], out)


def _plot_compression(results, path, step_ms=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["group"] == "mnist1d"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    methods = ("full", "tau0.04-every5", "tau0.04-evals", "tau0.04-evals50", "scratch-every5",
               "scratch-evals")
    for i, method in enumerate(methods):
        sel = [r for r in rows if r["method"] == method]
        if sel:
            x = ([_modelled_train_s(r, step_ms) * (1 + _reduction_s(r) / r["steps_s"])
                  for r in sel] if step_ms else [r["train_time_s"] for r in sel])
            ax.scatter(x, [100 * r["test"] for r in sel], label=method, marker="os^Dv<"[i],
                       color=plt.cm.tab10(i))
    xlabel = ("modelled train time s (interleaved step times, 1 thread)" if step_ms
              else "train time s (1 thread, 2 runs in parallel)")
    ax.set(xlabel=xlabel, ylabel="test accuracy %",
           title="mnist1d, default network, 1500 steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_order(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["group"] == "order"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (method, hidden, _) in enumerate(ORDER_SETTINGS):
        sel = [r for r in rows if r["method"] == method and r["net"]["hidden"] == hidden]
        if sel:
            ax.scatter([r["final_dims"][0] for r in sel], [r["test"] for r in sel],
                       label=f"{method} H={hidden}", color=plt.cm.tab20(i / len(ORDER_SETTINGS)),
                       marker="os^Dv<>"[i % 7])
    ax.axvline(TRUE_COMPLEX_ORDER, color="k", ls="--", lw=1, label="true order (complex)")
    ax.set(xscale="log", yscale="log", xlabel="final N (complex states)", ylabel="test MSE",
           title="lti-sysid, 1 block")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


STEP_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 228, 256)


def _step_times(net: dict[str, int], repeats: int = 3, steps: int = 12) -> dict[str, float]:
    """Median ms per training step of the mnist1d network at uniform widths ``STEP_GRID``.

    One thread; the widths are interleaved within each round, so load drifts hit all alike.
    """
    import torch
    import torch.nn.functional as F

    from compressm_tune.data import load_dataset
    from compressm_tune.models import SSMConfig, SSMModel
    from compressm_tune.training.optim import build_optimizer

    torch.set_num_threads(1)
    data = load_dataset("mnist1d", seed=0)
    x, y = data.x_train[:net["batch"]], data.y_train[:net["batch"]]
    setups = {}
    for n in STEP_GRID:
        model = SSMModel(SSMConfig(d_input=1, d_output=10, d_model=net["hidden"],
                                   state_dims=[n] * net["blocks"]))
        setups[n] = (model, build_optimizer(model, 3e-3, 0.05, 0.5))
    times: dict[int, list[float]] = defaultdict(list)
    for round_ in range(repeats + 1):  # round 0 warms up
        for n, (model, opt) in setups.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if round_:
                times[n].append(1e3 * (time.perf_counter() - t0) / steps)
    import numpy as np

    return {str(n): float(np.median(v)) for n, v in times.items()}


def _modelled_train_s(r: dict[str, Any], grid: dict[str, float]) -> float:
    """Step time of a run from the interleaved grid and its width trajectory, in seconds.

    A step at widths ``(N_1..N_k)`` costs the mean over layers of the uniform-width step time
    at ``N_i`` (linear interpolation on the grid); a cut at an evaluation after step ``t``
    applies from step ``t`` on.
    """
    import numpy as np

    ns = np.array([int(k) for k in grid], dtype=float)
    ts = np.array(list(grid.values()))
    initial = r.get("dims") or [r["net"]["state"]] * r["net"]["blocks"]
    changes = {step: dims for step, dims in r.get("dims_trajectory", [])}
    dims, total = initial, 0.0
    for step in range(r["steps"]):
        dims = changes.get(step, dims)
        total += float(np.mean(np.interp(dims, ns, ts))) / 1e3
    return total


def _report(results, meta, groups, prefix="", only=None):
    """Write the outputs of ``groups`` (``only``: just that one file's)."""
    steps = meta["steps"]
    commit = meta.get("code_commit") or meta["machine"]["git_commit"]
    head = (f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, torch "
            f"{meta['machine']['torch']}, numpy {meta['machine']['numpy']}, python "
            f"{meta['machine']['python']}; code: commit {commit} ({meta['code']}); one torch "
            f"thread per run, {meta['workers']} runs in parallel; wall time "
            f"{meta['wall_s'] / 60:.1f} min. The machine was shared with other jobs: `uptime` "
            f"before: `{meta['uptime_before']}`; after: `{meta['uptime_after']}`; 1-min load "
            "at the end of each run is in the JSON (`load_avg_1m`). Reproduce: "
            "`python benchmarks/bench_reduction_share.py --snapshot`.")
    if ("mnist1d" in groups or "lti-share" in groups) and only in (None, "reduction_share"):
        sel = [r for r in results if r["group"] in ("mnist1d", "lti-share")]
        md = ["# In-training reduction: share of training time, measured in real runs", "",
              head, "", _SHARE_NOTES.format(m=steps.get("mnist1d"), lti=steps.get("lti-share"),
                                            lti_eval=max(1, steps.get("lti-share", 10) // 10)),
              "", _share_md(sel), "", _SHARE_FIX_NOTES, "", _share_fix_md(sel), "",
              _share_reading(sel)]
        write(prefix + "reduction_share", {**meta, "results": sel}, "\n".join(md))
    if (any(r["group"] == "mnist1d" and r["method"] == "full" for r in results)
            and only in (None, "compression_default")):
        sel = [r for r in results if r["group"] == "mnist1d"]
        md = ["# CompreSSM on mnist1d with the default network at the default length", "",
              head, "", _COMPRESSION_NOTES.format(steps=steps.get("mnist1d")), "",
              _compression_md(sel, meta.get("step_ms"))]
        if meta.get("step_ms"):
            md += ["", _STEP_NOTES.format(
                grid=", ".join(f"N={k}: {v:.0f}" for k, v in meta["step_ms"].items()),
                uptime=meta.get("step_uptime", "?"))]
        md += ["", _compression_reading(sel)]
        write(prefix + "compression_default", {**meta, "results": sel}, "\n".join(md))
        _plot_compression(sel, RESULTS / f"{prefix}compression_default.png", meta.get("step_ms"))
    if "vs-scratch" in groups and only in (None, "compression_vs_scratch"):
        sel = [r for r in results if r["group"] == "vs-scratch"]
        md = ["# CompreSSM vs small-from-scratch at the same widths, harder compression", "",
              head, "", _VS_NOTES.format(steps=steps.get("mnist1d")), "", _vs_md(sel)]
        write(prefix + "compression_vs_scratch", {**meta, "results": sel}, "\n".join(md))
    if "order" in groups and only in (None, "sysid_order"):
        sel = [r for r in results if r["group"] == "order"]
        md = ["# lti-sysid: does the final width land near the true order?", "", head, "",
              _ORDER_NOTES.format(steps=steps.get("order")), "", _order_md(sel), "",
              _order_reading(sel)]
        write(prefix + "sysid_order", {**meta, "results": sel}, "\n".join(md))
        _plot_order(sel, RESULTS / f"{prefix}sysid_order.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", default=",".join(GROUPS))
    ap.add_argument("--seeds", type=int, default=3, help="seeds for mnist1d (3)")
    ap.add_argument("--lti-seeds", type=int, default=1, help="seeds for lti-share (1)")
    ap.add_argument("--order-seeds", type=int, default=2, help="seeds for order (2)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", default=None,
                    help="training steps per group (mnist1d=1500,lti-share=300,order=1000; "
                         "--quick: 40,30,30)")
    ap.add_argument("--extra", action="store_true",
                    help="mnist1d: also tau=0.04 at evaluations every 50 steps")
    ap.add_argument("--no-scratch", dest="scratch", action="store_false",
                    help="mnist1d: skip small-from-scratch at the final widths")
    ap.add_argument("--methods", default=None,
                    help="run only these methods (comma-separated, e.g. tau0.04-every5); "
                         "compression_default is rewritten only when 'full' runs")
    ap.add_argument("--quick", action="store_true", help="a few steps: smoke test only")
    ap.add_argument("--snapshot", action="store_true",
                    help="run the package as committed at HEAD (not the working tree)")
    ap.add_argument("--render", action="store_true",
                    help="rewrite the Markdown/PNG from the JSON in bench_results (no training)")
    ap.add_argument("--step-times", action="store_true",
                    help="with --render: (re)measure the interleaved step-time grid")
    args = ap.parse_args()
    groups = args.groups.split(",")
    prefix = "quick_" if args.quick else ""
    if args.render:  # each file from its own JSON, with the meta of the run that wrote it
        for name in ("reduction_share", "compression_default", "sysid_order",
                     "compression_vs_scratch"):
            path = RESULTS / f"{prefix}{name}.json"
            if not path.exists():
                continue
            payload = json.loads(path.read_text())
            meta = {k: v for k, v in payload.items() if k != "results"}
            results = payload["results"]
            if name == "compression_default" and (args.step_times or not meta.get("step_ms")):
                meta["step_uptime"] = _uptime()
                meta["step_ms"] = _step_times(DEFAULT_NET)
            _report(results, meta, sorted({r["group"] for r in results}), prefix, only=name)
        return
    code_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True, cwd=RESULTS.parent).stdout.strip()
    if args.snapshot:
        os.environ["BENCH_CODE"] = _snapshot()
    steps = ({"mnist1d": 40, "lti-share": 30, "order": 30} if args.quick
             else {"mnist1d": 1500, "lti-share": 300, "order": 1000})
    if args.steps:
        steps.update({k: int(v) for k, v in (kv.split("=") for kv in args.steps.split(","))})
    uptime_before, t0 = _uptime(), time.time()
    jobs = []
    if "order" in groups:
        jobs += _order_jobs(range(args.order_seeds), steps["order"])
    if "lti-share" in groups:
        jobs += _lti_share_jobs(range(args.lti_seeds), steps["lti-share"])
    if "vs-scratch" in groups:
        jobs = _vs_scratch_jobs(range(args.seeds), steps["mnist1d"]) + jobs
    if "mnist1d" in groups:
        jobs = _mnist_jobs(range(args.seeds), steps["mnist1d"], args.extra) + jobs  # longest first
    if args.methods:
        jobs = [j for j in jobs if j["method"] in args.methods.split(",")]
    if args.quick:  # evaluations (and so the paper-schedule attempts) inside the short window
        for j in jobs:
            j["eval_every"] = 2
    results = _pool_map(jobs, args.workers,
                        _scratch_job if args.scratch else (lambda r: None))
    wall = time.time() - t0
    meta = {"machine": machine(), "uptime_before": uptime_before, "uptime_after": _uptime(),
            "wall_s": wall, "workers": args.workers, "quick": args.quick,
            "code": "HEAD (snapshot)" if args.snapshot else "working tree",
            "code_commit": code_commit, "steps": steps}
    if any(r["group"] == "mnist1d" and r["method"] == "full" for r in results):
        meta["step_uptime"] = _uptime()
        meta["step_ms"] = _step_times(DEFAULT_NET, repeats=1 if args.quick else 3)
    _report(results, meta, groups, prefix)


_SHARE_NOTES = """\
Shares are of the wall time of `Trainer.fit()` (training steps, evaluations, checkpoints and
reduction; the final test evaluation excluded), mean ± sd over seeds. *core*: inside
`Reducer.attempt`, HSVs (`layer_hsv`), rank choice, balanced truncation + re-diagonalization
(`truncate_layer`), optimizer rebuild + moment carry-over, and the rest of `attempt`.
*safety net*: the pre-cut checkpoint (`pre_cut.pt`, full training state), validation after
each cut (whole validation split) and rollbacks. *caused in trainer*: work outside the Reducer
that exists only because of reduction: the trainer's re-validation after each attempt, the
extra evaluation points of an `every` cadence (validate + `last.pt`/`best.pt`), and the window
close. mnist1d runs: {m} steps, eval every 100, window 10%; lti-share runs (the default network
on lti-sysid, L=200): {lti} steps, eval every {lti_eval} (so that one evaluation falls inside the
10% window; at the default 100 none would)."""

_SHARE_FIX_NOTES = """\
The same runs re-costed with their own measured per-call times (estimates, not measured runs).
*A*: the safety net validates (and checkpoints) once per attempt that cuts, after cutting every
layer that wants to (rolling back on a failed check). *B*: A, and the trainer neither
re-validates after an attempt nor evaluates/saves at the extra `every` points; a cutting
attempt pays two validations (before and after). The code measured in runs from commit 390a941
on does B (earlier runs validated once per layer cut and re-validated in the trainer), so there
the measured column should match B: a check of the accounting. *core alone*: the floor if the
safety net were free."""

_STEP_NOTES = """\
The loaded train times above drift with the machine's load (the runs of one seed ran at
different times), so the last two columns take step times from an interleaved measurement after
the runs: the mnist1d default network, batch 64, one thread, each uniform width timed for 12
steps per round, widths interleaved, median of 3 rounds (ms per step: {grid}; `uptime`:
`{uptime}`). A step at mixed widths costs the mean over layers of the uniform-width step times.
*Modelled train-time speed-up*: full run's modelled step time / (this run's modelled step time
along its recorded width trajectory × (1 + its measured reduction-caused time / its measured
step time)), paired by seed: the reduction overhead is carried over as the fraction of step
time it took in the loaded run."""

_COMPRESSION_NOTES = """\
Default network (4 blocks, H=64, N=256, dropout 0.1), default training ({steps} steps, batch 64,
lr 3e-3, 10% warm-up + cosine, eval every 100), tau=0.04, window 10%, max-drop 0.02, moments
reset. *every5*: attempts every 5 steps inside the window (as `compression.md`);
*evals*: attempts only at evaluations inside the window (the paper's schedule; at eval every
100 that is the single evaluation at step 100); `--extra` adds *evals50*, the same with eval
every 50 (attempts at steps 50, 100, 150). *scratch-X*: trained from scratch at the final widths of
tau0.04-X, same seed. Test accuracy at the best validation checkpoint of the final widths (as
`compression.md`); "last" is the final model. Points lost and speed-ups are paired by seed
(full / method), mean ± sd. Train time excludes evaluation and includes reduction."""

_VS_NOTES = """\
mnist1d, the default network (4 blocks, H=64, N=256 at start, batch 64), {steps} steps, eval every
100, window 10%, attempts every 5 steps in the window, tau=0.1 (2.5x the default), max-drop 0.02;
*w-*: input-weighted HSVs (`--weighting input`). Scratch: the same network trained from the
start at the CompreSSM run's final widths, same seed, same steps. Test accuracy of the best
validation checkpoint. Train time: `train_time_s` (steps and reduction, on a shared machine)."""


_ORDER_NOTES = """\
lti-sysid: white noise through a fixed real system of order 8 (4 complex-conjugate pole pairs,
moduli 0.6-0.95), output noise std 0.01 (MSE floor 1e-4; predicting 0 gives ~1). An LRU layer
outputs Re(C x) with complex diagonal states, so one complex state realizes one conjugate pair:
the true order in LRU states is 4. Network: 1 block (N=256 at start), no pooling, H as listed,
{steps} steps, batch 32, dropout 0 (`train`'s default for regression; before 2026-12-05 0.1), eval
every 50, window 10% unless stated, attempts every 5 steps in the
window, max-drop 0.02 (relative loss increase) unless *nodrop* (no rollback) or *drop0.5*; *w-*:
input-weighted HSVs (`--weighting input`), the others unweighted (the paper's). *fixed-k*: trained
at N=k from the start. For the full model, the columns on the right give the test MSE after
truncating its best checkpoint to 4, 8, 16 states (no fine-tune) and the share of the HSV sum
held by its top 4 / 8 HSVs (tau = 1 - that share would cut to that width)."""


if __name__ == "__main__":
    main()
