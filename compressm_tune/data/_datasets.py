"""The :class:`Dataset` every loader returns, and :func:`load_dataset`, which picks the loader
by name, carves a seeded validation split from train and normalizes the inputs.

Inputs are float32 ``(n, L, d_input)``, normalized per channel with the statistics of the final
train split (after validation is carved out), so ``norm_mean``/``norm_std`` are exactly what an
edge user applies to raw input. The one-hot inputs of ``selective-copy`` and ``pystdlib-chars``
are left as they are (``norm_mean`` 0, ``norm_std`` 1): standardizing an indicator only rescales
it, and a token absent from a small train split would get a near-zero std. Real data shipped in
packages (the ``datasets`` extra, :mod:`._real`): ``digits`` (scikit-learn's handwritten digits
as 64-step sequences) and the forecasting series ``sunspots``, ``co2``, ``elnino``
(statsmodels, split in time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from compressm_tune.data._arrays import _savez_atomic, _split
from compressm_tune.data._builtin import SelectiveCopyConfig, _lti, _mnist1d, _selective_copy
from compressm_tune.data._files import _npz, _smnist
from compressm_tune.data._pystdlib import pystdlib_chars
from compressm_tune.data._real import SERIES, digits, series
from compressm_tune.errors import ConfigError, DataError

__all__ = ["DATASETS", "Dataset", "load_dataset"]

DATASETS = ("mnist1d", "lti-sysid", "selective-copy", "npz", "smnist", "pystdlib-chars",
            "digits", "sunspots", "co2", "elnino")

_STD_FLOOR = 1e-8  # keeps constant input channels finite after normalization


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train/val/test tensors of one dataset plus what an exporter must record.

    Attributes
    ----------
    name, task : str
        Dataset name (one of ``DATASETS``) and ``"classification"`` or ``"regression"``.
    x_train, x_val, x_test : torch.Tensor
        float32 ``(n, seq_len, d_input)``, normalized with the train statistics. Variable-length
        ``npz`` sequences keep their trailing NaN padding (whole steps), which
        :class:`~compressm_tune.models.SSMModel` masks (``info["padding"]`` says so).
    y_train, y_val, y_test : torch.Tensor
        Classification: int64 class ids in ``[0, d_output)``, either ``(n,)`` (one label per
        sequence) or ``(n, M)`` (one label per answer token, scored at the model's last ``M``
        output steps: ``selective-copy``). Regression: float32 ``(n, seq_len, d_output)``
        targets (not normalized).
    d_input, d_output, seq_len : int
        Input channels; number of classes or output channels; sequence length.
    norm_mean, norm_std : list of float
        Per input channel, length ``d_input``: ``x = (raw - norm_mean) / norm_std``.
    info : dict
        JSON-serializable extras (``lti-sysid``: ``true_order``, ``noise_std``, ``poles``;
        ``selective-copy``: its ``config``, ``chance_accuracy`` and ``channels``).

    Examples
    --------
    >>> ds = load_dataset("lti-sysid")
    >>> raw_u = ds.x_test * torch.tensor(ds.norm_std) + torch.tensor(ds.norm_mean)  # (500, 200, 1)
    >>> ds.x_test.dtype, ds.y_test.dtype, round(raw_u.std().item(), 1)
    (torch.float32, torch.float32, 1.0)
    """

    name: str
    task: str
    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_val: torch.Tensor = field(repr=False)
    y_val: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    d_input: int
    d_output: int
    seq_len: int
    norm_mean: list[float]
    norm_std: list[float]
    info: dict

    @property
    def pooling(self) -> str:
        """The ``SSMConfig.pooling`` a model for this dataset needs.

        ``"mean"`` (one output per sequence) for labels ``(n,)``; ``"none"`` (one output per
        step) for regression targets and for per-token labels ``(n, M)``.

        Examples
        --------
        >>> load_dataset("lti-sysid").pooling
        'none'
        """
        return "mean" if self.task == "classification" and self.y_train.ndim == 1 else "none"


