"""The budgeted search: Optuna over in-training reduction schedules, then export + measure.

:func:`run_tune` is the whole job (``_run``); one trial is ``_objective`` (its choices from
``_space``); the study and its storage are ``_study``, the artifact store every worker shares
(trial checkpoints, the chosen bundle) ``_artifacts``, and the finalizer's election through the
storage ``_elect``; choosing and measuring the winner is ``_finalize``; ``summary.json`` and
``report.md`` are ``_report``. :func:`compress_folder` (``_compress``) compresses a pretrained
model folder after training, its widths under the same kind of budget.
"""

from compressm_tune.errors import ArtifactStoreError, BudgetMissedError, StorageError
from compressm_tune.search._compress import (
    BUILTIN_TEXT,
    DISTILL,
    SUMMARY,
    CompressConfig,
    compress_folder,
    finetune_compressed,
    load_token_data,
)
from compressm_tune.search._config import LATENCY_MODES, TuneConfig, parse_relative_budget
from compressm_tune.search._run import resolve_profile, run_tune
from compressm_tune.search._space import TrialPlan, suggest
from compressm_tune.search._study import open_storage

__all__ = [
    "BUILTIN_TEXT",
    "SUMMARY",
    "CompressConfig",
    "DISTILL",
    "LATENCY_MODES",
    "ArtifactStoreError",
    "BudgetMissedError",
    "StorageError",
    "TrialPlan",
    "TuneConfig",
    "compress_folder",
    "finetune_compressed",
    "load_token_data",
    "open_storage",
    "parse_relative_budget",
    "resolve_profile",
    "run_tune",
    "suggest",
]
