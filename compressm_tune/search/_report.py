"""The run's record: ``summary.json``, ``report.md`` and plots, from results already made."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from compressm_tune._io import atomic_write_text
from compressm_tune._table import markdown_table
from compressm_tune.data import Dataset
from compressm_tune.hardware import LatencyModel, Profile
from compressm_tune.reduction import CALIBRATION, spectrum_record
from compressm_tune.search._config import TuneConfig
from compressm_tune.search._study import SURPLUS
from compressm_tune.training import model_from_checkpoint, read_metrics

__all__ = ["write_report"]


def write_report(config: TuneConfig, study: optuna.Study, chosen: dict[str, Any],
                 references: dict[str, Any], data: Dataset, profile: Profile,
                 latency: LatencyModel, notes: list[str]) -> dict[str, Any]:
    """``summary.json`` + ``report.md`` + plots in the run directory; returns the summary.

    ``chosen`` is :func:`choose_and_export`'s answer, ``references`` what
    :func:`train_references` returned (the full and scratch training summaries and the
    side-by-side timing), ``notes`` what the report lists under "Notes". The summary's
    ``full``, ``chosen`` and ``scratch`` entries (``scratch`` None without a baseline) each hold
    ``state_dims``, ``measured_ms_p50``, ``measured_ms_p90``, ``metric`` and ``metric_name``."""
    out = Path(config.out)
    trial = chosen["trial"]
    metric = "accuracy" if data.task == "classification" else "loss"
    measured = chosen["measured"]
    timing = references["timing"]
    initial = trial.user_attrs.get("initial_state_dims") or (
        [trial.params.get("state_dim", config.full_width)] * config.blocks)
    final = trial.user_attrs["state_dims"]
    trial_metrics = Path(chosen["files"]) / "metrics.jsonl"
    models = {
        "full": _model_entry(references["full"]["final_state_dims"],
                             references["full"]["test_best"][metric], metric, timing["full"],
                             latency, config, references["full"]["train_time_s"]),
        "chosen": {**_model_entry(final, trial.user_attrs["test"], metric, timing["chosen"],
                                  latency, config, trial.user_attrs["train_time_s"],
                                  trial_metrics, initial),
                   "trial": trial.number, "initial_state_dims": initial,
                   "cut": list(final) != list(initial)},
        "scratch": None,
    }
    if references.get("scratch") is not None:
        models["scratch"] = _model_entry(
            references["scratch"]["final_state_dims"], references["scratch"]["test_best"][metric],
            metric, timing["scratch"], latency, config, references["scratch"]["train_time_s"])
    full_entry = models["full"]
    full_entry.update({f"test_{metric}": full_entry["metric"],
                       "settings": trial.user_attrs.get("train_settings")})
    summary = {
        "budget_ms": config.budget_ms, "budget": config.budget,
        "full_predicted_ms": latency.predict([config.full_width] * config.blocks, config.metric),
        "budget_mj": config.budget_mj,
        "latency_mode": config.latency_mode, "arch": config.arch, "dataset": config.dataset,
        "chosen_trial": trial.number, "params": trial.params,
        "initial_state_dims": initial, "final_state_dims": final,
        "predicted_ms": trial.user_attrs["predicted_ms"], "measured_ms": measured["p50_ms"],
        "predicted_mj": latency.predict(final, "energy_mj"),
        "energy_method": profile.records[0].energy_method,
        "energy_rel_error": _energy_rel_error(profile),
        "latency_measurement": measured,
        "budget_limit_ms": measured["limit_ms"], "meets_budget": measured["meets"],
        "val": trial.user_attrs["val"], f"test_{metric}": trial.user_attrs["test"],
        "train_time_s": trial.user_attrs["train_time_s"],
        "modelled_train_s": models["chosen"]["modelled_train_s"],
        "modelled_train_rel_error": _train_model_error(latency),
        **models,
        "compression": {**_compression(models, metric),
                        "timing_rounds": timing["chosen"]["rounds"]},
        "trial_table": _trial_rows(study, config),
        "fallbacks": chosen["fallbacks"],
        "trials": {s.name.lower(): len([t for t in study.get_trials(states=(s,))
                                         if not t.user_attrs.get(SURPLUS)])
                   for s in optuna.trial.TrialState},
        "profile": {"device": profile.device.label, "runtime": profile.config.runtime,
                    "created_utc": profile.created_utc},
        "notes": notes, "parity": chosen["manifest"].get("parity"),
        "pareto": config.pareto,
        "training": {"device": references["full"].get("device", "cpu"),
                     "precision": references["full"].get("precision", "fp32")},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _plots(study, config, out, data)
    (out / "report.md").write_text(_markdown(summary, metric) + "\n")
    return summary


def _model_entry(dims: list[int], value: float, metric: str, timing: dict[str, Any],
                 latency: LatencyModel, config: TuneConfig, train_time_s: float,
                 metrics: Path | None = None, initial: list[int] | None = None
                 ) -> dict[str, Any]:
    """One row of "what compression bought": widths, measured latency, test metric, the
    profile's predictions (latency, training cost)."""
    dims = list(dims)
    return {"state_dims": dims, "total_states": sum(dims),
            "measured_ms_p50": timing["p50_ms"], "measured_ms_p90": timing["p90_ms"],
            "loadavg_1min": timing["loadavg_1min"],
            "metric": value, "metric_name": f"test_{metric}",
            "predicted_ms": latency.predict(dims, config.metric),
            "modelled_train_s": _modelled_train_s(metrics, latency, initial or dims,
                                                  config.steps),
            "train_time_s": train_time_s}


