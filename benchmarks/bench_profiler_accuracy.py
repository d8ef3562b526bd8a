"""Profiler accuracy: predicted vs measured cost of random multi-layer width combinations.

A profile measures equal-width models of K blocks (and of 1 and 2K blocks) at every width;
``LatencyModel`` fits a fixed plus a per-block cost and predicts any per-block widths. This
draws random combinations (1 to 2K blocks, widths log-uniform over the profiled range), measures
them with the profiler's own ``measure_models`` (interleaved rounds) and compares three
predictions: from the profile file; from it after a drift check (scaled by the median ratio,
re-measured / profiled, of its K-block models at the reference widths, as the budgeted job
does); and from a control profile whose equal-width models are re-measured in the same session
(so load drift between sessions does not count as model error). Target: 90 % of latency
predictions within +-10 %. ``--max-load`` waits for a quieter machine before measuring.

    python benchmarks/bench_profiler_accuracy.py --profile profiles/cpu-amd-epyc-2c.json \
        [--combos 24] [--max-load 0.5] [--results-dir DIR] [--name profiler_accuracy]
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, machine_line, parser, write  # noqa: E402

from compressm_tune._table import markdown_table  # noqa: E402
from compressm_tune.hardware import (  # noqa: E402
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
    """Sleep until the 1-minute load is below ``max_load`` (at most ``max_wait_s``)."""
    waited = 0.0
    while max_load is not None and os.getloadavg()[0] >= max_load and waited < max_wait_s:
        time.sleep(poll_s)
        waited += poll_s
    return waited


def _combo_errors(rows: list[dict], metric: str, name: str) -> dict[str, float]:
    """Share within +-10 %, median and max |relative error| of predictor ``name``."""
    errors = np.abs([r["rel_error"][metric][name] for r in rows])
    return {"within_10pct": float(np.mean(errors <= TARGET_WITHIN)),
            "median_abs_rel_error": float(np.median(errors)),
            "max_abs_rel_error": float(np.max(errors))}


def evaluate(profile: Profile, combos: list[list[int]], records,
             scales: dict[str, float] | None = None) -> dict:
    """Predictions of every interpolation against the measurements, per metric; ``scales``
    multiplies a metric's predictions (the profile after a drift check)."""
    models = {name: LatencyModel.from_profile(profile, name) for name in INTERPOLATIONS}
    models["auto"] = LatencyModel.from_profile(profile)
    metrics = [m for m in METRICS if m in models["auto"].metrics]
    rows = []
    for dims, record in zip(combos, records, strict=True):
        predicted = {m: {n: lm.predict(dims, m) * (scales or {}).get(m, 1.0)
                         for n, lm in models.items()} for m in metrics}
        rows.append({"state_dims": dims, "measured": {m: record.metric(m) for m in metrics},
                     "predicted": predicted,
                     "rel_error": {m: {n: p / record.metric(m) - 1 for n, p in by.items()}
                                   for m, by in predicted.items()}})
    summary = {}
    for metric in metrics:
        summary[metric] = {"auto_interpolation": models["auto"].interpolation(metric)}
        for name, lm in models.items():
            holdout = lm.holdout_error(metric)
            summary[metric][name] = {
                **_combo_errors(rows, metric, name),
                "holdout_mean_abs_rel_error": holdout.mean_abs_rel_error,
                "holdout_max_abs_rel_error": holdout.max_abs_rel_error}
    return {"rows": rows, "summary": summary, **({"scales": scales} if scales else {})}


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


def _headline(result: dict, what: str, metric: str = "latency_ms") -> str:
    if metric not in result["summary"]:
        return f"- {what}: `{metric}` not in this profile."
    lat = result["summary"][metric]["auto"]
    verdict = "meets" if lat["within_10pct"] >= TARGET_FRACTION else "misses"
    return (f"- **{what}: {lat['within_10pct']:.0%} of {len(result['rows'])}** within +-10 % "
            f"(target 90 %: {verdict} it); median |error| {lat['median_abs_rel_error']:.1%}, "
            f"max {lat['max_abs_rel_error']:.1%}.")


