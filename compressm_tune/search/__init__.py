"""The budgeted search: Optuna over in-training reduction schedules, then export + measure."""

from compressm_tune.search._config import LATENCY_MODES, TuneConfig
from compressm_tune.search._job import BudgetMissedError, resolve_profile, run_tune
from compressm_tune.search._space import TrialPlan, suggest
from compressm_tune.search._storage import StorageError, open_storage

__all__ = [
    "LATENCY_MODES",
    "BudgetMissedError",
    "StorageError",
    "TrialPlan",
    "TuneConfig",
    "open_storage",
    "resolve_profile",
    "run_tune",
    "suggest",
]
