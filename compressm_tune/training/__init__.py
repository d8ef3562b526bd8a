"""Datasets, the training loop, checkpoints, and in-training reduction."""

from compressm_tune.training.checkpoint import (
    file_sha256,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from compressm_tune.training.compressor import Compressor
from compressm_tune.training.data import DATASETS, Dataset, load_dataset
from compressm_tune.training.trainer import TrainConfig, Trainer, evaluate

__all__ = [
    "Compressor",
    "DATASETS",
    "Dataset",
    "TrainConfig",
    "Trainer",
    "evaluate",
    "file_sha256",
    "load_checkpoint",
    "load_dataset",
    "model_from_checkpoint",
    "save_checkpoint",
]
