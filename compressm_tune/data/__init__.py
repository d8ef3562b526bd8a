"""Datasets for training and compressing state-space models; nothing is downloaded.

:func:`load_dataset` returns a :class:`Dataset` for any name in :data:`DATASETS`.
"""

from compressm_tune.data._datasets import DATASETS, Dataset, SelectiveCopyConfig, load_dataset

__all__ = ["DATASETS", "Dataset", "SelectiveCopyConfig", "load_dataset"]