def _by_blocks(results: dict, metric: str) -> str:
    """Signed error of ``metric`` (auto interpolation) by block count: a fixed/per-block split
    that is off shows as 1-block models over- and many-block models under-predicted."""
    names = [n for n in PREDICTORS if metric in results[n]["summary"]]
    rows = []
    for k in sorted({len(r["state_dims"]) for r in results["profile"]["rows"]}):
        errors = {n: np.array([r["rel_error"][metric]["auto"] for r in results[n]["rows"]
                               if len(r["state_dims"]) == k]) for n in names}
        rows.append([k, len(errors[names[0]]), *(
            c for e in errors.values()
            for c in (f"{e.mean():+.1%}", f"{np.mean(np.abs(e) <= TARGET_WITHIN):.0%}"))])
    return markdown_table(["blocks", "combos", *(c for n in names for c in (
        f"{n}: mean signed error", f"{n}: within +-10 %"))], rows)


def _summary_table(result: dict) -> str:
    names = (*INTERPOLATIONS, "auto")
    return markdown_table(
        ["metric", "auto picks", *(c for n in names for c in (f"{n}: combos", f"{n}: holdout"))],
        [[metric, s["auto_interpolation"], *(c for n in names for c in (
            f"{s[n]['within_10pct']:.0%} / {s[n]['median_abs_rel_error']:.1%}",
            f"{s[n]['holdout_mean_abs_rel_error']:.1%}"))]
         for metric, s in result["summary"].items()])


def markdown(profile: Profile, results: dict, meta: dict) -> str:
    """Headlines, error by block count, per-metric summaries, the per-combination table."""
    cfg = profile.config
    scales = results["checked"].get("scales", {})
    lines = [
        "# Profiler accuracy: predicted vs measured latency", "",
        f"Device: {profile.device.label}, runtime `{cfg.runtime}`, "
        f"{profile.device.torch_threads} torch thread(s), H={cfg.hidden}, L={cfg.seq_len}; "
        f"profile `{meta['profile_path']}` (K={cfg.blocks}, widths {profile.widths}, measured "
        f"{profile.created_utc}). Timing: {profile.timing_method}. "
        f"{len(results['profile']['rows'])} random combinations (seed {meta['seed']}) measured "
        f"in {meta['measure_time_s']:.0f} s, after waiting {meta['waited_for_load_s']:.0f} s "
        f"for the load. {machine_line(meta['machine'])} {meta['machine_note']}", ""]
    for metric in ("latency_ms", "latency_cpu_ms"):
        lines += [f"`{metric}`:", "",
                  _headline(results["profile"], "from the profile file", metric),
                  _headline(results["checked"], f"after a drift check (x "
                            f"{scales.get(metric, 1):.3f}, at widths "
                            f"{list(reference_widths(profile))}, beyond "
                            f"+-{DRIFT_TOLERANCE:.0%})", metric),
                  _headline(results["control"], "from the co-measured control", metric), ""]
    lines += ["Drift, the equal-width models re-measured (this session / profile - 1, median and "
              "range): " + "; ".join(f"`{k}` {d['median']:+.1%} ({d['min']:+.0%} to "
                                     f"{d['max']:+.0%})" for k, d in meta["drift"].items()), "",
              *[f"- note: {w}" for w in meta["measurement_warnings"] + list(profile.notes)],
              "", "## Latency error by block count", "", _by_blocks(results, "latency_ms"),
              "", "## Every metric, by interpolation", "",
              "Combos: fraction within +-10 % / median |error|. Holdout: leave-one-out mean "
              "|error| on the profile's interior widths.", ""]
    for name in PREDICTORS:
        lines += [f"### {name}", "", _summary_table(results[name]), ""]
    rows = []
    for row, ctl in zip(results["profile"]["rows"], results["control"]["rows"], strict=True):
        cells = [row["state_dims"], f"{row['measured']['latency_ms']:.3f}"]
        for r in (row, ctl):
            err = r["rel_error"]["latency_ms"]["auto"]
            cells += [f"{r['predicted']['latency_ms']['auto']:.3f}",
                      f"{err:+.1%}" + ("" if abs(err) <= TARGET_WITHIN else " **out**")]
        rows.append(cells)
    return "\n".join(lines + ["## Latency per combination (auto interpolation)", "",
                              markdown_table(["state dims", "measured ms", "profile: predicted",
                                              "error", "control: predicted", "error"], rows)])


