"""The search space, define-by-run: plain Python inside the objective (Optuna's style)."""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from compressm_tune.search._config import TuneConfig

__all__ = ["TrialPlan", "suggest"]


@dataclass(frozen=True)
class TrialPlan:
    """One trial's choices."""

    state_dim: int  # initial width of every block
    tau: float  # share of the HSV sum discarded at each cut
    window: float  # share of the steps in which cuts are attempted
    round_to_fast: bool  # round ranks up to widths the profile shows are fast
    lr: float


def suggest(trial: optuna.Trial, config: TuneConfig) -> TrialPlan:
    """Ask ``trial`` for a plan. tau is log-uniform: the useful values span 0.005-0.3."""
    return TrialPlan(
        state_dim=trial.suggest_categorical("state_dim", sorted(config.state_dims)),
        tau=trial.suggest_float("tau", 0.005, 0.3, log=True),
        window=trial.suggest_float("window", 0.05, 0.3),
        round_to_fast=trial.suggest_categorical("round_to_fast", [False, True]),
        lr=trial.suggest_float("lr", 1e-3, 1e-2, log=True),
    )