def _compression(models: dict[str, Any], metric: str) -> dict[str, Any]:
    """Chosen against full (and scratch): states x fewer, measured latency x lower, the
    metric's change (accuracy: points; loss: relative), modelled training cost saved."""
    full, chosen, scratch = models["full"], models["chosen"], models["scratch"]

    def change(a: float, b: float) -> float:  # a relative to b
        return 100 * (a - b) if metric == "accuracy" else a / b - 1 if b else math.nan

    cost = (1 - chosen["modelled_train_s"] / full["modelled_train_s"]
            if chosen["modelled_train_s"] and full["modelled_train_s"] else None)
    return {
        "states_fewer_x": full["total_states"] / chosen["total_states"],
        "latency_lower_x_p50": full["measured_ms_p50"] / chosen["measured_ms_p50"],
        "latency_lower_x_p90": full["measured_ms_p90"] / chosen["measured_ms_p90"],
        "metric_change_vs_full": change(chosen["metric"], full["metric"]),
        "metric_change_vs_scratch": (None if scratch is None
                                     else change(chosen["metric"], scratch["metric"])),
        "metric_change_unit": "points" if metric == "accuracy" else "relative",
        "modelled_train_cost_saved": cost,
    }


def _energy_rel_error(profile: Profile) -> float | None:
    """The largest relative error the profile states for its energy figures (NVML windows),
    ``None`` where it states none (estimates, RAPL)."""
    errors = [r.energy_error_mj / r.energy_mj for r in (*profile.records, *profile.extra_records)
              if r.energy_error_mj is not None and r.energy_mj]
    return max(errors) if errors else None


def _train_model_error(latency: LatencyModel) -> float | None:
    """The largest leave-one-out error of the profile's training-step fit (``None`` with fewer
    than three widths): how far a modelled training cost may be off."""
    try:
        return latency.holdout_error("train_step_ms").max_abs_rel_error
    except ValueError:
        return None


def _training_cost_line(saved: float | None, error: float | None) -> str:
    """The report's training-cost sentence. ``saved``: the share of the full model's modelled
    training cost the chosen model saves (negative: it cost more); a saving within the
    training-step fit's ``error`` is said to be within it."""
    if saved is None:
        return "Training cost: not modelled."
    how = ("Training cost, modelled (each step costs the profile's training-step time at the "
           "widths then in effect): ")
    bound = ("" if error is None else
             f" (the training-step fit's leave-one-out error is up to {error:.0%})")
    change = f"{saved:.0%} lower" if saved >= 0 else f"{-saved:.0%} higher"
    if error is not None and abs(saved) <= error:
        return how + f"{change} than the full model's, within the model's error{bound}."
    return how + f"{change} than the full model's{bound}."


def _modelled_train_s(metrics: Path | None, latency: LatencyModel, initial: list[int],
                      steps: int) -> float | None:
    """Training cost of a run as the profile models it: every step costs the profile's
    training-step time at the widths in effect then (read from the run's ``metrics.jsonl``;
    without one, ``initial`` throughout).
    Why not wall clock: trials run at different times on a shared machine, where wall clocks
    of identical runs differ by more than any saving."""
    records = [r for r in (read_metrics(metrics) if metrics and metrics.is_file() else [])
               if "state_dims" in r]
    total, step, dims = 0.0, 0, list(initial)
    for record in sorted(records, key=lambda r: r["step"]):
        total += (record["step"] - step) * latency.predict(dims, "train_step_ms")
        step, dims = record["step"], record["state_dims"]
    total += max(0, steps - step) * latency.predict(dims, "train_step_ms")
    return round(total / 1e3, 3)


