"""The generated and cached datasets: ``mnist1d``, ``lti-sysid`` and ``selective-copy``.

``mnist1d`` is mnist1d's ``make_dataset`` with its published defaults, cached; ``lti-sysid`` is
white noise through one fixed stable order-8 system; ``selective-copy`` is Gu & Dao's selective
copying task, generated from the seed. Each loader returns ``(task, train, test, d_output,
info)`` for :func:`~compressm_tune.data.load_dataset` to split and normalize.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import random
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.linalg import solve_discrete_lyapunov

from compressm_tune.data._arrays import _savez_atomic
from compressm_tune.errors import ConfigError, MissingDependencyError

__all__ = ["SelectiveCopyConfig"]

_CACHE_LAYOUT = 1  # bump when the cached array layout changes; it is part of the cache key
_LTI_SYSTEM_SEED = 7  # fixed system for every `seed`; its smallest Hankel SV is 3% of its largest
_LTI_ORDER = 8
_LTI_SEQ_LEN = 200
_LTI_N_TRAIN, _LTI_N_TEST = 2000, 500
_LTI_NOISE_STD = 0.01
_MNIST_CLASSES = 10


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


# ----------------------------------------------------------------------------- mnist1d


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
