"""The quickstart job as a user runs it: several seeds, then several relative budgets.

Each job is the literal command line (``compressm-tune --budget 0.3x --seed S --out DIR``,
defaults otherwise) in a subprocess; its ``summary.json`` holds the full model, the chosen
model and the scratch baseline, trained with the same settings and steps and measured side
by side in onnxruntime by the job itself. Recorded per job: wall time, CPU time of the job's
processes (user + sys: on a shared machine the wall time is inflated by other jobs, the CPU
time much less), the 1-minute load before and after, and whether the job measured the latency
profile (the first run on a machine does) or reused the cached one.

Targets (the issue's): the chosen model has >= 3x fewer states and >= 2x lower measured p50
latency than the full model, within 5% of its test MSE (regression; 1 point for accuracy);
it beats the scratch baseline at the same widths by more than the seed spread; three
relative budgets choose three different models whose measured latencies are in the budgets'
order, each within its budget. Output: bench_results/NAME.{json,md}.

    python benchmarks/bench_tune_default.py [--seeds 0,1,2] [--budgets 0.3x,0.5x,0.8x]
        [--budget-seeds 0] [--quickstart-budget 0.3x] [--workers 1] [--name tune_default]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, write  # noqa: E402

from compressm_tune._table import markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _run_job(budget: str, seed: int, out: Path, extra: list[str]) -> dict[str, Any]:
    """One quickstart job in a subprocess; its summary plus wall/CPU time and the load.

    A job already finished in ``out`` (``out.job.json`` beside it: its timing and load) is
    read back, not rerun."""
    args = ["--budget", budget, "--seed", str(seed), "--out", str(out), *extra]
    record = Path(f"{out}.job.json")
    if record.is_file() and (out / "summary.json").is_file():
        return {**_summary_fields(out), **json.loads(record.read_text())}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    load_before = os.getloadavg()[0]
    t0 = time.time()
    with open(f"{out}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "compressm_tune.cli", *args], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    job = {"budget": budget, "seed": seed, "command": "compressm-tune " + " ".join(args),
           "exit_code": os.waitstatus_to_exitcode(status), "wall_s": round(wall, 1),
           "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
           "load_1m_before": load_before, "load_1m_after": os.getloadavg()[0]}
    if job["exit_code"] != 0 or not (out / "summary.json").is_file():
        job["error"] = Path(f"{out}.log").read_text()[-1500:]
        return job
    record.write_text(json.dumps(job, indent=2) + "\n")
    return {**_summary_fields(out), **job}


def _summary_fields(out: Path) -> dict[str, Any]:
    s = json.loads((out / "summary.json").read_text())
    fields = {k: s.get(k) for k in ("budget_ms", "full_predicted_ms", "meets_budget",
                                     "measured_ms", "predicted_ms", "chosen_trial", "params",
                                     "full", "chosen", "scratch", "compression", "trials",
                                     "trial_table")}
    fields["profile_measured"] = any("measured an onnxruntime profile" in n or "re-measured" in n
                                     for n in s.get("notes", []))
    return fields


def _targets(quick: list[dict], budgets: list[dict], metric_unit: str) -> dict[str, Any]:
    ok = [j for j in quick if "chosen" in j]
    result: dict[str, Any] = {}
    if ok:
        result["states_3x"] = all(j["compression"]["states_fewer_x"] >= 3 for j in ok)
        result["latency_2x"] = all(j["compression"]["latency_lower_x_p50"] >= 2 for j in ok)
        limit = 1.0 if metric_unit == "points" else 0.05
        result["within_full"] = all(
            (j["compression"]["metric_change_vs_full"] >= -limit if metric_unit == "points"
             else j["compression"]["metric_change_vs_full"] <= limit) for j in ok)
        with_scratch = [j for j in ok if j.get("scratch")]
        if len(with_scratch) >= 2:
            chosen = [j["chosen"]["metric"] for j in with_scratch]
            scratch = [j["scratch"]["metric"] for j in with_scratch]
            sign = 1 if metric_unit == "points" else -1  # higher accuracy / lower loss is better
            gaps = [sign * (c - s) for c, s in zip(chosen, scratch, strict=True)]
            spread = max(statistics.stdev(chosen), statistics.stdev(scratch))
            result["beats_scratch"] = min(gaps) > 0 and statistics.mean(gaps) > spread
            result["scratch_gap_mean"] = statistics.mean(gaps)
            result["seed_spread"] = spread
    done = sorted((j for j in budgets if "chosen" in j), key=lambda j: j["budget_ms"])
    if len(done) >= 2:
        totals = [j["chosen"]["total_states"] for j in done]
        measured = [j["chosen"]["measured_ms_p50"] for j in done]
        result["budgets_distinct_models"] = len({tuple(j["chosen"]["state_dims"])
                                                 for j in done}) == len(done)
        result["budgets_latency_ordered"] = measured == sorted(measured)
        result["budgets_states_ordered"] = totals == sorted(totals)
        result["budgets_each_met"] = all(j["meets_budget"] for j in done)
        # a relative budget: the chosen model against the full one in the same rounds
        result["budgets_each_met_side_by_side"] = all(
            j["chosen"]["measured_ms_p50"] <= float(j["budget"].rstrip("x"))
            * j["full"]["measured_ms_p50"] for j in done)
    return result


def _threads(job: dict[str, Any]) -> str:
    words = job.get("command", "").split()
    return words[words.index("--threads") + 1] if "--threads" in words else "default"


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    if isinstance(x, list):
        return ",".join(map(str, x))
    return str(x)


def _markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    quick, budgets = payload["quickstart"], payload["budgets"]
    unit = payload["metric_unit"]
    metric = "test MSE" if unit == "relative" else "test accuracy"
    rows = []
    for j in quick:
        if "chosen" not in j:
            rows.append([j["seed"], "failed: " + j.get("error", "?")[-80:].replace("\n", " ")]
                        + ["-"] * 12)
            continue
        c = j["compression"]
        rows.append([
            j["seed"], _fmt(j["full"]["state_dims"]), _fmt(j["chosen"]["state_dims"]),
            f"{c['states_fewer_x']:.2f}x",
            f"{_fmt(j['full']['measured_ms_p50'])} / {_fmt(j['chosen']['measured_ms_p50'])}"
            f" / {_fmt(j['scratch']['measured_ms_p50']) if j.get('scratch') else '-'}",
            f"{c['latency_lower_x_p50']:.2f}x",
            f"{_fmt(j['full']['metric'])} / {_fmt(j['chosen']['metric'])} / "
            f"{_fmt(j['scratch']['metric']) if j.get('scratch') else '-'}",
            (f"{c['metric_change_vs_full']:+.1%}" if unit == "relative"
             else f"{c['metric_change_vs_full']:+.2f}"),
            "-" if c["metric_change_vs_scratch"] is None else
            (f"{c['metric_change_vs_scratch']:+.1%}" if unit == "relative"
             else f"{c['metric_change_vs_scratch']:+.2f}"),
            "-" if c["modelled_train_cost_saved"] is None
            else f"{c['modelled_train_cost_saved']:.0%}",
            f"{j['wall_s']:.0f} / {j['cpu_s']:.0f}", _threads(j),
            f"{j['load_1m_before']:.1f}-{j['load_1m_after']:.1f}",
            "measured" if j.get("profile_measured") else "cached"])
    brow = []
    for j in sorted(budgets, key=lambda j: float(j["budget"].rstrip("x"))):
        if "chosen" not in j:
            brow.append([j["budget"], "failed"] + ["-"] * 9)
            continue
        brow.append([j["budget"], _fmt(j["budget_ms"]), _fmt(j["chosen"]["state_dims"]),
                     j["chosen"]["total_states"], _fmt(j["measured_ms"]),
                     "yes" if j["meets_budget"] else "NO", _fmt(j["chosen"]["measured_ms_p50"]),
                     _fmt(j["full"]["measured_ms_p50"]), _fmt(j["chosen"]["metric"]),
                     f"{j['wall_s']:.0f} / {j['cpu_s']:.0f}", _threads(j)])
    t = payload["targets"]

    def verdict(key: str) -> str:
        return "-" if key not in t else ("met" if t[key] else "MISSED")

    lines = [
        "# The quickstart job: what compression bought (seeds and relative budgets)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, shared with other jobs (1-minute load "
        f"{payload['load_1m_start']:.1f} at the start, {payload['load_1m_end']:.1f} at the "
        f"end; per job below); code: commit {m['git_commit']}; {payload['workers']} job(s) at "
        f"a time; total wall time {payload['wall_min']:.1f} min. Reproduce: "
        f"`python benchmarks/bench_tune_default.py {payload['argv']}`.",
        "",
        f"Command per job: `{payload['quickstart_command']}` (the job's defaults: "
        f"{payload['defaults']}). Every figure comes from the job's own summary.json: "
        "full, chosen and scratch trained with the chosen trial's settings and steps, exported "
        "and measured by the job in onnxruntime (batch 1, 1 thread, per sequence), interleaved "
        "over 3 rounds. Times: wall / CPU seconds of the whole job (CPU: user + sys of its "
        "processes; on this shared machine the wall time is inflated by other jobs).",
        "",
        *([payload["note"], ""] if payload.get("note") else []),
        f"## Quickstart, {len(quick)} seed(s), budget {payload['quickstart_budget']}",
        "",
        markdown_table(["seed", "full dims", "chosen dims", "states fewer",
                        "measured p50 ms full / chosen / scratch", "latency lower (p50)",
                        f"{metric} full / chosen / scratch", "vs full", "vs scratch",
                        "modelled train cost saved", "job wall / CPU s", "torch threads",
                        "load 1m", "profile"], rows),
        "",
        f"## Relative budgets (seed {payload['budget_seeds']})",
        "",
        markdown_table(["budget", "budget ms", "chosen dims", "total states",
                        "measured p50 ms (budget check)", "meets",
                        "measured p50 ms (side by side)", "full measured p50 ms (side by side)",
                        metric, "job wall / CPU s", "torch threads"], brow),
        "",
        "The budget check is the job's own: the chosen bundle timed when it is chosen, in "
        "interleaved rounds with an untrained full-width bundle, against the budget's fraction "
        "of that full model's median (budget ms: the fraction of its prediction, which the "
        "trials aimed at). The side-by-side figures are the report's interleaved timing of "
        "full, chosen and scratch, minutes later, under whatever load the machine had then.",
        "",
        "## Targets",
        "",
        f"- >= 3x fewer states than the full model, every seed: {verdict('states_3x')}",
        f"- >= 2x lower measured p50 latency, every seed: {verdict('latency_2x')}",
        f"- within {'5%' if unit == 'relative' else '1 point'} of the full model's "
        f"{metric}, every seed: {verdict('within_full')}",
        f"- beats scratch at the same widths by more than the seed spread: "
        f"{verdict('beats_scratch')}"
        + (f" (mean gap {t['scratch_gap_mean']:.3g} vs spread {t['seed_spread']:.3g}, "
           f"{metric})" if "scratch_gap_mean" in t else ""),
        f"- three budgets choose three different models: {verdict('budgets_distinct_models')}"
        f"; measured latency in the budgets' order: {verdict('budgets_latency_ordered')}; "
        f"each within its budget: {verdict('budgets_each_met')} at the job's budget check, "
        f"{verdict('budgets_each_met_side_by_side')} in the side-by-side timing",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--quickstart-budget", default="0.3x")
    ap.add_argument("--budgets", default="0.3x,0.5x,0.8x",
                    help="relative budgets run at --budget-seeds (the quickstart budget's run "
                         "of that seed is reused)")
    ap.add_argument("--budget-seeds", default="0")
    ap.add_argument("--workers", type=int, default=1, help="jobs at a time")
    ap.add_argument("--extra", default="", help="more flags for every job (space-separated)")
    ap.add_argument("--runs", default="runs/bench-tune-default")
    ap.add_argument("--note", default="", help="a paragraph for the Markdown's header")
    ap.add_argument("--name", default="tune_default")
    args = ap.parse_args()
    runs = Path(args.runs).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    extra = args.extra.split()
    seeds = [int(s) for s in args.seeds.split(",")]
    budget_seeds = [int(s) for s in args.budget_seeds.split(",")]
    jobs = [(args.quickstart_budget, s) for s in seeds]
    jobs += [(b, s) for s in budget_seeds for b in args.budgets.split(",")
             if (b, s) not in jobs]
    start, load_start = time.time(), os.getloadavg()[0]

    def one(job: tuple[str, int]) -> dict[str, Any]:
        budget, seed = job
        result = _run_job(budget, seed, runs / f"{budget}-seed{seed}", extra)
        print(json.dumps({k: result.get(k) for k in ("budget", "seed", "exit_code", "wall_s",
                                                      "cpu_s", "compression")}), flush=True)
        return result

    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(one, jobs))
    quick = [r for r in results if r["budget"] == args.quickstart_budget and r["seed"] in seeds]
    budgets = [r for r in results if r["seed"] in budget_seeds
               and r["budget"] in args.budgets.split(",")]
    from compressm_tune.search import TuneConfig

    d = TuneConfig(budget=args.quickstart_budget)
    regression = any(j.get("chosen", {}).get("metric_name") == "test_loss" for j in results)
    payload = {
        "machine": machine(), "argv": " ".join(sys.argv[1:]), "workers": args.workers,
        "quickstart_budget": args.quickstart_budget, "budget_seeds": args.budget_seeds,
        "quickstart_command": f"compressm-tune --budget {args.quickstart_budget}"
                              + (f" {args.extra}" if args.extra else ""),
        "defaults": {k: getattr(d, k) for k in ("dataset", "blocks", "hidden", "state_dims",
                                                "steps", "batch_size", "trials")},
        "metric_unit": "relative" if regression else "points",
        "load_1m_start": load_start, "load_1m_end": os.getloadavg()[0],
        "wall_min": (time.time() - start) / 60, "quickstart": quick, "budgets": budgets,
        "note": args.note,
    }
    payload["targets"] = _targets(quick, budgets, payload["metric_unit"])
    write(RESULTS / args.name, payload, _markdown(payload))
    print(_markdown(payload))


if __name__ == "__main__":
    main()