def load_dataset(
    name: str,
    *,
    path: str | None = None,
    data_dir: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | None = None,
    copy_config: SelectiveCopyConfig | None = None,
) -> Dataset:
    """Load a dataset by name, carve a seeded validation split from train, and normalize.

    Parameters
    ----------
    name : str
        One of ``DATASETS``: ``"mnist1d"``, ``"lti-sysid"``, ``"selective-copy"``, ``"npz"``,
        ``"smnist"``, ``"pystdlib-chars"``, ``"digits"``, ``"sunspots"``, ``"co2"``,
        ``"elnino"``.
    path : str, optional
        The ``.npz`` file; required by ``"npz"`` and rejected by the others.
    data_dir : str, optional
        Folder with the four MNIST IDX files; required by ``"smnist"``, rejected by the others.
    val_fraction : float
        Share of the train split moved to validation, in ``(0, 0.5]`` (``pystdlib-chars``
        has validation files of its own and ignores it; the forecasting series take it as
        the share of the series, in time, before the test part).
    seed : int
        Non-negative; seeds the validation split, the ``npz`` test split, the ``lti-sysid``
        signals (its system is fixed) and the ``selective-copy`` sequences. The mnist1d arrays
        themselves always come from mnist1d's own published seed; the forecasting series'
        splits are chronological and do not depend on it.
    cache_dir : str, optional
        Where ``"mnist1d"`` and ``"pystdlib-chars"`` cache their arrays; default
        ``$COMPRESSM_CACHE`` or ``~/.cache/compressm-tune``.
    copy_config : SelectiveCopyConfig, optional
        Sizes of ``"selective-copy"`` (default ``SelectiveCopyConfig()``); rejected by the others.

    Returns
    -------
    Dataset

    Raises
    ------
    ConfigError
        Unknown ``name``, ``val_fraction`` outside ``(0, 0.5]``, a negative or non-integer
        ``seed``, or ``path`` / ``data_dir`` / ``copy_config`` given to a dataset that does not
        use it (or a ``copy_config`` that is not a :class:`SelectiveCopyConfig`).
    MissingDependencyError
        The package a dataset ships in is not installed (the ``datasets`` extra).
    DataError
        ``path`` / ``data_dir`` not given where needed; a data file or folder missing,
        unreadable or malformed; or a split that would hold fewer than 2 samples.

    Examples
    --------
    >>> ds = load_dataset("lti-sysid", seed=0)
    >>> ds.task, tuple(ds.x_train.shape), tuple(ds.y_test.shape), ds.info["true_order"]
    ('regression', (1800, 200, 1), (500, 200, 1), 8)
    >>> ds = load_dataset("selective-copy", copy_config=SelectiveCopyConfig(seq_len=32))
    >>> ds.task, ds.pooling, tuple(ds.x_test.shape), tuple(ds.y_test.shape), ds.d_output
    ('classification', 'none', (1000, 32, 10), (1000, 4), 8)
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction <= 0.5:
        raise ConfigError(f"val_fraction must lie in (0, 0.5], got {val_fraction=}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed=}")
    if path is not None and name != "npz":
        raise ConfigError(f"path= is only used by dataset 'npz', not {name!r}")
    if data_dir is not None and name != "smnist":
        raise ConfigError(f"data_dir= is only used by dataset 'smnist', not {name!r}")
    if copy_config is not None and name != "selective-copy":
        raise ConfigError(f"copy_config= is only used by dataset 'selective-copy', not {name!r}")
    if copy_config is not None and not isinstance(copy_config, SelectiveCopyConfig):
        raise ConfigError(f"copy_config must be a SelectiveCopyConfig, got {copy_config!r}")
    rng = np.random.default_rng(seed)
    if name == "mnist1d":
        raw = _mnist1d(_cache_root(cache_dir))
    elif name == "lti-sysid":
        raw = _lti(rng)
    elif name == "selective-copy":
        raw = _selective_copy(copy_config or SelectiveCopyConfig(), rng)
        return _build(name, *raw, val_fraction=val_fraction, rng=rng, normalize=False)
    elif name == "pystdlib-chars":
        return _chars(_cache_root(cache_dir))
    elif name == "digits":
        raw = digits()
    elif name in SERIES:
        task, train, val, test, d_output, info = series(name, val_fraction)
        return _build(name, task, train, test, d_output, info, val_fraction=val_fraction,
                      rng=rng, val=val)
    elif name == "npz":
        raw = _npz(path, rng)
    else:
        raw = _smnist(data_dir)
    return _build(name, *raw, val_fraction=val_fraction, rng=rng)


# ----------------------------------------------------------------------------- shared helpers


def _build(name, task, train, test, d_output, info, *, val_fraction, rng,
           normalize: bool = True, val=None) -> Dataset:
    """Carve validation from ``train`` (x (n, L, d), y), normalize x with train stats, wrap.

    ``task, train, test, d_output, info`` are what every ``_<source>`` loader returns. With
    ``normalize=False`` the statistics recorded are the identity (mean 0, std 1). ``val``:
    a validation split the loader made itself (then ``train`` is kept whole).
    """
    if val is None:
        (x_tr, y_tr), (x_val, y_val) = _split(*train, val_fraction, rng, "val")
    else:
        (x_tr, y_tr), (x_val, y_val) = train, val
    x_test, y_test = test
    if normalize:
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            mean = np.nanmean(x_tr, axis=(0, 1), dtype=np.float64)  # (d,) padding left out
            std = np.maximum(np.nanstd(x_tr, axis=(0, 1), dtype=np.float64), _STD_FLOOR)
        if not (np.isfinite(mean).all() and np.isfinite(std).all()):
            raise DataError(f"inputs of {name} are too large to normalize (their standard "
                            f"deviation overflows float64, max |x| "
                            f"{np.nanmax(np.abs(x_tr)):.3g}); "
                            "rescale them")
    else:
        mean, std = np.zeros(x_tr.shape[2]), np.ones(x_tr.shape[2])  # (d,) each
    y_dtype = np.int64 if task == "classification" else np.float32

    def x_tensor(x: np.ndarray) -> torch.Tensor:
        shift, scale = mean.astype(x.dtype), std.astype(x.dtype)  # keep float32 data float32
        return torch.from_numpy(((x - shift) / scale).astype(np.float32))  # (n, L, d)

    def y_tensor(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(y, dtype=y_dtype))

    return Dataset(
        name=name,
        task=task,
        x_train=x_tensor(x_tr),
        y_train=y_tensor(y_tr),
        x_val=x_tensor(x_val),
        y_val=y_tensor(y_val),
        x_test=x_tensor(x_test),
        y_test=y_tensor(y_test),
        d_input=x_tr.shape[2],
        d_output=int(d_output),
        seq_len=x_tr.shape[1],
        norm_mean=mean.tolist(),
        norm_std=std.tolist(),
        info=info,
    )


# ----------------------------------------------------------------------------- caches


def _cache_root(cache_dir: str | None) -> Path:
    """``cache_dir``, else ``$COMPRESSM_CACHE``, else ``~/.cache/compressm-tune``."""
    root = cache_dir or os.environ.get("COMPRESSM_CACHE") or Path.home() / ".cache/compressm-tune"
    return Path(root).expanduser()



# ----------------------------------------------------------------------------- pystdlib-chars


def _chars(cache_root: Path) -> Dataset:
    """One-hot characters ``(n, L, V)`` and next-character labels ``(n, L)`` per split."""
    ids, info = pystdlib_chars(cache_root, _savez_atomic)
    vocab = len(info["vocab_bytes"]) + 1  # + the unknown id
    eye = np.eye(vocab, dtype=np.float32)  # (V, V)

    def x_tensor(split: str) -> torch.Tensor:
        return torch.from_numpy(eye[ids[split][:, :-1]])  # (n, L, V)

    def y_tensor(split: str) -> torch.Tensor:
        return torch.from_numpy(ids[split][:, 1:].astype(np.int64))  # (n, L)

    return Dataset(name="pystdlib-chars", task="classification",
                   x_train=x_tensor("train"), y_train=y_tensor("train"),
                   x_val=x_tensor("val"), y_val=y_tensor("val"),
                   x_test=x_tensor("test"), y_test=y_tensor("test"),
                   d_input=vocab, d_output=vocab, seq_len=ids["train"].shape[1] - 1,
                   norm_mean=[0.0] * vocab, norm_std=[1.0] * vocab, info=info)
