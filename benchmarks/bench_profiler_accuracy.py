"""Profiler accuracy: predicted vs measured cost of random multi-layer width combinations.

A profile measures equal-width models of K blocks and of the extra block counts (by default
1 and 2K) at every width; :class:`LatencyModel` fits a fixed cost plus a per-block cost across
them and predicts models with any number of blocks and any per-block widths. This benchmark
draws random combinations (1 to 2K blocks, widths log-uniform over the profiled range, mostly
between grid points), measures them with the profiler's own method (:func:`measure_models`:
same settings, threads, interleaved rounds) and compares with two predictions:

* from the given profile (measured earlier: the way the search uses it);
* from the given profile after a drift check: scaled by the median ratio, re-measured /
  profiled, of its K-block models at three reference widths (what ``profile --check`` and the
  budgeted job compute; here those models are taken from the control, no extra timing);
* from a control profile whose equal-width models are re-measured in the same interleaved
  session as the combinations, so that a change in machine load between the profile and the
  benchmark does not count as model error.

Target: 90 % of latency predictions within +-10 %.

Timings on a shared machine are only as good as the machine is quiet: ``--max-load`` waits
(up to ``--max-wait-s``) until the 1-minute load average falls below a threshold before
measuring, and the load before and after is written to every output.

Usage::

    python benchmarks/bench_profiler_accuracy.py --profile profiles/cpu-amd-epyc-2c.json \
        --max-load 0.5

Writes ``bench_results/profiler_accuracy.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from compressm_tune.hardware import (
    DRIFT_TOLERANCE,
    INTERPOLATIONS,
    TIME_METRICS,
    LatencyModel,
    Profile,
    load_profile,
    measure_models,
    reference_widths,
)

TARGET_WITHIN = 0.10  # +-10 %
TARGET_FRACTION = 0.90  # of the combinations
METRICS = ("latency_ms", "latency_min_ms", "latency_cpu_ms", "step_ms", "batch_ms",
           "train_step_ms", "energy_mj", "peak_mem_mb")
PREDICTORS = ("profile", "checked", "control")


def draw_combinations(profile: Profile, count: int, seed: int) -> list[list[int]]:
    """``count`` random per-block width lists: 1..2K blocks, widths log-uniform in range."""
    rng = np.random.default_rng(seed)
    low, high = np.log(profile.widths[0]), np.log(profile.widths[-1])
    combos = []
    for _ in range(count):
        blocks = int(rng.integers(1, 2 * profile.config.blocks + 1))
        combos.append([int(round(np.exp(rng.uniform(low, high)))) for _ in range(blocks)])
    return combos


def wait_for_quiet(max_load: float | None, max_wait_s: float, poll_s: float = 60.0) -> float:
    """Sleep until the 1-minute load average is below ``max_load``; seconds waited.

    Gives up after ``max_wait_s`` (the measurement then runs on a busy machine, and the
    outputs say so through the recorded load).
    """
    waited = 0.0
    while max_load is not None and os.getloadavg()[0] >= max_load and waited < max_wait_s:
        print(f"load average {os.getloadavg()[0]:.2f} >= {max_load}: waiting {poll_s:.0f} s",
              file=sys.stderr)
        time.sleep(poll_s)
        waited += poll_s
    return waited


class LoadSampler:
    """Sample the 1-minute load average every ``period_s`` in a daemon thread while inside
    the ``with`` block, so the outputs can state the load during the measurement, not only
    at its ends."""

    def __init__(self, period_s: float = 5.0) -> None:
        self.period_s, self.samples = period_s, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])


def _combo_errors(rows: list[dict], metric: str, name: str) -> dict[str, float]:
    """Share within +-10 %, median and max |relative error| of predictor ``name``."""
    errors = np.abs([r["rel_error"][metric][name] for r in rows])
    return {"within_10pct": float(np.mean(errors <= TARGET_WITHIN)),
            "median_abs_rel_error": float(np.median(errors)),
            "max_abs_rel_error": float(np.max(errors))}


def evaluate(profile: Profile, combos: list[list[int]], records) -> dict:
    """Predictions of every interpolation against the measurements, per metric."""
    models = {name: LatencyModel.from_profile(profile, name) for name in INTERPOLATIONS}
    models["auto"] = LatencyModel.from_profile(profile)
    metrics = [m for m in METRICS if m in models["auto"].metrics]
    rows = []
    for dims, record in zip(combos, records, strict=True):
        predicted = {m: {n: lm.predict(dims, m) for n, lm in models.items()} for m in metrics}
        rows.append({
            "state_dims": dims,
            "measured": {m: record.metric(m) for m in metrics},
            "predicted": predicted,
            "rel_error": {m: {n: p / record.metric(m) - 1 for n, p in predicted[m].items()}
                          for m in metrics},
        })
    summary = {}
    for metric in metrics:
        summary[metric] = {"auto_interpolation": models["auto"].interpolation(metric)}
        for name, lm in models.items():
            holdout = lm.holdout_error(metric)
            summary[metric][name] = {
                **_combo_errors(rows, metric, name),
                "holdout_mean_abs_rel_error": holdout.mean_abs_rel_error,
                "holdout_max_abs_rel_error": holdout.max_abs_rel_error,
            }
    return {"rows": rows, "summary": summary}


def drift_scales(profile: Profile, control: Profile) -> dict[str, float]:
    """Per time metric, the factor the budgeted job applies after :func:`check_drift`: the
    median ratio, re-measured / profiled, of the profile's K-block models at
    :func:`reference_widths` (three of the control's models, so no extra measurement), or 1
    when it is within ``DRIFT_TOLERANCE``."""
    widths = reference_widths(profile)
    old = {r.state_dim: r for r in profile.records}
    new = {r.state_dim: r for r in control.records}
    scales = {m: float(np.median([new[w].metric(m) / old[w].metric(m) for w in widths]))
              for m in TIME_METRICS if all(old[w].metric(m) is not None for w in widths)}
    return {m: v if abs(v - 1.0) > DRIFT_TOLERANCE else 1.0 for m, v in scales.items()}


def rescaled(result: dict, scales: dict[str, float]) -> dict:
    """``result`` of :func:`evaluate` with every prediction of a metric in ``scales`` times
    its factor: the profile file's predictor after a drift check."""
    rows = []
    for row in result["rows"]:
        predicted = {m: {n: v * scales.get(m, 1.0) for n, v in by.items()}
                     for m, by in row["predicted"].items()}
        rows.append({**row, "predicted": predicted, "rel_error": {
            m: {n: v / row["measured"][m] - 1 for n, v in by.items()}
            for m, by in predicted.items()}})
    summary = {}
    for metric, s in result["summary"].items():
        summary[metric] = dict(s)
        for name in (*INTERPOLATIONS, "auto"):
            summary[metric][name] = {**s[name], **_combo_errors(rows, metric, name)}
    return {"rows": rows, "summary": summary, "scales": scales}


def _headline(result: dict, what: str, metric: str = "latency_ms") -> str:
    if metric not in result["summary"]:
        return f"- {what}: `{metric}` not in this profile."
    lat = result["summary"][metric]["auto"]
    verdict = "meets" if lat["within_10pct"] >= TARGET_FRACTION else "misses"
    return (f"- **{what}: {lat['within_10pct']:.0%} of {len(result['rows'])}** within +-10 % "
            f"(target 90 %: {verdict} it); median |error| {lat['median_abs_rel_error']:.1%}, "
            f"max {lat['max_abs_rel_error']:.1%}.")


def _by_blocks(results: dict, metric: str) -> list[str]:
    """Signed error of ``metric`` (auto interpolation) by block count: a fixed/per-block split
    that is off, or waiting for a shared core that grows with call length, shows as 1-block
    models over-predicted and many-block models under-predicted."""
    names = [n for n in PREDICTORS if metric in results[n]["summary"]]
    lines = ["| blocks | combos | " + " | ".join(
                f"{n}: mean signed error | {n}: within +-10 %" for n in names) + " |",
             "|---|---|" + "---|---|" * len(names)]
    for k in sorted({len(r["state_dims"]) for r in results["profile"]["rows"]}):
        cells = []
        for name in names:
            errors = np.array([r["rel_error"][metric]["auto"] for r in results[name]["rows"]
                               if len(r["state_dims"]) == k])
            cells.append(f"{errors.mean():+.1%} | {np.mean(np.abs(errors) <= TARGET_WITHIN):.0%}")
        count = sum(len(r["state_dims"]) == k for r in results["profile"]["rows"])
        lines.append(f"| {k} | {count} | " + " | ".join(cells) + " |")
    return lines


def _summary_table(result: dict) -> list[str]:
    names = (*INTERPOLATIONS, "auto")
    lines = ["| metric | auto picks | " + " | ".join(f"{n}: combos | {n}: holdout" for n in names)
             + " |", "|---|---|" + "---|---|" * len(names)]
    for metric, s in result["summary"].items():
        cells = [f"{s[n]['within_10pct']:.0%} / {s[n]['median_abs_rel_error']:.1%} | "
                 f"{s[n]['holdout_mean_abs_rel_error']:.1%}" for n in names]
        lines.append(f"| {metric} | {s['auto_interpolation']} | " + " | ".join(cells) + " |")
    return lines


def _waited_text(meta: dict) -> str:
    if meta["max_load"] is None:
        return "started without waiting for a quiet machine."
    return (f"started after waiting {meta['waited_for_load_s']:.0f} s for the load average to "
            f"fall below {meta['max_load']:g}.")


def _blocks_text(profile: Profile) -> str:
    """``K=2 (and 1, 4 at every width)`` or, for a migrated version-1 profile, where."""
    extra = sorted({r.blocks for r in profile.extra_records})
    at = sorted({r.state_dim for r in profile.extra_records})
    where = "at every width" if at == profile.widths else f"at width(s) {at} only"
    return f"K={profile.config.blocks} (and {', '.join(map(str, extra))} {where})"


def write_markdown(path: Path, profile_path: Path, profile: Profile, results: dict,
                   meta: dict) -> None:
    """Headlines, per-metric summaries and the per-combination latency table."""
    cfg = profile.config
    lines = [
        "# Profiler accuracy: predicted vs measured latency",
        "",
        f"Device: {profile.device.label} (`{profile.device.slug}`), runtime `{cfg.runtime}`, "
        f"{profile.device.torch_threads} torch thread(s), H={cfg.hidden}, L={cfg.seq_len}; "
        f"profile `{profile_path}` ({_blocks_text(profile)} blocks at widths "
        f"{profile.widths}, measured {profile.created_utc}; 1-min load average "
        f"{profile.load_avg_1m_start:.2f} before and {profile.load_avg_1m_end:.2f} after). "
        "Latency = median wall-clock time of one batch-1 inference.",
        "",
        f"Timing method (profile and combinations alike): {profile.timing_method}.",
        "",
        f"{len(results['profile']['rows'])} random combinations of 1-{2 * cfg.blocks} blocks, "
        f"widths log-uniform in [{profile.widths[0]}, {profile.widths[-1]}] (seed "
        f"{meta['seed']}), measured by `measure_models` in {meta['measure_time_s']:.0f} s:",
        "",
        "`latency_ms`, median wall-clock time (the target):",
        "",
        _headline(results["profile"], "predicted from the profile file"),
        _headline(results["checked"], "predicted from the profile file after a drift check "
                  f"(x {results['checked']['scales'].get('latency_ms', 1):.3f}: "
                  "the median ratio, now / profiled, of the K-block models at widths "
                  f"{list(reference_widths(profile))} re-measured in this session, applied "
                  f"only beyond +-{DRIFT_TOLERANCE:.0%}, as the budgeted job does)"),
        _headline(results["control"], "predicted from equal-width models re-measured in the "
                  "same session (control for load drift)"),
        "",
        "`latency_cpu_ms`, median time on a core (thread CPU time per call; time spent waiting "
        "for a core that other processes hold does not count):",
        "",
        _headline(results["profile"], "predicted from the profile file", "latency_cpu_ms"),
        _headline(results["checked"], "predicted from the profile file after a drift check "
                  f"(x {results['checked']['scales'].get('latency_cpu_ms', 1):.3f})",
                  "latency_cpu_ms"),
        _headline(results["control"], "predicted from the co-measured control",
                  "latency_cpu_ms"),
        "",
        f"Machine: {os.cpu_count()} logical CPUs; 1-min load average "
        f"{meta['load_avg_1m_start']:.2f} before and {meta['load_avg_1m_end']:.2f} after the "
        f"measurement, mean {meta['load_avg_1m_during']['mean']:.2f} and max "
        f"{meta['load_avg_1m_during']['max']:.2f} during it (sampled every 5 s); "
        f"{_waited_text(meta)} {meta['machine_note']}",
        *_drift_lines(meta),
        "",
        *[f"- measurement note: {w}" for w in meta["measurement_warnings"]],
        *[f"- profile note: {n}" for n in profile.notes],
        "",
        "## Latency error by block count",
        "",
        "`latency_ms`:",
        "",
        *_by_blocks(results, "latency_ms"),
        "",
        "`latency_cpu_ms`:",
        "",
        *_by_blocks(results, "latency_cpu_ms"),
        "",
        "## Every metric, by interpolation",
        "",
        "Combos: fraction within +-10 % / median |error|. Holdout: leave-one-out mean |error| "
        "on the profile's interior widths (the fit's own estimate of its error).",
        "",
        "### From the profile file",
        "",
        *_summary_table(results["profile"]),
        "",
        "### From the profile file after a drift check",
        "",
        *_summary_table(results["checked"]),
        "",
        "### From the co-measured control",
        "",
        *_summary_table(results["control"]),
        "",
        "## Latency per combination (auto interpolation)",
        "",
        "| state dims | measured ms | profile: predicted | error | control: predicted | error "
        "| on-core ms | profile: predicted | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row, ctl in zip(results["profile"]["rows"], results["control"]["rows"], strict=True):
        cells = [f"{row['measured']['latency_ms']:.3f}"]
        for r, metric in ((row, "latency_ms"), (ctl, "latency_ms"), (row, "latency_cpu_ms")):
            if metric not in r["predicted"]:
                cells.append("- | -" if metric == "latency_ms" else "- | - | -")
                continue
            if metric == "latency_cpu_ms":
                cells.append(f"{r['measured'][metric]:.3f}")
            err = r["rel_error"][metric]["auto"]
            mark = "" if abs(err) <= TARGET_WITHIN else " **out**"
            cells.append(f"{r['predicted'][metric]['auto']:.3f} | {err:+.1%}{mark}")
        lines.append(f"| {row['state_dims']} | " + " | ".join(cells) + " |")
    est = " (an estimate)" if profile.is_energy_estimate else ""
    lines += ["", f"Energy method: `{profile.energy_method}`{est}.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def write_plot(path: Path, results: dict) -> None:
    """Scatter of predicted vs measured latency with the +-10 % band."""
    fig = Figure(figsize=(5.5, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = []
    for name, marker in zip(PREDICTORS, ("o", "^", "x"), strict=True):
        rows = results[name]["rows"]
        measured = np.array([r["measured"]["latency_ms"] for r in rows])
        predicted = np.array([r["predicted"]["latency_ms"]["auto"] for r in rows])
        values += [measured, predicted]
        ax.scatter(measured, predicted, s=22, marker=marker, zorder=3,
                   label=f"predicted from {name}")
    lo, hi = 0.9 * np.concatenate(values).min(), 1.1 * np.concatenate(values).max()
    grid = np.geomspace(lo, hi, 50)
    ax.fill_between(grid, grid * (1 - TARGET_WITHIN), grid * (1 + TARGET_WITHIN), alpha=0.2,
                    label="+-10 %")
    ax.plot(grid, grid, lw=1, color="gray")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured latency, batch 1 (ms, median)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title("LatencyModel: random multi-layer width combinations")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def drift(profile: Profile, control: Profile) -> dict:
    """How far the equal-width models moved between the profile's session and this one.

    The same models, re-measured; ``control / profile - 1`` per model, summarized per metric.
    A shift shared by all models is the machine's speed changing between the sessions, which
    no latency model can predict; the control predictor does not see it.
    """
    out = {}
    for metric in ("latency_ms", "latency_min_ms", "latency_cpu_ms"):
        pairs = [(c.metric(metric), r.metric(metric))
                 for r, c in zip(profile.all_records, control.all_records, strict=True)]
        if any(None in pair for pair in pairs):
            continue
        ratios = np.array([c / r - 1 for c, r in pairs])
        out[metric] = {"median": float(np.median(ratios)), "min": float(ratios.min()),
                       "max": float(ratios.max())}
    return out


def _drift_lines(meta: dict) -> list[str]:
    if not meta.get("drift"):
        return []
    cells = [f"`{m}` {d['median']:+.1%} (range {d['min']:+.0%} to {d['max']:+.0%})"
             for m, d in meta["drift"].items()]
    return ["", "Drift between the profile's session and this one, the same equal-width models "
            "re-measured (this session / profile - 1, median over the models): "
            + "; ".join(cells) + ". A shift shared by all models is the machine's speed "
            "changing between sessions, not error of the latency model; the control "
            "predictor is free of it."]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, required=True, help="profile JSON to predict from")
    parser.add_argument("--combos", type=int, default=24, help="random combinations (>= 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="remark on the machine, e.g. 'shared'")
    parser.add_argument("--max-load", type=float, default=None,
                        help="wait until the 1-min load average is below this before measuring")
    parser.add_argument("--max-wait-s", type=float, default=1800.0,
                        help="give up waiting for --max-load after this long and measure anyway "
                             "(the load is recorded either way)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/profiler_accuracy"),
                        help="output prefix for .json, .md and .png")
    parser.add_argument("--rerender", action="store_true",
                        help="measure nothing: rewrite the .md and .png from the .json that a "
                             "run with this --profile wrote")
    args = parser.parse_args(argv)

    profile = load_profile(args.profile)
    n, m = len(profile.records), len(profile.all_records)
    if args.rerender:
        payload = json.loads(args.out.with_suffix(".json").read_text())
        config = json.loads(json.dumps(profile.to_dict()["config"]))  # tuples as lists
        created = payload.get("profile_created_utc", profile.created_utc)
        if (payload["config"], created) != (config, profile.created_utc):
            raise SystemExit(f"{args.out}.json was not measured with {args.profile}")
        results = {name: payload[name] for name in ("profile", "control")}
        meta = payload["meta"]
        control_records = payload["control_records"]
    else:
        combos = draw_combinations(profile, args.combos, args.seed)
        shapes = [list(r.state_dims) for r in profile.all_records]
        waited_s = wait_for_quiet(args.max_load, args.max_wait_s)
        load_start, start_s = os.getloadavg()[0], time.time()
        with warnings.catch_warnings(record=True) as caught, LoadSampler() as load:
            warnings.simplefilter("always")
            records = measure_models(shapes + combos, profile.config)
        meta = {"load_avg_1m_start": load_start, "load_avg_1m_end": os.getloadavg()[0],
                "load_avg_1m_during": {"mean": float(np.mean(load.samples)),
                                       "max": float(np.max(load.samples)),
                                       "samples": len(load.samples)},
                "measure_time_s": time.time() - start_s, "seed": args.seed,
                "measurement_warnings": sorted({str(w.message) for w in caught
                                                if issubclass(w.category, UserWarning)}),
                "machine_note": args.note or "No remark on machine sharing was given.",
                "max_load": args.max_load, "waited_for_load_s": waited_s}
        control = dataclasses.replace(profile, records=tuple(records[:n]),
                                      extra_records=tuple(records[n:m]))
        results = {"profile": evaluate(profile, combos, records[m:]),
                   "control": evaluate(control, combos, records[m:])}
        control_records = [dataclasses.asdict(r) for r in records[:m]]
        # ("profile" and "control" hold the two predictors' results)
        payload = {"profile_path": str(args.profile), "profile_created_utc": profile.created_utc,
                   "device": profile.device.slug, "meta": meta,
                   "config": profile.to_dict()["config"], "profile_notes": list(profile.notes),
                   "energy_method": profile.energy_method,
                   "target": {"within": TARGET_WITHIN, "fraction": TARGET_FRACTION},
                   "control_records": control_records,
                   "combo_records": [dataclasses.asdict(r) for r in records[m:]]}
    plain = json.loads(json.dumps(profile.to_dict()))  # tuples as lists, as from_dict reads
    control = Profile.from_dict({**plain, "records": json.loads(json.dumps(control_records[:n])),
                                 "extra_records": json.loads(json.dumps(control_records[n:m]))})
    meta["drift"] = drift(profile, control)
    results["checked"] = rescaled(results["profile"], drift_scales(profile, control))
    results = {name: results[name] for name in PREDICTORS}
    payload.update(meta=meta, profile_path=str(args.profile),
                   profile_created_utc=profile.created_utc, **results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    write_markdown(args.out.with_suffix(".md"), args.profile, profile, results, meta)
    write_plot(args.out.with_suffix(".png"), results)
    for name in PREDICTORS:
        for metric in ("latency_ms", "latency_cpu_ms"):
            if metric not in results[name]["summary"]:
                continue
            lat = results[name]["summary"][metric]["auto"]
            print(f"{name}: {metric} within +-10%: {lat['within_10pct']:.0%} of "
                  f"{len(results[name]['rows'])} (median |error| "
                  f"{lat['median_abs_rel_error']:.1%}, max {lat['max_abs_rel_error']:.1%})")
    print(f"wrote {args.out}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
