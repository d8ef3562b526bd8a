"""One trial: train with in-training reduction, end inside the budget, report to Optuna."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from compressm_tune.data import Dataset
from compressm_tune.reduction import ReduceConfig, Reducer, ReductionPolicy, round_up_to
from compressm_tune.search._artifacts import Artifacts
from compressm_tune.search._config import TuneConfig
from compressm_tune.search._space import TrialPlan, suggest
from compressm_tune.training import Trainer, score

__all__ = ["Objective", "set_constraints", "constraints_of", "trial_settings"]

Predict = Callable[[list[int], str], float]


def trial_settings(plan: TrialPlan) -> dict[str, float]:
    """The training settings a plan sets (beyond the config's): the references the report
    compares with train with the chosen trial's."""
    return {"lr": plan.lr, "warmup_frac": plan.window}


def set_constraints(trial: optuna.Trial, values: dict[str, float]) -> None:
    """Record constraint values (feasible when all <= 0): Optuna 5's API, else user attrs."""
    for key, value in values.items():
        if hasattr(trial, "set_constraint"):
            trial.set_constraint(key, float(value))
    trial.set_user_attr("constraints", {k: float(v) for k, v in values.items()})


def constraints_of(trial: optuna.trial.FrozenTrial) -> list[float]:
    """The constraint values of a finished trial (the samplers' ``constraints_func``)."""
    return list(trial.user_attrs.get("constraints", {}).values()) or [float("inf")]


TRIAL_FILES = ("best.pt", "metrics.jsonl")  # what a trial uploads: the finalizer's inputs


class Objective:
    """Callable objective; ``predict(dims, metric)`` comes from the device's latency model.

    A trial's checkpoint and metrics go to ``artifacts`` (their ids in the trial's user attr
    ``artifacts``), so any worker sharing the study and the store can export it.
    """

    def __init__(self, config: TuneConfig, dataset: Dataset, predict: Predict,
                 fast_widths: list[int], artifacts: Artifacts) -> None:
        self.config, self.dataset, self.predict = config, dataset, predict
        self.fast_widths, self.artifacts = fast_widths, artifacts

    def fits(self, dims: list[int]) -> bool:
        """Whether a model with these widths is predicted to meet every budget."""
        return all(v <= 0 for v in self.constraints(dims).values())

    def constraints(self, dims: list[int]) -> dict[str, float]:
        cfg = self.config
        values = {"latency_ms": self.predict(dims, cfg.metric) - cfg.budget_ms}
        if cfg.budget_mj is not None:
            values["energy_mj"] = self.predict(dims, "energy_mj") - cfg.budget_mj
        return values

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        cfg, data = self.config, self.dataset
        plan = suggest(trial, cfg)
        model_config = cfg.model_config(data, plan.state_dim)
        settings = trial_settings(plan)
        # schedule settings the space leaves alone keep ReduceConfig's defaults
        reducer = Reducer(ReduceConfig(
            policy=ReductionPolicy("tau", plan.tau, weighting=plan.weighting),
            window=plan.window, schedule=plan.schedule,
            # ~6 attempts in the window; the adaptive schedule spaces its own checks
            every=None if plan.schedule == "adaptive" else max(1, int(plan.window * cfg.steps)
                                                                 // 6),
            max_drop=plan.max_drop, fits=self.fits, adaptive=cfg.adaptive,
            round_to=round_up_to(self.fast_widths) if plan.round_to_fast else None))
        out = Path(cfg.out).resolve() / "trials" / f"{cfg.study}-{trial.number:04d}"

        def report(record: dict[str, Any]) -> None:
            if cfg.pareto or not reducer.closed:
                return  # widths still moving (the adaptive window opens when the model is
                # ready, so a fixed step says nothing); multi-objective studies cannot prune
            trial.report(score(record["val"]), record["step"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"val {score(record['val']):.4f} at {record['step']}")

        summary = Trainer(model_config, cfg.train_config(**settings), data, out, reducer=reducer,
                          progress=False, on_eval=report).fit()
        dims = summary["best_state_dims"]
        constraints = self.constraints(dims)
        set_constraints(trial, constraints)
        metric = "accuracy" if data.task == "classification" else "loss"
        # uploaded before the trial completes: a failed upload fails the trial
        trial.set_user_attr("artifacts", self.artifacts.upload(
            trial, {name: out / name for name in TRIAL_FILES}))
        trial.set_user_attr("initial_state_dims", list(model_config.state_dims))
        trial.set_user_attr("state_dims", dims)
        trial.set_user_attr("train_settings", settings)
        trial.set_user_attr("predicted_ms", constraints["latency_ms"] + cfg.budget_ms)
        trial.set_user_attr("val", summary["val_best"])
        trial.set_user_attr("test", summary["test_best"][metric])
        trial.set_user_attr("train_time_s", summary["train_time_s"])
        if cfg.pareto:
            return summary["val_best"], constraints["latency_ms"] + cfg.budget_ms
        return summary["val_best"]
