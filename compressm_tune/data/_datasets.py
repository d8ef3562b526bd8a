"""Datasets for training and compressing state-space models; nothing is downloaded.

``mnist1d`` (mnist1d's ``make_dataset`` with its published defaults, cached), ``lti-sysid``
(white noise through one fixed stable order-8 system), ``selective-copy`` (Gu & Dao's selective
copying task, generated from the seed), ``npz`` (user arrays), ``smnist`` (sequential MNIST
from the user's IDX files) and ``pystdlib-chars`` (next-character prediction on the Python
standard library's sources, split by file; see :mod:`._pystdlib`). Every loader returns a
:class:`Dataset` whose inputs are float32 ``(n, L, d_input)``, normalized per channel with the
statistics of the final train split (after validation is carved out), so
``norm_mean``/``norm_std`` are exactly what an edge user applies to raw input. The exceptions
are the one-hot inputs of ``selective-copy`` and ``pystdlib-chars``, left as they are
(``norm_mean`` 0, ``norm_std`` 1), since standardizing an indicator only rescales it and a
token that happens to be absent from a small train split would get a near-zero std.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import os
import random
import warnings
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.linalg import solve_discrete_lyapunov

from compressm_tune._io import atomic_write
from compressm_tune.data._pystdlib import pystdlib_chars
from compressm_tune.errors import ConfigError, DataError, MissingDependencyError

__all__ = ["DATASETS", "Dataset", "SelectiveCopyConfig", "load_dataset"]

DATASETS = ("mnist1d", "lti-sysid", "selective-copy", "npz", "smnist", "pystdlib-chars")

_STD_FLOOR = 1e-8  # keeps constant input channels finite after normalization
_CACHE_LAYOUT = 1  # bump when the cached array layout changes; it is part of the cache key
_NPZ_TEST_FRACTION = 0.2  # test split carved from an .npz that has no x_test/y_test
_MAX_CLASSES = 2**16  # class ids beyond this are an encoding bug, not a label space
_LTI_SYSTEM_SEED = 7  # fixed system for every `seed`; its smallest Hankel SV is 3% of its largest
_LTI_ORDER = 8
_LTI_SEQ_LEN = 200
_LTI_N_TRAIN, _LTI_N_TEST = 2000, 500
_LTI_NOISE_STD = 0.01
_MNIST_CLASSES = 10
_IDX_MAGIC = {3: 2051, 1: 2049}  # ndim -> magic number (unsigned bytes, 3-D images / 1-D labels)
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


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


@dataclass(frozen=True)
class SelectiveCopyConfig:
    """Sizes of the ``selective-copy`` task (Gu & Dao 2023, Mamba, sec. 4.1.1).

    Each sequence has ``seq_len`` steps: ``n_copy`` data tokens, drawn uniformly from
    ``n_tokens`` symbols, sit at random distinct positions (in order) among blank tokens in the
    first ``seq_len - n_copy`` steps, followed by ``n_copy`` "answer here" marker tokens. The
    labels are the data tokens in order, to be emitted at the marker steps. Since the positions
    vary per sequence, no fixed (time-invariant) convolution kernel picks them out: a model has
    to decide from the content which inputs to remember. The defaults keep one training run on
    two CPU cores to minutes.

    Examples
    --------
    >>> SelectiveCopyConfig(seq_len=32).n_copy
    4
    """

    seq_len: int = 64  # L, markers included
    n_tokens: int = 8  # K data symbols; chance accuracy is 1/K
    n_copy: int = 4  # M tokens to remember and copy
    n_train: int = 4000  # before validation is carved out of it
    n_test: int = 1000

    def __post_init__(self) -> None:
        for name in ("seq_len", "n_tokens", "n_copy", "n_train", "n_test"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"selective-copy {name} must be an integer, got {name}={value!r}")
        rules = {"n_tokens >= 2": self.n_tokens >= 2, "n_copy >= 1": self.n_copy >= 1,
                 "seq_len >= 2 * n_copy": self.seq_len >= 2 * self.n_copy,
                 "n_train >= 1": self.n_train >= 1, "n_test >= 1": self.n_test >= 1}
        for rule, ok in rules.items():
            if not ok:
                raise ConfigError(
                    f"selective-copy needs {rule}, got seq_len={self.seq_len} "
                    f"n_tokens={self.n_tokens} n_copy={self.n_copy} n_train={self.n_train} "
                    f"n_test={self.n_test}"
                )


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
        ``"smnist"``.
    path : str, optional
        The ``.npz`` file; required by ``"npz"`` and rejected by the others.
    data_dir : str, optional
        Folder with the four MNIST IDX files; required by ``"smnist"``, rejected by the others.
    val_fraction : float
        Share of the train split moved to validation, in ``(0, 0.5]`` (``pystdlib-chars``
        has validation files of its own and ignores it).
    seed : int
        Non-negative; seeds the validation split, the ``npz`` test split, the ``lti-sysid``
        signals (its system is fixed) and the ``selective-copy`` sequences. The mnist1d arrays
        themselves always come from mnist1d's own published seed.
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
        raise ConfigError(f"--data (path=) is only used with --dataset npz, not {name!r}")
    if data_dir is not None and name != "smnist":
        raise ConfigError(f"--data-dir (data_dir=) is only used with --dataset smnist, not "
                          f"{name!r}")
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
    elif name == "npz":
        raw = _npz(path, rng)
    else:
        raw = _smnist(data_dir)
    return _build(name, *raw, val_fraction=val_fraction, rng=rng)


# ----------------------------------------------------------------------------- shared helpers


def _split(x: np.ndarray, y: np.ndarray, fraction: float, rng: np.random.Generator, held: str):
    """Move ``round(n * fraction)`` samples to a held-out split; both keep >= 2.

    Class labels ``y`` (n,) are split stratified: each class sends its share of the held-out
    count (largest remainders settle the rounding), so a small validation split holds every
    class in proportion instead of whatever a random draw gives (a handful of samples chosen
    at random can miss a class entirely, and ``best.pt`` is picked on them). Other targets
    are split at random.
    """
    n = len(x)
    n_held = round(n * fraction)
    if n_held < 2 or n - n_held < 2:
        raise DataError(
            f"every split needs at least 2 samples, but moving {fraction:g} of {n} samples to "
            f"'{held}' leaves {n - n_held} / {n_held}; provide more data"
        )
    perm = rng.permutation(n)
    if y.ndim == 1 and y.dtype.kind in "iub":
        out = _stratified(y[perm], n_held)
        held_mask = np.zeros(n, dtype=bool)
        held_mask[out] = True
        keep, out = perm[~held_mask], perm[held_mask]
    else:
        keep, out = perm[n_held:], perm[:n_held]
    return (x[keep], y[keep]), (x[out], y[out])


def _stratified(y: np.ndarray, n_held: int) -> np.ndarray:
    """Positions in ``y`` (already shuffled) of ``n_held`` samples, each class's first ones,
    in proportion to its count (largest remainder rounding), leaving every class at least one
    sample to train on (so the held-out split may fall short of ``n_held`` when nearly every
    class is a singleton)."""
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    quota = n_held * counts / len(y)  # (K,) ideal held count per class
    room = np.maximum(counts - 1, 0)  # a class keeps one sample on the training side
    take = np.minimum(np.floor(quota).astype(int), room)
    while take.sum() < n_held and (take < room).any():  # largest remainders first
        left = np.where(take < room, quota - take, -np.inf)
        take[np.argmax(left)] += 1
    rank = np.empty(len(y), dtype=int)  # position of each sample within its class
    for k in range(len(classes)):
        members = np.flatnonzero(inverse == k)
        rank[members] = np.arange(len(members))
    return np.flatnonzero(rank < take[inverse])


def _build(name, task, train, test, d_output, info, *, val_fraction, rng,
           normalize: bool = True) -> Dataset:
    """Carve validation from ``train`` (x (n, L, d), y), normalize x with train stats, wrap.

    ``task, train, test, d_output, info`` are what every ``_<source>`` loader returns. With
    ``normalize=False`` the statistics recorded are the identity (mean 0, std 1).
    """
    (x_tr, y_tr), (x_val, y_val) = _split(*train, val_fraction, rng, "val")
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


# ----------------------------------------------------------------------------- mnist1d


def _cache_root(cache_dir: str | None) -> Path:
    """``cache_dir``, else ``$COMPRESSM_CACHE``, else ``~/.cache/compressm-tune``."""
    root = cache_dir or os.environ.get("COMPRESSM_CACHE") or Path.home() / ".cache/compressm-tune"
    return Path(root).expanduser()


def _mnist1d(cache_root: Path):
    """MNIST-1D from mnist1d's published default arguments, through the cache."""
    try:
        from mnist1d import data as m1d  # lazy: it imports requests and reseeds global RNGs
    except ImportError as exc:
        raise MissingDependencyError(f"'mnist1d' needs `pip install mnist1d`: {exc}") from exc
    args = m1d.get_dataset_args()  # ObjectView of the published defaults
    gen_args = {k: v for k, v in vars(args).items() if k != "url"}  # url never affects the data
    target = cache_root / f"mnist1d-{_cache_key(gen_args)}.npz"
    arrays = _read_mnist1d_cache(target, gen_args["final_seq_length"]) if target.exists() else None
    if arrays is None:
        if target.exists():
            warnings.warn(f"mnist1d cache {target} is corrupted; regenerating it", stacklevel=3)
        arrays = _generate_mnist1d(m1d, args)
        try:
            _savez_atomic(target, arrays)
        except OSError as exc:
            msg = f"cannot write mnist1d cache ({exc}); set cache_dir= or COMPRESSM_CACHE"
            warnings.warn(msg, stacklevel=3)
    train = (arrays["x"][..., None], arrays["y"])  # x (n, 40) -> (n, 40, 1)
    test = (arrays["x_test"][..., None], arrays["y_test"])
    return "classification", train, test, _MNIST_CLASSES, {"mnist1d_args": gen_args}


