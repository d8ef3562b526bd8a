"""The run's record: ``summary.json``, ``report.md`` and plots, from results already made."""

from __future__ import annotations

import json
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
from compressm_tune.training import model_from_checkpoint, read_metrics

__all__ = ["write_report"]


def write_report(config: TuneConfig, study: optuna.Study, chosen: dict[str, Any],
                 full: dict[str, Any], data: Dataset, profile: Profile, latency: LatencyModel,
                 notes: list[str]) -> dict[str, Any]:
    """``summary.json`` + ``report.md`` + plots in the run directory; returns the summary.

    ``chosen`` is :func:`choose_and_export`'s answer, ``full`` the full reference's training
    summary, ``notes`` what the report lists under "Notes"."""
    out = Path(config.out)
    trial = chosen["trial"]
    metric = "accuracy" if data.task == "classification" else "loss"
    full_dims = full["final_state_dims"]
    measured = chosen["measured"]
    summary = {
        "budget_ms": config.budget_ms, "budget_mj": config.budget_mj,
        "latency_mode": config.latency_mode, "arch": config.arch, "dataset": config.dataset,
        "chosen_trial": trial.number, "params": trial.params,
        "initial_state_dims": [trial.params["state_dim"]] * config.blocks,
        "final_state_dims": trial.user_attrs["state_dims"],
        "predicted_ms": trial.user_attrs["predicted_ms"], "measured_ms": measured["p50_ms"],
        "predicted_mj": latency.predict(trial.user_attrs["state_dims"], "energy_mj"),
        "energy_method": profile.records[0].energy_method,
        "energy_rel_error": _energy_rel_error(profile),
        "latency_measurement": measured,
        "meets_budget": measured["p50_ms"] <= config.budget_ms,
        "val": trial.user_attrs["val"], f"test_{metric}": trial.user_attrs["test"],
        "train_time_s": trial.user_attrs["train_time_s"],
        "modelled_train_s": _modelled_train_s(
            Path(trial.user_attrs["checkpoint"]).parent / "metrics.jsonl", latency,
            [trial.params["state_dim"]] * config.blocks, config.steps),
        "modelled_train_rel_error": _train_model_error(latency),
        "full": {"state_dims": full_dims, f"test_{metric}": full["test_best"][metric],
                 "predicted_ms": latency.predict(full_dims, config.metric),
                 "train_time_s": full["train_time_s"],
                 "modelled_train_s": _modelled_train_s(out / "full" / "metrics.jsonl", latency,
                                                       full_dims, config.steps)},
        "trial_table": _trial_rows(study),
        "fallbacks": chosen["fallbacks"],
        "trials": {s.name.lower(): len(study.get_trials(states=(s,)))
                   for s in optuna.trial.TrialState},
        "profile": {"device": profile.device.label, "runtime": profile.config.runtime,
                    "created_utc": profile.created_utc},
        "notes": notes, "parity": chosen["manifest"].get("parity"),
        "pareto": config.pareto,
        "training": {"device": full.get("device", "cpu"),
                     "precision": full.get("precision", "fp32")},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _plots(study, config, out, data)
    (out / "report.md").write_text(_markdown(summary, metric) + "\n")
    return summary


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


def _modelled_train_s(metrics: Path, latency: LatencyModel, initial: list[int],
                      steps: int) -> float | None:
    """Training cost of a run as the profile models it: every step costs the profile's
    training-step time at the widths in effect then (read from the run's ``metrics.jsonl``).
    Why not wall clock: trials run at different times on a shared machine, where wall clocks
    of identical runs differ by more than any saving."""
    records = [r for r in (read_metrics(metrics) if metrics.is_file() else [])
               if "state_dims" in r]
    total, step, dims = 0.0, 0, list(initial)
    for record in sorted(records, key=lambda r: r["step"]):
        total += (record["step"] - step) * latency.predict(dims, "train_step_ms")
        step, dims = record["step"], record["state_dims"]
    total += max(0, steps - step) * latency.predict(dims, "train_step_ms")
    return round(total / 1e3, 3)


def _trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """What was tried: one row per trial (also the report's trial table)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        constraints = t.user_attrs.get("constraints", {})
        state = t.state.name.lower()
        if t.state == optuna.trial.TrialState.COMPLETE and any(
                v > 0 for v in constraints.values()):
            state = "infeasible"
        rows.append({"trial": t.number, "state": state,
                     **{k: t.params.get(k) for k in ("state_dim", "tau", "window", "lr")},
                     "final_state_dims": t.user_attrs.get("state_dims"),
                     "predicted_ms": t.user_attrs.get("predicted_ms"),
                     "val": t.user_attrs.get("val")})
    return rows


def _markdown(s: dict[str, Any], metric: str) -> str:
    full = s["full"]
    rows = [
        ["full", full["state_dims"], full[f"test_{metric}"], full["predicted_ms"], "-",
         full.get("modelled_train_s")],
        [f"chosen (trial {s['chosen_trial']})", s["final_state_dims"], s[f"test_{metric}"],
         s["predicted_ms"], s["measured_ms"], s.get("modelled_train_s")],
    ]
    m = s["latency_measurement"]
    saved = (1 - s["modelled_train_s"] / full["modelled_train_s"]
             if s.get("modelled_train_s") and full.get("modelled_train_s") else None)
    trials = [[r["trial"], r["state"], r["state_dim"], _fmt(r["tau"]), _fmt(r["window"]),
               _fmt(r["lr"]), r["final_state_dims"] or "-", _fmt(r["predicted_ms"]),
               _fmt(r["val"])] for r in s.get("trial_table", [])]
    lines = [
        f"# compressm-tune: budget {s['budget_ms']:g} ms per "
        f"{'sequence' if s['latency_mode'] == 'sequence' else 'token'}",
        "",
        f"Chosen model **{'meets' if s['meets_budget'] else 'MISSES'}** the budget: measured "
        f"p50 {s['measured_ms']:.4g} ms, p90 {m.get('p90_ms', float('nan')):.4g} ms, p99 "
        f"{m.get('p99_ms', float('nan')):.4g} ms over {m.get('n_samples', '?')} calls "
        f"(onnxruntime, batch 1, {m.get('threads', '?')} thread(s); 1-minute load "
        f"{m.get('machine', {}).get('loadavg_1min', float('nan')):.2f} on "
        f"{m.get('machine', {}).get('cpu_count', '?')} cores) vs predicted "
        f"{s['predicted_ms']:.4g} ms. The budget is checked against p50.",
        "",
        *([f"Energy budget {s['budget_mj']:g} mJ: predicted {s['predicted_mj']:.4g} mJ per "
           f"inference from the profile ({s['energy_method']}"
           + (f", each profiled figure within ±{s['energy_rel_error']:.0%}: one refresh of the "
              "source over the profile's energy window" if s.get("energy_rel_error") else "")
           + "); not measured on the exported model.", ""]
          if s.get("budget_mj") is not None else []),
        markdown_table(["model", "state dims", f"test {metric}", "predicted ms", "measured ms",
                        "modelled train s"], rows),
        "",
        _training_cost_line(saved, s.get("modelled_train_rel_error"))
        + " Wall-clock times of trials on a shared machine are in summary.json. Trials: "
        + ", ".join(f"{k} {v}" for k, v in s["trials"].items() if v),
        "",
        markdown_table(["trial", "state", "N start", "tau", "window", "lr", "final widths",
                        "predicted ms", "val"], trials),
        "",
        f"Search parameters: `{json.dumps(s['params'])}`. Trials trained on "
        f"{s['training']['device']} ({s['training']['precision']}); latency is onnxruntime's on "
        "the profiled machine.",
        "",
    ]
    if s["fallbacks"]:
        lines += ["Fell back past trials whose measured latency missed the budget: "
                  + ", ".join(f"trial {f['trial']} ({f['measured_ms']:.3g} ms)"
                              for f in s["fallbacks"]), ""]
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
