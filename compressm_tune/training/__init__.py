"""The training loop, its optimizer and schedule, checkpoints, and reading a run's metrics."""

from compressm_tune.training.checkpoint import (
    file_sha256,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from compressm_tune.training.evaluation import (
    check_training_memory,
    distill_loss,
    evaluate,
    score,
)
from compressm_tune.training.plots import plot_hsv_trajectories, ranking_stability, read_metrics
from compressm_tune.training.trainer import (
    MAMBA2_SCAN_SETTING,
    RunSettings,
    TrainConfig,
    Trainer,
    dataset_record,
)

__all__ = [
    "MAMBA2_SCAN_SETTING",
    "RunSettings",
    "TrainConfig",
    "Trainer",
    "check_training_memory",
    "dataset_record",
    "distill_loss",
    "evaluate",
    "file_sha256",
    "load_checkpoint",
    "model_from_checkpoint",
    "plot_hsv_trajectories",
    "ranking_stability",
    "read_metrics",
    "save_checkpoint",
    "score",
]