def _cache_key(gen_args: dict) -> str:
    """Hash of the generation arguments, the mnist1d version and the cache layout."""
    version = importlib.metadata.version("mnist1d")
    blob = json.dumps(
        {"args": gen_args, "version": version, "layout": _CACHE_LAYOUT}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _generate_mnist1d(m1d, args) -> dict[str, np.ndarray]:
    """Run ``make_dataset`` without leaking its ``np.random``/``random`` reseeding to callers."""
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        data = m1d.make_dataset(args)
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


def _read_mnist1d_cache(target: Path, seq_len: int) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is unreadable or inconsistent."""
    try:
        with np.load(target, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("x", "y", "x_test", "y_test")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    x, y, x_test, y_test = arrays.values()
    if not (len(x) and len(x_test) and x.shape[1:] == x_test.shape[1:] == (seq_len,)):
        return None
    if y.shape != x.shape[:1] or y_test.shape != x_test.shape[:1]:
        return None
    labels = np.concatenate([y, y_test])
    finite = np.isfinite(x).all() and np.isfinite(x_test).all()
    return arrays if finite and labels.min() >= 0 and labels.max() < _MNIST_CLASSES else None


def _savez_atomic(target: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``target`` via a temp file in the same folder and ``os.replace``."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
            np.savez(fh, **arrays)

    atomic_write(target, write)


# ----------------------------------------------------------------------------- lti-sysid


def _lti_system() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed order-8 system: A (8, 8) of 2x2 rotation-scaling blocks, B (8, 1), C (1, 8).

    Pole moduli are uniform in [0.6, 0.95], phases uniform in [0.1, pi - 0.1] (so each pair is
    genuinely complex); C is scaled to unit H2 norm, i.e. unit stationary output std for unit
    white-noise input. Returns ``(a, b, c, poles)`` with ``poles`` complex (8,), as conjugate pairs.
    """
    rng = np.random.default_rng(_LTI_SYSTEM_SEED)
    moduli = rng.uniform(0.6, 0.95, _LTI_ORDER // 2)
    phases = rng.uniform(0.1, np.pi - 0.1, _LTI_ORDER // 2)
    a = np.zeros((_LTI_ORDER, _LTI_ORDER))
    for i, (r, th) in enumerate(zip(moduli, phases, strict=True)):
        a[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = r * np.array(
            [[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]
        )
    b = rng.standard_normal((_LTI_ORDER, 1))
    c = rng.standard_normal((1, _LTI_ORDER))
    gramian = solve_discrete_lyapunov(a, b @ b.T)  # controllability Gramian (8, 8)
    c /= np.sqrt((c @ gramian @ c.T).item())
    pairs = moduli * np.exp(1j * phases)
    return a, b, c, np.stack([pairs, pairs.conj()], axis=1).ravel()


def _simulate(a: np.ndarray, b: np.ndarray, c: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Zero-initial-state response ``y_t = C s_t``, ``s_{t+1} = A s_t + B u_t`` (D = 0).

    ``u`` is (n, L, 1); returns y (n, L, 1) float64.
    """
    state = np.zeros((u.shape[0], a.shape[0]))  # (n, order)
    y = np.empty(u.shape)  # (n, L, 1)
    for t in range(u.shape[1]):
        y[:, t] = state @ c.T  # (n, 1)
        state = state @ a.T + u[:, t] @ b.T  # (n, order)
    return y


def _lti(rng: np.random.Generator):
    """White noise u (n, L, 1) through the fixed system, plus noise; ``rng`` draws both."""
    a, b, c, poles = _lti_system()
    u = rng.standard_normal((_LTI_N_TRAIN + _LTI_N_TEST, _LTI_SEQ_LEN, 1))  # (n, L, 1)
    y = _simulate(a, b, c, u) + _LTI_NOISE_STD * rng.standard_normal(u.shape)  # (n, L, 1)
    info = {
        "true_order": _LTI_ORDER,
        "noise_std": _LTI_NOISE_STD,
        "poles": [[float(p.real), float(p.imag)] for p in poles],
        "system_seed": _LTI_SYSTEM_SEED,
    }
    n = _LTI_N_TRAIN
    return "regression", (u[:n], y[:n]), (u[n:], y[n:]), 1, info


# ----------------------------------------------------------------------------- selective-copy


def _selective_copy(cfg: SelectiveCopyConfig, rng: np.random.Generator):
    """One-hot sequences (n, L, K + 2) and labels (n, M) of the selective copying task.

    Token ids: ``0..K-1`` data, ``K`` blank, ``K + 1`` marker; channel ``i`` of the one-hot
    input is token id ``i``. ``rng`` draws train and test in one go, positions then tokens.
    """
    n, length, k, m = cfg.n_train + cfg.n_test, cfg.seq_len, cfg.n_tokens, cfg.n_copy
    context = length - m  # steps before the markers
    order = rng.random((n, context)).argsort(axis=1)  # (n, context) a random permutation per row
    positions = np.sort(order[:, :m], axis=1)  # (n, M) distinct, increasing
    tokens = rng.integers(0, k, size=(n, m))  # (n, M) the labels
    ids = np.full((n, length), k)  # (n, L) blank everywhere
    np.put_along_axis(ids, positions, tokens, axis=1)
    ids[:, context:] = k + 1  # the M "answer here" markers
    x = np.eye(k + 2, dtype=np.float32)[ids]  # (n, L, K + 2)
    info = {
        "config": asdict(cfg),
        "chance_accuracy": 1 / k,
        "channels": f"one-hot: 0..{k - 1} data tokens, {k} blank, {k + 1} marker",
        "answers": f"labels (n, {m}) are scored at the model's last {m} output steps",
    }
    n_tr = cfg.n_train
    return "classification", (x[:n_tr], tokens[:n_tr]), (x[n_tr:], tokens[n_tr:]), k, info


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


# ----------------------------------------------------------------------------- npz


def _npz(path: str | None, rng: np.random.Generator):
    """User arrays: classification when ``y`` is (n,), regression when it is (n, L, d_out).

    Class labels may be of any kind (strings, 1..K, -1/+1, arbitrary integers): the distinct
    labels of ``y``, sorted, become class ids 0..K-1, and ``info["labels"]`` lists them (id ->
    original label), so a checkpoint and an export bundle can report the user's own labels.
    Labels of ``y_test`` that ``y`` never has are refused: no model could learn them.
    """
    if path is None:
        raise DataError("dataset 'npz' needs path= pointing to an .npz file with keys 'x', 'y'")
    arrays = _read_npz(path)
    x, y = _check_pair(arrays["x"], arrays["y"], "", path)
    task = "classification" if y.ndim == 1 else "regression"
    info: dict = {"path": str(Path(path).resolve())}
    lengths = (~np.isnan(x).all(axis=2)).sum(axis=1)  # (n,) see _padding
    if (lengths < x.shape[1]).any():
        info["padding"] = {"kind": "trailing NaN", "min_length": int(lengths.min()),
                           "max_length": int(x.shape[1])}
    if task == "classification":
        labels, y = np.unique(y, return_inverse=True)  # (K,) sorted; y -> ids (n,)
        if len(labels) < 2:
            raise DataError(f"classification needs at least 2 distinct labels in y, got only "
                            f"{labels.tolist()} in {path}")
        if len(labels) > _MAX_CLASSES:
            raise DataError(f"y in {path} holds {len(labels)} distinct labels, more than "
                            f"{_MAX_CLASSES} classes (the output layer would not fit)")
        info["labels"] = labels.tolist()  # JSON-ready: str, int or float per class id
    d_output = len(info["labels"]) if task == "classification" else y.shape[2]
    if "x_test" in arrays:
        x_test, y_test = _check_pair(arrays["x_test"], arrays["y_test"], "_test", path)
        if x_test.shape[1:] != x.shape[1:] or y_test.shape[1:] != y.shape[1:]:
            raise DataError(
                f"x_test/y_test in {path} must match x/y in all but the first axis: "
                f"x {x.shape}, y {y.shape} vs x_test {x_test.shape}, y_test {y_test.shape}"
            )
        if task == "classification":
            y_test = _label_ids(y_test, labels, path)
        test_split = "file"
    else:
        (x, y), (x_test, y_test) = _split(x, y, _NPZ_TEST_FRACTION, rng, "test")
        test_split = f"random {_NPZ_TEST_FRACTION:.0%}"
    info["test_split"] = test_split
    return task, (x, y), (x_test, y_test), d_output, info


def _label_ids(y: np.ndarray, labels: np.ndarray, path: str) -> np.ndarray:
    """Class ids of ``y`` under the train labels ``labels`` (sorted); unknown labels refused."""
    if y.dtype.kind in "US" and labels.dtype.kind not in "US" or (
            labels.dtype.kind in "US" and y.dtype.kind not in "US"):
        raise DataError(f"y_test in {path} holds {y.dtype} labels but y holds {labels.dtype}; "
                        "give both the same kind of label")
    ids = np.clip(np.searchsorted(labels, y), 0, len(labels) - 1)  # (n,)
    unknown = labels[ids] != y
    if unknown.any():
        raise DataError(f"y_test in {path} holds label {y[unknown][0].item()!r}, which y never has "
                        f"(its labels: {labels.tolist()[:20]})")
    return ids


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """The ``x``, ``y`` (and ``x_test``, ``y_test`` when present) arrays of an .npz file."""
    if not Path(path).is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as an .npz archive: {exc}") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array, not an .npz archive with keys 'x', 'y'")
    with npz:
        present = sorted(npz.files)
        missing = [k for k in ("x", "y") if k not in present]
        if missing:
            raise DataError(
                f"{path} must contain keys 'x', 'y'; missing {missing}, found {present}"
            )
        if ("x_test" in present) != ("y_test" in present):
            raise DataError(f"{path} must hold both x_test, y_test or neither; found {present}")
        keys = [k for k in ("x", "y", "x_test", "y_test") if k in present]
        try:
            return {k: npz[k] for k in keys}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"cannot read arrays {keys} from {path}: {exc}") from exc


def _check_pair(x: np.ndarray, y: np.ndarray, suffix: str, path: str):
    """Validate one (x, y) pair; return x float64 (n, L, d) and y, either class labels (n,)
    as given (numbers, strings or booleans; mapped to ids by the caller) or float32 targets
    (n, L, d). Trailing NaNs of a sequence are its padding (see :func:`_padding`)."""
    xn, yn = f"x{suffix}", f"y{suffix}"
    for key, arr, ndims in ((xn, x, (2, 3)), (yn, y, (1, 3))):
        labels = key == yn and arr.ndim == 1
        if arr.dtype.kind not in ("iufbUS" if labels else "iuf"):
            kinds = "numbers, strings or booleans" if labels else "a real numeric array"
            raise DataError(f"{key} in {path} must be {kinds}, got dtype {arr.dtype}")
        if arr.ndim not in ndims:
            raise DataError(f"{key} in {path} must have ndim in {ndims}, got shape {arr.shape}")
        if arr.size == 0:
            raise DataError(f"{key} in {path} must be non-empty, got shape {arr.shape}")
        if key == xn or arr.dtype.kind not in "f":
            continue  # x: see _padding
        finite = np.isfinite(arr)
        x3 = x if x.ndim == 3 else x[..., None]  # (n, L, d)
        if arr.ndim == 3 and arr.shape[:2] == x3.shape[:2]:  # NaN targets where x is padding
            finite |= np.isnan(arr) & np.isnan(x3).all(axis=2, keepdims=True)
        if not finite.all():
            first = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise DataError(f"{key} in {path} must be finite, found {arr[first]} at {first}")
    _padding(x, xn, path)
    x = x[..., None] if x.ndim == 2 else x  # (n, L) -> (n, L, 1)
    if len(x) != len(y):
        raise DataError(f"{xn} and {yn} in {path} must have equal length, got {len(x)} vs {len(y)}")
    if y.ndim == 3:
        if y.shape[1] != x.shape[1]:
            raise DataError(
                f"{yn} in {path} must have length {x.shape[1]} on axis 1, got {y.shape}"
            )
        y = y.astype(np.float32)
        y[np.isnan(x).all(axis=2)] = np.nan  # padded steps: left out of loss and metrics
        return x.astype(np.float64), y
    if y.dtype.kind == "f" and (y != np.round(y)).any():
        raise DataError(f"class labels {yn} in {path} must be whole numbers or strings, found "
                        f"{y[y != np.round(y)][0]} (a regression target needs shape (n, L, d))")
    if y.dtype.kind == "f":
        y = y.astype(np.int64)  # whole-number labels: ids print as 1, not 1.0
    return x.astype(np.float64), y


def _padding(x: np.ndarray, name: str, path: str) -> np.ndarray:
    """Each sequence's true length from trailing NaN padding of ``x`` (n, L, d).

    Variable-length series are brought padded to the longest with NaN at the end: a step whose
    channels are all NaN is padding; it must come after every real step, and a sequence needs
    at least one real step. Any other non-finite value (inf, a NaN among real steps or in some
    channels only) is refused, naming the first one. Returns lengths (n,) int64.
    """
    x3 = x if x.ndim == 3 else x[..., None]  # (n, L, d)
    pad = np.isnan(x3).all(axis=2)  # (n, L) padded steps
    lengths = (~pad).sum(axis=1)  # (n,)
    trailing = np.arange(x.shape[1])[None, :] >= lengths[:, None]  # (n, L)
    bad = ~np.isfinite(x3) & ~(pad & trailing)[..., None]  # (n, L, d)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])[:x.ndim]  # in the user's shape
        hint = (" (NaN is allowed only as trailing padding of a whole step)"
                if np.isnan(x[first]) else "")
        raise DataError(f"{name} in {path} must be finite, found {x[first]} at {first}{hint}")
    if (lengths == 0).any():
        empty = int(np.flatnonzero(lengths == 0)[0])
        raise DataError(f"{name} in {path}: sequence {empty} is all NaN padding (no real step)")
    return lengths


# ----------------------------------------------------------------------------- smnist


def _smnist(data_dir: str | None):
    """Sequential MNIST: pixels / 255 read row-major into (n, rows * cols, 1) sequences."""
    expected = [n for pair in _IDX_FILES.values() for n in pair]
    hint = f"expected {expected} (each optionally .gz)"
    if data_dir is None:
        raise DataError(f"dataset 'smnist' needs data_dir= holding the MNIST IDX files; {hint}")
    if not Path(data_dir).is_dir():
        raise DataError(f"smnist data_dir {data_dir} is not a folder; {hint}")
    files = {base: _find_idx(Path(data_dir), base) for base in expected}
    missing = [base for base, found in files.items() if found is None]
    if missing:
        raise DataError(f"missing MNIST IDX files {missing} in {data_dir}; {hint}")
    train = _read_idx_pair(*(files[base] for base in _IDX_FILES["train"]))
    test = _read_idx_pair(*(files[base] for base in _IDX_FILES["test"]))
    if train[0].shape[1] != test[0].shape[1]:
        sizes = f"{train[0].shape[1]} vs {test[0].shape[1]}"
        raise DataError(f"train and test images in {data_dir} must match in size, got {sizes}")
    info = {"data_dir": str(Path(data_dir).resolve()), "files": [f.name for f in files.values()]}
    return "classification", train, test, _MNIST_CLASSES, info


def _find_idx(data_dir: Path, base: str) -> Path | None:
    """``data_dir / base``, else its ``.gz`` sibling, else None."""
    for candidate in (data_dir / base, data_dir / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 (n, rows * cols, 1) in [0, 1] and labels int64 (n,) in [0, 10)."""
    x = _read_idx(images, ndim=3)  # (n, rows, cols) uint8
    y = _read_idx(labels, ndim=1)  # (n,) uint8
    if len(x) != len(y):
        raise DataError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    if (y >= _MNIST_CLASSES).any():
        bad = int(y[y >= _MNIST_CLASSES][0])
        raise DataError(f"labels must lie in [0, {_MNIST_CLASSES}), found {bad!r} in {labels}")
    return x.reshape(len(x), -1, 1) / np.float32(255), y.astype(np.int64)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (big-endian header: magic, then ``ndim`` sizes)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    header_len = 4 * (ndim + 1)
    if len(raw) < header_len:
        raise DataError(f"IDX file {path} is truncated: {len(raw)} bytes < {header_len} of header")
    magic, *dims = np.frombuffer(raw[:header_len], dtype=">u4").tolist()
    if magic != _IDX_MAGIC[ndim]:
        raise DataError(f"IDX file {path} must start with magic {_IDX_MAGIC[ndim]}, got {magic}")
    n_bytes = int(np.prod(dims))
    if n_bytes == 0:
        raise DataError(f"IDX file {path} must be non-empty, got sizes {dims}")
    if len(raw) - header_len != n_bytes:
        raise DataError(
            f"IDX file {path} with sizes {dims} must hold {n_bytes} data bytes, "
            f"got {len(raw) - header_len} (truncated or corrupted)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)
