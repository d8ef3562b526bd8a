"""The checkpoint's dataset, rebuilt on this machine: parity inputs and the int8 accuracy check.

A checkpoint records its dataset (name, seed, normalization, ``info``), so the built-in ones
can be regenerated here; a user's ``.npz`` only while it is still at the recorded path, and
``smnist`` not at all (the checkpoint does not record the IDX folder). Callers fall back (N(0, 1)
parity inputs, a skipped accuracy check) and record why.
"""

from __future__ import annotations

from typing import Any

from compressm_tune.errors import CompressmError

__all__ = ["rebuild_dataset"]


def rebuild_dataset(dataset: dict | None, train_seed: int, d_input: int):
    """``(Dataset, None)``, or ``(None, reason)`` when the dataset cannot be rebuilt here.

    ``dataset`` is the checkpoint's entry; ``train_seed`` the training run's seed (it seeds the
    splits); ``d_input`` the model's input width, which the rebuilt data must have.
    """
    from compressm_tune.data import DATASETS, SelectiveCopyConfig, load_dataset

    if not dataset or "name" not in dataset:
        return None, "the checkpoint records no dataset"
    name, info = dataset["name"], dataset.get("info") or {}
    if name not in DATASETS:
        return None, f"dataset {name!r} is not one load_dataset can rebuild"
    if name == "smnist":
        return None, "smnist needs the user's IDX folder, which the checkpoint does not record"
    kwargs: dict[str, Any] = {"seed": train_seed}
    if name == "npz":
        kwargs["path"] = info.get("path")
    if name == "selective-copy" and "config" in info:
        kwargs["copy_config"] = SelectiveCopyConfig(**info["config"])
    try:
        ds = load_dataset(name, **kwargs)
    except (CompressmError, OSError) as exc:
        return None, f"cannot rebuild dataset {name!r} here: {exc}"
    if ds.d_input != d_input:
        return None, f"the rebuilt {name!r} has {ds.d_input} input channels, the model {d_input}"
    return ds, None