def plot(results: dict):
    def draw(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 5.5))
        values = []
        for name, marker in zip(PREDICTORS, ("o", "^", "x"), strict=True):
            rows = results[name]["rows"]
            measured = [r["measured"]["latency_ms"] for r in rows]
            predicted = [r["predicted"]["latency_ms"]["auto"] for r in rows]
            values += measured + predicted
            ax.scatter(measured, predicted, s=22, marker=marker, label=f"predicted from {name}")
        grid = np.geomspace(0.9 * min(values), 1.1 * max(values), 50)
        ax.fill_between(grid, grid * (1 - TARGET_WITHIN), grid * (1 + TARGET_WITHIN),
                        alpha=0.2, label="+-10 %")
        ax.plot(grid, grid, lw=1, color="gray")
        ax.set(xscale="log", yscale="log", xlabel="measured latency, batch 1 (ms, median)",
               ylabel="predicted latency (ms)", title="LatencyModel: random width combinations")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return draw


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


def main() -> None:
    ap = parser(__doc__, "profiler_accuracy", quick="6 combinations, 2 short rounds: a smoke test")
    ap.add_argument("--profile", type=Path, required=True, help="profile JSON to predict from")
    ap.add_argument("--combos", type=int, default=24, help="random combinations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="", help="remark on the machine, e.g. 'shared'")
    ap.add_argument("--max-load", type=float, default=None,
                    help="wait until the 1-min load average is below this before measuring")
    ap.add_argument("--max-wait-s", type=float, default=1800.0)
    args = ap.parse_args()
    profile = load_profile(args.profile)
    n, m = len(profile.records), len(profile.all_records)
    combos = draw_combinations(profile, 6 if args.quick else args.combos, args.seed)
    waited_s = wait_for_quiet(args.max_load, args.max_wait_s)
    load, start_s = os.getloadavg()[0], time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settings = (dataclasses.replace(profile.config, rounds=2, min_time_s=0.01, warmup=1,
                                        min_repeats=2) if args.quick else profile.config)
        records = measure_models([list(r.state_dims) for r in profile.all_records] + combos,
                                 settings)
    control = dataclasses.replace(profile, records=tuple(records[:n]),
                                  extra_records=tuple(records[n:m]))
    meta = {"machine": machine(load), "measure_time_s": time.time() - start_s,
            "seed": args.seed, "profile_path": str(args.profile), "max_load": args.max_load,
            "waited_for_load_s": waited_s, "drift": drift(profile, control),
            "machine_note": args.note,
            "measurement_warnings": sorted({str(w.message) for w in caught
                                            if issubclass(w.category, UserWarning)})}
    results = {"profile": evaluate(profile, combos, records[m:]),
               "control": evaluate(control, combos, records[m:])}
    results["checked"] = evaluate(profile, combos, records[m:], drift_scales(profile, control))
    payload = {"profile_path": str(args.profile), "profile_created_utc": profile.created_utc,
               "device": profile.device.slug, "meta": meta,
               "config": profile.to_dict()["config"], "energy_method": profile.energy_method,
               "target": {"within": TARGET_WITHIN, "fraction": TARGET_FRACTION},
               "control_records": [dataclasses.asdict(r) for r in records[:m]],
               "combo_records": [dataclasses.asdict(r) for r in records[m:]],
               **{name: results[name] for name in PREDICTORS}}
    write(args.results_dir / args.name, payload, markdown(profile, results, meta), plot(results))


if __name__ == "__main__":
    main()
