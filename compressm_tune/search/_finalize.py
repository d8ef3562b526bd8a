"""After the search: pick the best feasible trial whose *measured* latency meets the budget,
and train the full-width reference the report compares it with."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import optuna

from compressm_tune._io import read_json
from compressm_tune.data import Dataset
from compressm_tune.errors import BudgetMissedError
from compressm_tune.exporter import export_bundle, measure_latency
from compressm_tune.search._config import TuneConfig
from compressm_tune.search._objective import constraints_of
from compressm_tune.training import Trainer

__all__ = ["choose_and_export", "feasible_trials", "full_reference", "infeasible_message"]


def feasible_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed trials predicted to meet every budget, best validation score first."""
    done = [t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
            if all(c <= 0 for c in constraints_of(t))]
    # equal validation scores (common: a few hundred validation samples) go to the faster model
    return sorted(done, key=lambda t: (-t.user_attrs["val"], t.user_attrs["predicted_ms"]))


def infeasible_message(config: TuneConfig, study: optuna.Study) -> str:
    """Which budget no trial met, with the closest predictions: an energy budget that binds
    must not be reported as a latency problem."""
    done = [t for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.COMPLETE]
    closest = []
    for key, flag, unit, budget in (("latency_ms", "--budget-ms", "ms", config.budget_ms),
                                    ("energy_mj", "--budget-mj", "mJ", config.budget_mj)):
        excess = [t.user_attrs.get("constraints", {}).get(key) for t in done]
        excess = [e for e in excess if e is not None]
        if budget is None or not excess:
            continue
        best = budget + min(excess)
        state = "met by some" if min(excess) <= 0 else "missed by all"
        closest.append(f"{budget:g} {unit} ({flag}) {state}, closest {best:.4g} {unit}")
    detail = "; ".join(closest) if closest else "no trial completed"
    return (f"none of {len(study.trials)} trials is predicted to meet every budget: {detail}; "
            "raise the budget that binds, or --trials")


def _export_and_measure(config: TuneConfig, checkpoint: str, out: Path) -> dict[str, Any]:
    manifest = export_bundle(checkpoint, out)
    timing = measure_latency(out, mode=config.latency_mode, threads=config.ort_threads,
                             record=True)
    return {"manifest": manifest, "latency": timing}


def choose_and_export(config: TuneConfig, study: optuna.Study, data: Dataset) -> dict[str, Any]:
    """Export feasible trials best-first until one's *measured* latency meets the budget.

    The bundle of the chosen trial is copied into the run directory (``model.onnx``,
    ``model.ts``, ``manifest.json``, ``checkpoint.pt``). Returns the trial, its measurement,
    its manifest and the trials passed over.

    Raises
    ------
    BudgetMissedError
        No trial is predicted to meet the budgets, or every feasible one missed when measured.
    """
    feasible = feasible_trials(study)
    if not feasible:
        raise BudgetMissedError(infeasible_message(config, study))
    out = Path(config.out)
    misses = []
    for trial in feasible:
        if not Path(trial.user_attrs["checkpoint"]).exists():
            continue  # trained by a worker on another machine; its checkpoint lives there
        # in this worker's own run directory: workers sharing a study may pick the same trial
        bundle = out / "bundles" / f"{config.study}-{trial.number:04d}"
        result = _export_and_measure(config, trial.user_attrs["checkpoint"], bundle)
        measured = result["latency"]["p50_ms"]
        if measured <= config.budget_ms:
            for f in bundle.iterdir():
                if f.is_file():
                    shutil.copy2(f, out / f.name)
            shutil.copy2(trial.user_attrs["checkpoint"], out / "checkpoint.pt")
            return {"trial": trial, "measured": result["latency"],
                    "manifest": result["manifest"], "fallbacks": misses}
        misses.append({"trial": trial.number, "predicted_ms": trial.user_attrs["predicted_ms"],
                       "measured_ms": measured})
    if not misses:
        raise BudgetMissedError("no feasible trial's checkpoint is on this machine; run the "
                                "job where the best trials were trained")
    raise BudgetMissedError(
        f"every feasible trial missed {config.budget_ms:g} ms when measured: "
        + ", ".join(f"trial {m['trial']} {m['measured_ms']:.3g} ms" for m in misses))


def full_reference(config: TuneConfig, data: Dataset) -> dict[str, Any]:
    """Train (once; cached in OUT/full) the uncompressed model the report compares with;
    returns its training summary.

    A run killed while training it resumes from its last checkpoint; a summary that is not a
    complete one (cut short, edited) is treated as absent."""
    out = Path(config.out) / "full"
    summary = read_json(out / "summary.json")
    if isinstance(summary, dict) and {"final_state_dims", "test_best", "train_time_s"} <= set(
            summary):
        return summary
    return Trainer(config.model_config(data, max(config.state_dims)), config.train_config(),
                   data, out, progress=False, resume=True).fit()
