"""The search space, define-by-run: plain Python inside the objective (Optuna's style).

What is searched is how to compress: every trial starts from the full width and the search
chooses the reduction schedule (tau, window, schedule kind, safety-net tolerance, HSV weighting,
rounding to fast widths) and the learning rate. Initial widths are searched only when the
config offers several (``state_dims``); settings the space leaves alone keep the defaults of
:class:`~compressm_tune.reduction.ReduceConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from compressm_tune.reduction import SCHEDULES, WEIGHTINGS
from compressm_tune.search._config import TuneConfig

__all__ = ["TrialPlan", "suggest"]


@dataclass(frozen=True)
class TrialPlan:
    """One trial's choices."""

    state_dim: int  # initial width of every block
    tau: float  # share of the HSV sum discarded at each cut
    window: float  # share of the steps in which cuts are attempted (and the LR warm-up)
    schedule: str  # when cuts happen inside the window (a reduction.SCHEDULES name)
    max_drop: float  # roll back a cut losing more validation score (points or relative loss)
    weighting: str  # LRU: rank states by their own HSVs ("none") or input-weighted ("input")
    round_to_fast: bool  # round ranks up to widths the profile shows are fast
    lr: float


def suggest(trial: optuna.Trial, config: TuneConfig) -> TrialPlan:
    """Ask ``trial`` for a plan. tau is log-uniform: the useful values span 0.005-0.3.

    The initial width is the full one unless ``config.state_dims`` offers several; the HSV
    weighting is searched for LRU layers only (selective layers are scored by their data).
    """
    widths = sorted(set(config.state_dims))
    return TrialPlan(
        state_dim=(trial.suggest_categorical("state_dim", widths) if len(widths) > 1
                   else widths[0]),
        tau=trial.suggest_float("tau", 0.005, 0.3, log=True),
        window=trial.suggest_float("window", 0.05, 0.3),
        schedule=trial.suggest_categorical("schedule", list(SCHEDULES)),
        max_drop=trial.suggest_float("max_drop", 0.01, 0.2, log=True),
        weighting=(trial.suggest_categorical("weighting", list(WEIGHTINGS))
                   if config.arch == "lru" else "none"),
        round_to_fast=trial.suggest_categorical("round_to_fast", [False, True]),
        lr=trial.suggest_float("lr", 1e-3, 1e-2, log=True),
    )