def _trial_rows(study: optuna.Study, config: TuneConfig) -> list[dict[str, Any]]:
    """What was tried: one row per trial (also the report's trial table); ``cut`` says whether
    the trial ended narrower than it started."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(SURPLUS):
            continue  # started after the study was full, by a worker that then stopped
        constraints = t.user_attrs.get("constraints", {})
        state = t.state.name.lower()
        if t.state == optuna.trial.TrialState.COMPLETE and any(
                v > 0 for v in constraints.values()):
            state = "infeasible"
        initial = t.user_attrs.get("initial_state_dims") or (
            [t.params.get("state_dim", config.full_width)] * config.blocks)
        final = t.user_attrs.get("state_dims")
        rows.append({"trial": t.number, "state": state, "initial_state_dims": initial,
                     **{k: t.params.get(k) for k in ("tau", "window", "schedule", "max_drop",
                                                     "weighting", "lr")},
                     "final_state_dims": final,
                     "cut": None if final is None else list(final) != list(initial),
                     "predicted_ms": t.user_attrs.get("predicted_ms"),
                     "val": t.user_attrs.get("val")})
    return rows


def _ratio(x: float) -> str:
    return f"{x:.2f}x" if math.isfinite(x) else "-"


def _change(value: float | None, unit: str) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:+.2f} points" if unit == "points" else f"{value:+.1%}"


def _compression_lines(s: dict[str, Any], metric: str) -> list[str]:
    """The report's first section: full, chosen and scratch side by side, and what cutting
    bought against the full model and against training small."""
    label = "test accuracy" if metric == "accuracy" else "test MSE"
    rows = []
    names = {"full": "full (no cuts)", "chosen": f"chosen (trial {s['chosen_trial']}, "
             + ("cut in training)" if s["chosen"].get("cut") else "not cut)"),
             "scratch": "scratch (chosen widths from the start)"}
    for key in ("full", "chosen", "scratch"):
        m = s.get(key)
        if m is None:
            continue
        rows.append([names[key], ",".join(map(str, m["state_dims"])), m["total_states"],
                     _fmt(m["measured_ms_p50"]), _fmt(m["measured_ms_p90"]), _fmt(m["metric"]),
                     _fmt(m["predicted_ms"]), _fmt(m.get("modelled_train_s"))])
    c, m = s["compression"], s["latency_measurement"]
    loads = [x for key in ("full", "chosen", "scratch") if s.get(key)
             for x in s[key]["loadavg_1min"]]
    bought = (f"**What compression bought** (chosen vs full, same settings and steps): "
              f"{_ratio(c['states_fewer_x'])} fewer states, {_ratio(c['latency_lower_x_p50'])} "
              f"lower measured p50 latency ({_ratio(c['latency_lower_x_p90'])} at p90), {label} "
              f"{_change(c['metric_change_vs_full'], c['metric_change_unit'])}")
    saved = c.get("modelled_train_cost_saved")
    if saved is not None:
        bought += (f", modelled training cost {abs(saved):.0%} "
                   f"{'lower' if saved >= 0 else 'higher'}")
    bought += "."
    if s.get("scratch") is not None:
        delta = c["metric_change_vs_scratch"]
        better = delta is not None and (delta > 0 if metric == "accuracy" else delta < 0)
        bought += (f" Against the same widths trained from scratch: {label} "
                   f"{_fmt(s['chosen']['metric'])} vs {_fmt(s['scratch']['metric'])} "
                   f"({_change(delta, c['metric_change_unit'])}: cutting "
                   f"{'beat' if better else 'did not beat'} training small, one seed).")
    else:
        bought += " No scratch baseline was trained (baseline off)."
    return [
        markdown_table(["model", "state dims", "total states", "measured p50 ms",
                        "measured p90 ms", label, "predicted ms", "modelled train s"], rows),
        "",
        bought,
        "",
        f"Latency measured here in onnxruntime (batch 1, {m.get('threads', '?')} thread(s), "
        f"per {'sequence' if s['latency_mode'] == 'sequence' else 'token'}), the "
        f"models interleaved over {c['timing_rounds']} rounds (medians); 1-minute "
        f"load {min(loads):.2f}-{max(loads):.2f} on {m.get('cpu_count', '?')}"
        " cores. "
        f"{label[0].upper()}{label[1:]}: measured on the test split at the best validation "
        "checkpoint. Predicted ms and modelled train s come from the profile.",
    ]


def _markdown(s: dict[str, Any], metric: str) -> str:
    m = s["latency_measurement"]
    c = s["compression"]
    trials = [[r["trial"], r["state"], ",".join(map(str, r["initial_state_dims"])),
               {True: "yes", False: "no", None: "-"}[r["cut"]], _fmt(r["tau"]),
               _fmt(r["window"]), r["schedule"] or "-", _fmt(r["max_drop"]),
               r["weighting"] or "-", _fmt(r["lr"]),
               ",".join(map(str, r["final_state_dims"])) if r["final_state_dims"] else "-",
               _fmt(r["predicted_ms"]), _fmt(r["val"])] for r in s.get("trial_table", [])]
    unit = "sequence" if s["latency_mode"] == "sequence" else "token"
    budget = (f"{s['budget']} of the full model's latency per {unit}, measured against it (the "
              f"search aimed at {s['budget_ms']:.4g} ms of the profile's, whose full model is "
              f"predicted at {s['full_predicted_ms']:.4g} ms; see the notes)" if s.get("budget")
              else f"{s['budget_ms']:g} ms per {unit}")
    against = (f" = {m['p50_ms'] / m['full_ms']:.3g}x of the full model's {m['full_ms']:.4g} ms "
               f"timed in the same {m['rounds']} interleaved rounds (limit {m['limit_ms']:.4g} ms)"
               if m.get("full_ms") else f" (median of {m.get('rounds', 1)} rounds)")
    lines = [
        f"# compressm-tune: budget {budget}",
        "",
        *_compression_lines(s, metric),
        "",
        f"Chosen model **{'meets' if s['meets_budget'] else 'MISSES'}** the budget: measured "
        f"p50 {s['measured_ms']:.4g} ms{against}, p90 {m['p90_ms']:.4g} ms, p99 "
        f"{m['p99_ms']:.4g} ms over {m['n_samples']} calls when chosen (1-minute load "
        f"{min(m['loadavg_1min']):.2f}-{max(m['loadavg_1min']):.2f}) vs predicted "
        f"{s['predicted_ms']:.4g} ms. The budget is checked against p50.",
        "",
        *([f"Energy budget {s['budget_mj']:g} mJ: predicted {s['predicted_mj']:.4g} mJ per "
           f"inference from the profile ({s['energy_method']}"
           + (f", each profiled figure within ±{s['energy_rel_error']:.0%}: one refresh of the "
              "source over the profile's energy window" if s.get("energy_rel_error") else "")
           + "); not measured on the exported model.", ""]
          if s.get("budget_mj") is not None else []),
        _training_cost_line(c.get("modelled_train_cost_saved"),
                            s.get("modelled_train_rel_error"))
        + " Wall-clock training times on a shared machine are in summary.json. Trials: "
        + ", ".join(f"{k} {v}" for k, v in s["trials"].items() if v),
        "",
        markdown_table(["trial", "state", "N start", "cut", "tau", "window", "schedule",
                        "max drop", "weighting", "lr", "final widths", "predicted ms", "val"],
                       trials),
        "",
        f"Search parameters: `{json.dumps(s['params'])}`. Trials trained on "
        f"{s['training']['device']} ({s['training']['precision']}); latency is onnxruntime's on "
        "the profiled machine.",
        "",
    ]
    if s["fallbacks"]:
        lines += ["Trials passed over (measured ones were timed the way the chosen one was; an "
                  "unmeasured one's prediction was corrected by the nearest measured trial's "
                  "measured/predicted ratio):", "",
                  *[f"- trial {f['trial']}: {f['reason']}" for f in s["fallbacks"]], ""]
    if s["notes"]:
        lines += ["Notes:", *[f"- {n}" for n in s["notes"]], ""]
    lines += ["![Pareto front](pareto.png)" if s.get("pareto") else
              "![validation score per trial](history.png)",
              "", "![HSV spectra of the chosen model](hsv.png)"]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _plots(study: optuna.Study, config: TuneConfig, out: Path, data: Dataset) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():  # optuna's matplotlib plots are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if config.pareto:
            ax = optuna.visualization.matplotlib.plot_pareto_front(
                study, target_names=["val score", "predicted ms"])
            ax.figure.savefig(out / "pareto.png", dpi=110, bbox_inches="tight")
        else:
            ax = optuna.visualization.matplotlib.plot_optimization_history(
                study, target_name="validation score")
            metric = "accuracy" if data.task == "classification" else "minus loss"
            ax.set(title=f"Search: validation {metric} per trial (feasible and not)",
                   ylabel=f"validation {metric}")
            for text in ax.get_legend().get_texts() if ax.get_legend() else ():
                if text.get_text() == "Best Value":
                    text.set_text("best so far")
            ax.figure.savefig(out / "history.png", dpi=110, bbox_inches="tight")
        plt.close("all")
    model = model_from_checkpoint(out / "checkpoint.pt")
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for record in spectrum_record(model, data.x_train[:CALIBRATION]):
        g = np.asarray(record["hsv"])  # LRU: HSVs; selective: data importance, descending
        ax.semilogy(np.arange(1, len(g) + 1), g / g[0], marker=".",
                    label=f"layer {record['layer']}")
    kind = "HSV" if config.arch == "lru" else "state importance"
    ax.set(xlabel="state (by rank)", ylabel=f"{kind} / largest",
           title=f"chosen model: {kind} spectra")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "hsv.png", dpi=110)
    plt.close(fig)
