"""Profiler accuracy: predicted vs measured cost of random multi-layer width combinations.

A profile measures models of K equal-width blocks; :class:`LatencyModel` predicts models with
any number of blocks and any per-block widths. This benchmark draws random combinations
(1 to 2K blocks, widths log-uniform over the profiled range, mostly between grid points),
measures them with the profiler's own method (:func:`measure_models`: same settings, threads,
interleaved rounds) and compares with two predictions:

* from the given profile (measured earlier: the way the search uses it);
* from a control profile whose equal-width models are re-measured in the same interleaved
  session as the combinations, so that a change in machine load between the profile and the
  benchmark does not count as model error.

Target: 90 % of latency predictions within +-10 %.

Usage::

    python benchmarks/bench_profiler_accuracy.py --profile profiles/cpu-amd-epyc-2c.json

Writes ``bench_results/profiler_accuracy.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from compressm_tune.hardware import (
    INTERPOLATIONS,
    LatencyModel,
    Profile,
    load_profile,
    measure_models,
)

TARGET_WITHIN = 0.10  # +-10 %
TARGET_FRACTION = 0.90  # of the combinations
METRICS = ("latency_ms", "latency_min_ms", "step_ms", "batch_ms", "train_step_ms", "energy_mj",
           "peak_mem_mb")
PREDICTORS = ("profile", "control")


def draw_combinations(profile: Profile, count: int, seed: int) -> list[list[int]]:
    """``count`` random per-block width lists: 1..2K blocks, widths log-uniform in range."""
    rng = np.random.default_rng(seed)
    low, high = np.log(profile.widths[0]), np.log(profile.widths[-1])
    combos = []
    for _ in range(count):
        blocks = int(rng.integers(1, 2 * profile.config.blocks + 1))
        combos.append([int(round(np.exp(rng.uniform(low, high)))) for _ in range(blocks)])
    return combos


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
            errors = np.abs([r["rel_error"][metric][name] for r in rows])
            holdout = lm.holdout_error(metric)
            summary[metric][name] = {
                "within_10pct": float(np.mean(errors <= TARGET_WITHIN)),
                "median_abs_rel_error": float(np.median(errors)),
                "max_abs_rel_error": float(np.max(errors)),
                "holdout_mean_abs_rel_error": holdout.mean_abs_rel_error,
                "holdout_max_abs_rel_error": holdout.max_abs_rel_error,
            }
    return {"rows": rows, "summary": summary}


def _headline(result: dict, what: str) -> str:
    lat = result["summary"]["latency_ms"]["auto"]
    verdict = "meets" if lat["within_10pct"] >= TARGET_FRACTION else "misses"
    return (f"- **{what}: {lat['within_10pct']:.0%} of {len(result['rows'])}** within +-10 % "
            f"(target 90 %: {verdict} it); median |error| {lat['median_abs_rel_error']:.1%}, "
            f"max {lat['max_abs_rel_error']:.1%}.")


def _summary_table(result: dict) -> list[str]:
    names = (*INTERPOLATIONS, "auto")
    lines = ["| metric | auto picks | " + " | ".join(f"{n}: combos | {n}: holdout" for n in names)
             + " |", "|---|---|" + "---|---|" * len(names)]
    for metric, s in result["summary"].items():
        cells = [f"{s[n]['within_10pct']:.0%} / {s[n]['median_abs_rel_error']:.1%} | "
                 f"{s[n]['holdout_mean_abs_rel_error']:.1%}" for n in names]
        lines.append(f"| {metric} | {s['auto_interpolation']} | " + " | ".join(cells) + " |")
    return lines


def write_markdown(path: Path, profile_path: Path, profile: Profile, results: dict,
                   meta: dict) -> None:
    """Headlines, per-metric summaries and the per-combination latency table."""
    cfg = profile.config
    lines = [
        "# Profiler accuracy: predicted vs measured latency",
        "",
        f"Device: {profile.device.label} (`{profile.device.slug}`), runtime `{cfg.runtime}`, "
        f"{profile.device.torch_threads} torch thread(s), H={cfg.hidden}, L={cfg.seq_len}; "
        f"profile `{profile_path}` (K={cfg.blocks} blocks at widths {profile.widths}, measured "
        f"{profile.created_utc}). Latency = median wall-clock time of one batch-1 inference.",
        "",
        f"{len(results['profile']['rows'])} random combinations of 1-{2 * cfg.blocks} blocks, "
        f"widths log-uniform in [{profile.widths[0]}, {profile.widths[-1]}] (seed "
        f"{meta['seed']}), measured by `measure_models` in {meta['measure_time_s']:.0f} s:",
        "",
        _headline(results["profile"], "predicted from the profile file"),
        _headline(results["control"], "predicted from equal-width models re-measured in the "
                  "same session (control for load drift)"),
        "",
        f"Machine: {os.cpu_count()} logical CPUs; 1-min load average "
        f"{meta['load_avg_1m_start']:.2f} before and {meta['load_avg_1m_end']:.2f} after the "
        f"measurement. {meta['machine_note']}",
        "",
        *[f"- measurement note: {w}" for w in meta["measurement_warnings"]],
        *[f"- profile note: {n}" for n in profile.notes],
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
        "### From the co-measured control",
        "",
        *_summary_table(results["control"]),
        "",
        "## Latency per combination (auto interpolation)",
        "",
        "| state dims | measured ms | profile: predicted | error | control: predicted | error |",
        "|---|---|---|---|---|---|",
    ]
    for row, ctl in zip(results["profile"]["rows"], results["control"]["rows"], strict=True):
        cells = []
        for r in (row, ctl):
            err = r["rel_error"]["latency_ms"]["auto"]
            mark = "" if abs(err) <= TARGET_WITHIN else " **out**"
            cells.append(f"{r['predicted']['latency_ms']['auto']:.3f} | {err:+.1%}{mark}")
        lines.append(f"| {row['state_dims']} | {row['measured']['latency_ms']:.3f} | "
                     + " | ".join(cells) + " |")
    est = " (an estimate)" if profile.is_energy_estimate else ""
    lines += ["", f"Energy method: `{profile.energy_method}`{est}.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def write_plot(path: Path, results: dict) -> None:
    """Scatter of predicted vs measured latency with the +-10 % band."""
    fig = Figure(figsize=(5.5, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = []
    for name, marker in zip(PREDICTORS, ("o", "x"), strict=True):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, required=True, help="profile JSON to predict from")
    parser.add_argument("--combos", type=int, default=24, help="random combinations (>= 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="remark on the machine, e.g. 'shared'")
    parser.add_argument("--out", type=Path, default=Path("bench_results/profiler_accuracy"),
                        help="output prefix for .json, .md and .png")
    args = parser.parse_args(argv)

    profile = load_profile(args.profile)
    combos = draw_combinations(profile, args.combos, args.seed)
    shapes = [list(r.state_dims) for r in (*profile.records, profile.overhead_record)]
    load_start, start_s = os.getloadavg()[0], time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = measure_models(shapes + combos, profile.config)
    meta = {"load_avg_1m_start": load_start, "load_avg_1m_end": os.getloadavg()[0],
            "measure_time_s": time.time() - start_s, "seed": args.seed,
            "measurement_warnings": sorted({str(w.message) for w in caught
                                            if issubclass(w.category, UserWarning)}),
            "machine_note": args.note or "No remark on machine sharing was given."}
    n = len(profile.records)
    control = dataclasses.replace(profile, records=tuple(records[:n]), overhead_record=records[n])
    results = {"profile": evaluate(profile, combos, records[n + 1:]),
               "control": evaluate(control, combos, records[n + 1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"profile": str(args.profile), "device": profile.device.slug, "meta": meta,
               "config": profile.to_dict()["config"], "profile_notes": list(profile.notes),
               "energy_method": profile.energy_method,
               "target": {"within": TARGET_WITHIN, "fraction": TARGET_FRACTION},
               "control_records": [dataclasses.asdict(r) for r in records[: n + 1]], **results}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    write_markdown(args.out.with_suffix(".md"), args.profile, profile, results, meta)
    write_plot(args.out.with_suffix(".png"), results)
    for name in PREDICTORS:
        lat = results[name]["summary"]["latency_ms"]["auto"]
        print(f"{name}: latency within +-10%: {lat['within_10pct']:.0%} of {len(combos)} "
              f"(median |error| {lat['median_abs_rel_error']:.1%})")
    print(f"wrote {args.out}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
