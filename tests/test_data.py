"""Tests for compressm_tune.data: mnist1d cache, lti-sysid truth, selective-copy
labels, npz and IDX parsing."""

from __future__ import annotations

import doctest
import gzip
import importlib
import json
import struct

import mnist1d.data as m1d
import numpy as np
import pytest
import torch
from scipy.signal import lfilter

from compressm_tune.data import DATASETS, SelectiveCopyConfig, load_dataset
from compressm_tune.errors import CompressmError, ConfigError, DataError


def _raw(x: torch.Tensor, ds) -> np.ndarray:
    """Undo the dataset's input normalization: (n, L, d) float64."""
    return x.numpy().astype(np.float64) * np.array(ds.norm_std) + np.array(ds.norm_mean)


# ----------------------------------------------------------------------------- mnist1d


@pytest.fixture(scope="module")
def mnist1d_run(tmp_path_factory):
    """One real generation into a fresh cache, spying on what make_dataset got and returned."""
    cache = tmp_path_factory.mktemp("mnist1d-cache")
    calls = []
    real = m1d.make_dataset

    def spy(args):
        out = real(args)
        calls.append((dict(vars(args)), out))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(m1d, "make_dataset", spy)
        ds = load_dataset("mnist1d", cache_dir=str(cache))
    return ds, calls, cache


def _fake_make_dataset(mnist1d_run, calls):
    """A make_dataset stand-in that returns the real output instantly and records its args."""
    out = mnist1d_run[1][0][1]

    def fake(args):
        np.random.seed(123)  # noqa: NPY002 -- like the real one, it reseeds the global RNG
        calls.append(dict(vars(args)))
        return out

    return fake


def test_mnist1d_uses_published_defaults_and_shapes(mnist1d_run):
    ds, calls, _ = mnist1d_run
    assert len(calls) == 1
    args, out = calls[0]
    assert (args["num_samples"], args["train_split"], args["final_seq_length"]) == (5000, 0.8, 40)
    assert args["seed"] == 42
    assert (ds.name, ds.task, ds.d_input, ds.d_output, ds.seq_len) == (
        "mnist1d",
        "classification",
        1,
        10,
        40,
    )
    assert ds.x_train.shape == (3600, 40, 1) and ds.x_val.shape == (400, 40, 1)
    assert ds.x_test.shape == (1000, 40, 1)
    assert ds.y_train.shape == (3600,) and ds.y_val.shape == (400,) and ds.y_test.shape == (1000,)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    for y in (ds.y_train, ds.y_val, ds.y_test):
        assert set(y.tolist()) == set(range(10))
    # test split is mnist1d's own test split, in order; train + val are a permutation of its train
    np.testing.assert_allclose(_raw(ds.x_test, ds)[..., 0], out["x_test"], atol=1e-5)
    np.testing.assert_array_equal(ds.y_test.numpy(), out["y_test"])
    pooled = np.concatenate([_raw(ds.x_train, ds), _raw(ds.x_val, ds)])[..., 0]
    order = np.lexsort(pooled.T[::-1])
    np.testing.assert_allclose(pooled[order], out["x"][np.lexsort(out["x"].T[::-1])], atol=1e-5)
    json.dumps(ds.info)


def test_mnist1d_normalized_with_train_stats(mnist1d_run):
    ds = mnist1d_run[0]
    x = ds.x_train.double()
    assert abs(x.mean().item()) < 1e-6 and abs(x.std(unbiased=False).item() - 1) < 1e-6
    assert len(ds.norm_mean) == len(ds.norm_std) == 1
    assert abs(ds.x_val.double().mean().item()) < 0.2  # same transform, not re-standardized


def test_mnist1d_second_load_reads_cache(mnist1d_run, monkeypatch):
    ds, _, cache = mnist1d_run

    def boom(args):
        raise AssertionError("make_dataset called although the cache exists")

    monkeypatch.setattr(m1d, "make_dataset", boom)
    again = load_dataset("mnist1d", cache_dir=str(cache))
    for field in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(ds, field), getattr(again, field)), field


def test_mnist1d_corrupted_cache_regenerates(mnist1d_run, tmp_path, monkeypatch):
    ds, _, cache = mnist1d_run
    (name,) = [p.name for p in cache.iterdir()]
    (tmp_path / name).write_bytes(b"PK\x03\x04 definitely not a finished zip")
    calls = []
    monkeypatch.setattr(m1d, "make_dataset", _fake_make_dataset(mnist1d_run, calls))
    with pytest.warns(UserWarning, match="corrupted"):
        again = load_dataset("mnist1d", cache_dir=str(tmp_path))
    assert len(calls) == 1
    assert torch.equal(again.x_test, ds.x_test)
    with np.load(tmp_path / name) as npz:  # rewritten as a valid archive
        np.testing.assert_array_equal(npz["y_test"], ds.y_test.numpy())


def test_mnist1d_cache_is_keyed_by_args(mnist1d_run, tmp_path, monkeypatch):
    _, _, cache = mnist1d_run
    (stale,) = list(cache.iterdir())
    (tmp_path / stale.name).write_bytes(stale.read_bytes())
    changed = m1d.get_dataset_args()
    changed.seed = 43
    monkeypatch.setattr(m1d, "get_dataset_args", lambda: changed)
    calls = []
    monkeypatch.setattr(m1d, "make_dataset", _fake_make_dataset(mnist1d_run, calls))
    load_dataset("mnist1d", cache_dir=str(tmp_path))
    assert [c["seed"] for c in calls] == [43]  # the stale cache was not read
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 2


def test_mnist1d_env_cache_atomic_and_global_rng_untouched(mnist1d_run, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSM_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setattr(m1d, "make_dataset", _fake_make_dataset(mnist1d_run, []))
    np.random.seed(7)  # noqa: NPY002 -- the legacy global state is what must stay untouched
    expected = np.random.get_state()[1].copy()  # noqa: NPY002
    load_dataset("mnist1d")
    np.testing.assert_array_equal(np.random.get_state()[1], expected)  # noqa: NPY002
    assert [p.suffix for p in (tmp_path / "env-cache").iterdir()] == [".npz"]  # no temp left


def test_mnist1d_unwritable_cache_warns_and_cleans_up(mnist1d_run, tmp_path, monkeypatch):
    monkeypatch.setattr(m1d, "make_dataset", _fake_make_dataset(mnist1d_run, []))

    def failing_savez(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.warns(UserWarning, match="disk full"):
        ds = load_dataset("mnist1d", cache_dir=str(tmp_path))
    assert ds.x_test.shape == (1000, 40, 1)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- lti-sysid


@pytest.fixture(scope="module")
def lti():
    return load_dataset("lti-sysid", seed=0)


def _lagged(u: np.ndarray, lags: range) -> np.ndarray:
    """(n, L) -> (n * L, len(lags)) matrix of u_{t-k}, zero before the start."""
    n, length = u.shape
    out = np.zeros((n, length, len(lags)))
    for j, k in enumerate(lags):
        out[:, k:, j] = u[:, : length - k]
    return out.reshape(n * length, len(lags))


def test_lti_shapes_and_info(lti):
    assert (lti.task, lti.d_input, lti.d_output, lti.seq_len) == ("regression", 1, 1, 200)
    assert lti.x_train.shape == lti.y_train.shape == (1800, 200, 1)
    assert lti.x_val.shape == (200, 200, 1) and lti.x_test.shape == (500, 200, 1)
    assert lti.y_train.dtype == torch.float32
    info = json.loads(json.dumps(lti.info))
    assert info["true_order"] == 8 and info["noise_std"] == 0.01
    poles = np.array([complex(re, im) for re, im in info["poles"]])
    assert len(poles) == 8 and np.all((np.abs(poles) >= 0.6) & (np.abs(poles) <= 0.95))
    np.testing.assert_allclose(np.sort_complex(poles), np.sort_complex(poles.conj()))
    assert np.all(np.abs(poles.imag) > 0)  # four genuinely complex pairs
    assert abs(lti.y_train[:, 100:].std().item() - 1) < 0.1  # unit stationary output std


def test_lti_targets_obey_the_stated_poles(lti):
    """A(q) y = B(q) u + A(q) e with A from info["poles"]: the residual is just filtered noise."""
    u = _raw(lti.x_train, lti)[:400, :, 0]
    y = lti.y_train.numpy()[:400, :, 0].astype(np.float64)
    lags = _lagged(u, range(9))

    def residual_rms(poles: np.ndarray) -> tuple[float, float]:
        a = np.poly(poles).real
        z = lfilter(a, [1.0], y, axis=1).reshape(-1)
        coef, *_ = np.linalg.lstsq(lags, z, rcond=None)
        return float(np.sqrt(np.mean((z - lags @ coef) ** 2))), float(np.linalg.norm(a))

    noise = lti.info["noise_std"]
    poles = np.array([complex(re, im) for re, im in lti.info["poles"]])
    rms, a_norm = residual_rms(poles)
    assert rms < 1.2 * noise * a_norm
    for pair in range(4):  # no order-6 subset explains y
        wrong_rms, wrong_norm = residual_rms(np.delete(poles, [2 * pair, 2 * pair + 1]))
        assert wrong_rms > 3 * noise * wrong_norm, pair


def test_lti_hankel_rank_of_estimated_impulse_response_is_eight(lti):
    u = _raw(lti.x_train, lti)[:60, :, 0]
    y = lti.y_train.numpy()[:60, :, 0].astype(np.float64).reshape(-1)
    lags = _lagged(u, range(100))  # (60 * 200, 100); the slowest mode decays to 1e-4 by lag 100
    h = np.linalg.solve(lags.T @ lags, lags.T @ y)  # least-squares FIR h_0..h_99
    hankel = np.array([[h[1 + i + j] for j in range(45)] for i in range(45)])
    sv = np.linalg.svd(hankel, compute_uv=False)
    assert abs(h[0]) < 5e-3  # D = 0
    assert int(np.sum(sv > 5e-3 * sv[0])) == lti.info["true_order"]


def test_lti_deterministic_per_seed_with_one_system(lti):
    again = load_dataset("lti-sysid", seed=0)
    for field in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(lti, field), getattr(again, field)), field
    other = load_dataset("lti-sysid", seed=1)
    assert not torch.equal(lti.x_train, other.x_train)
    assert not torch.equal(lti.y_test, other.y_test)
    assert other.info["poles"] == lti.info["poles"]


# ----------------------------------------------------------------------------- selective-copy

_SMALL_COPY = SelectiveCopyConfig(seq_len=24, n_tokens=5, n_copy=3, n_train=300, n_test=100)


@pytest.fixture(scope="module")
def copy_task():
    return load_dataset("selective-copy", seed=0, copy_config=_SMALL_COPY)


def _decode(x: torch.Tensor, n_tokens: int):
    """Read one-hot inputs back independently: (positions, tokens) of every data token, and
    whether each step is blank or marker. Every step must be exactly one-hot."""
    x = x.numpy()
    assert np.all((x == 0) | (x == 1)) and np.all(x.sum(-1) == 1)
    ids = x.argmax(-1)  # (n, L)
    return ids, [np.flatnonzero(row < n_tokens) for row in ids]


def test_selective_copy_shapes_and_info(copy_task):
    ds = copy_task
    assert (ds.task, ds.pooling, ds.d_input, ds.d_output, ds.seq_len) == (
        "classification", "none", 7, 5, 24)
    assert ds.x_train.shape == (270, 24, 7) and ds.x_val.shape == (30, 24, 7)
    assert ds.x_test.shape == (100, 24, 7) and ds.y_test.shape == (100, 3)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.norm_mean == [0.0] * 7 and ds.norm_std == [1.0] * 7  # one-hot is left as it is
    info = json.loads(json.dumps(ds.info))
    assert info["config"] == {"seq_len": 24, "n_tokens": 5, "n_copy": 3, "n_train": 300,
                              "n_test": 100}
    assert info["chance_accuracy"] == pytest.approx(0.2)
    assert SelectiveCopyConfig(**info["config"]) == _SMALL_COPY  # the info rebuilds the task
    default = SelectiveCopyConfig()
    assert (default.seq_len, default.n_tokens, default.n_copy) == (64, 8, 4)


def test_selective_copy_labels_are_the_marked_tokens(copy_task):
    ds, k, m = copy_task, 5, 3
    for x, y in ((ds.x_train, ds.y_train), (ds.x_val, ds.y_val), (ds.x_test, ds.y_test)):
        ids, positions = _decode(x, k)
        assert np.all(ids[:, -m:] == k + 1)  # markers exactly at the last M steps
        assert np.all(ids[:, :-m] <= k)  # data or blank before them, never a marker
        for row, pos, labels in zip(ids, positions, y.numpy(), strict=True):
            assert len(pos) == m and pos.max() < 24 - m
            np.testing.assert_array_equal(row[pos], labels)  # labels = tokens in input order
    every = np.concatenate([ds.y_train.numpy().ravel(), ds.y_test.numpy().ravel()])
    assert set(every.tolist()) == set(range(k))
    # positions are random: every context step holds a data token in some sequence
    _, positions = _decode(ds.x_train, k)
    assert set(np.concatenate(positions).tolist()) == set(range(24 - m))


def test_selective_copy_deterministic_per_seed(copy_task):
    again = load_dataset("selective-copy", seed=0, copy_config=_SMALL_COPY)
    for field in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(copy_task, field), getattr(again, field)), field
    other = load_dataset("selective-copy", seed=1, copy_config=_SMALL_COPY)
    assert not torch.equal(copy_task.x_test, other.x_test)
    assert not torch.equal(copy_task.y_test, other.y_test)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"n_copy": 0}, "n_copy >= 1"),
        ({"n_tokens": 1}, "n_tokens >= 2"),
        ({"seq_len": 7, "n_copy": 4}, "seq_len >= 2 * n_copy"),
        ({"n_test": 0}, "n_test >= 1"),
        ({"seq_len": 64.0}, "seq_len=64.0"),
        ({"n_train": True}, "n_train=True"),
    ],
)
def test_selective_copy_bad_config_raises_config_error(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        SelectiveCopyConfig(**kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_selective_copy_config_only_where_it_belongs():
    with pytest.raises(ConfigError, match="only used by dataset 'selective-copy'"):
        load_dataset("lti-sysid", copy_config=SelectiveCopyConfig())
    with pytest.raises(ConfigError, match="must be a SelectiveCopyConfig"):
        load_dataset("selective-copy", copy_config={"seq_len": 32})
    with pytest.raises(DataError, match="at least 2 samples"):  # too small to carve validation
        load_dataset("selective-copy", copy_config=SelectiveCopyConfig(n_train=3))


# ----------------------------------------------------------------------------- npz


def _npz(tmp_path, name="data.npz", **arrays) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def _indexed_classification(n=50, length=12, n_classes=3):
    """x row i starts with 100 * i, so the sample index survives shuffling; y = i % n_classes."""
    idx = np.arange(n)
    x = 100.0 * idx[:, None] + np.arange(length)[None, :]  # (n, L)
    return x, idx % n_classes


def test_npz_2d_classification_random_test_split(tmp_path):
    x, y = _indexed_classification()
    ds = load_dataset("npz", path=_npz(tmp_path, x=x, y=y), seed=3)
    assert (ds.task, ds.d_input, ds.d_output, ds.seq_len) == ("classification", 1, 3, 12)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (36, 4, 10)
    assert ds.info["test_split"] == "random 20%"
    seen = []
    for xs, ys in ((ds.x_train, ds.y_train), (ds.x_val, ds.y_val), (ds.x_test, ds.y_test)):
        idx = np.rint(_raw(xs, ds)[:, 0, 0] / 100).astype(int)
        np.testing.assert_array_equal(ys.numpy(), idx % 3)  # pairs kept together
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(50))  # disjoint splits covering everything
    same = load_dataset("npz", path=_npz(tmp_path, x=x, y=y), seed=3)
    other = load_dataset("npz", path=_npz(tmp_path, x=x, y=y), seed=4)
    assert torch.equal(same.y_test, ds.y_test) and not torch.equal(other.x_test, ds.x_test)


def test_npz_3d_regression_normalizes_each_channel(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal([5.0, -3.0], [2.0, 0.5], size=(60, 8, 2))
    y = rng.normal(size=(60, 8, 3)).astype(np.float64)
    ds = load_dataset("npz", path=_npz(tmp_path, x=x, y=y))
    assert (ds.task, ds.d_input, ds.d_output, ds.seq_len) == ("regression", 2, 3, 8)
    assert ds.y_train.dtype == torch.float32 and ds.y_test.shape == (12, 8, 3)
    np.testing.assert_allclose(ds.x_train.double().mean(dim=(0, 1)), 0, atol=1e-6)
    np.testing.assert_allclose(ds.x_train.double().std(dim=(0, 1), unbiased=False), 1, atol=1e-6)
    np.testing.assert_allclose(ds.norm_mean, [5, -3], atol=0.5)
    np.testing.assert_allclose(ds.norm_std, [2, 0.5], rtol=0.2)


def test_npz_provided_test_split_and_whole_float_labels(tmp_path):
    x, y = _indexed_classification()
    x_test = np.full((7, 12), 3.0)
    y_test = np.array([0, 1, 2, 0, 1, 2, 0], dtype=np.float32)  # whole numbers as floats
    ds = load_dataset(
        "npz", path=_npz(tmp_path, x=x, y=y.astype(np.float64), x_test=x_test, y_test=y_test)
    )
    assert ds.info["test_split"] == "file"
    assert (len(ds.y_train), len(ds.y_val)) == (45, 5)
    np.testing.assert_allclose(_raw(ds.x_test, ds)[..., 0], x_test, atol=1e-3)
    assert ds.y_test.dtype == torch.int64 and ds.y_test.tolist() == [0, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize("labels", [
    np.array(["cat", "dog", "emu"]),  # strings: were refused ("must be a real numeric array")
    np.array([1, 2, 3]),  # 1..K: added an unused class 0
    np.array([-1, 1, 7]),  # negative ids: were refused
    np.array([3, 10**9, 2**40]),  # arbitrary ids: sized the output layer by the largest
    np.array([False, True, True])[:2],  # booleans
], ids=["strings", "1..K", "signed", "sparse", "bool"])
def test_npz_labels_of_any_kind_map_to_ids_in_sorted_label_order(tmp_path, labels):
    x, idx = _indexed_classification(n=60, n_classes=len(labels))
    original = labels[idx]  # (n,) the label of sample i is labels[i % K]
    ds = load_dataset("npz", path=_npz(tmp_path, x=x, y=original), seed=1)
    assert ds.d_output == len(labels)
    assert ds.info["labels"] == sorted(labels.tolist())
    json.dumps(ds.info)  # stored in checkpoints and manifests as it is
    for xs, ys in ((ds.x_train, ds.y_train), (ds.x_val, ds.y_val), (ds.x_test, ds.y_test)):
        sample = np.rint(_raw(xs, ds)[:, 0, 0] / 100).astype(int)
        names = [ds.info["labels"][k] for k in ys.tolist()]
        assert names == original[sample].tolist()  # id -> label gives each sample its own


def test_npz_test_labels_use_the_train_mapping(tmp_path):
    x, idx = _indexed_classification(n=30, n_classes=2)
    y = np.array(["no", "yes"])[idx]
    ds = load_dataset("npz", path=_npz(tmp_path, x=x, y=y, x_test=x[:3],
                                       y_test=np.array(["yes", "yes", "no"])))
    assert ds.y_test.tolist() == [1, 1, 0] and ds.info["labels"] == ["no", "yes"]


def test_validation_split_is_stratified_by_class(tmp_path):
    """A random 10% of 60 samples (6) missed a class of 10 in some seeds; now every seed's
    split holds each class in proportion."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2, 3], [30, 15, 10, 5])  # unbalanced
    x = rng.normal(size=(len(y), 5))
    path = _npz(tmp_path, x=x, y=y, x_test=x[:4], y_test=y[:4])
    for seed in range(12):
        ds = load_dataset("npz", path=path, val_fraction=0.2, seed=seed)
        counts = np.bincount(ds.y_val.numpy(), minlength=4)
        np.testing.assert_array_equal(counts, [6, 3, 2, 1])  # 12 held: 20% of each class
        assert np.bincount(ds.y_train.numpy(), minlength=4).tolist() == [24, 12, 8, 4]
    other = load_dataset("npz", path=path, val_fraction=0.2, seed=1)
    assert not torch.equal(other.x_val, load_dataset("npz", path=path, val_fraction=0.2,
                                                     seed=0).x_val)  # still a seeded draw


def test_a_rare_class_keeps_a_sample_to_train_on(tmp_path):
    """Half of 12 samples to validation: largest remainders would send the lone sample of
    class 2 and both of class 1 there, leaving the model nothing of either to learn."""
    rng = np.random.default_rng(0)
    y = np.array([0] * 9 + [1] * 2 + [2])
    path = _npz(tmp_path, x=rng.normal(size=(12, 4)), y=y, x_test=np.zeros((2, 4)),
                y_test=np.array([0, 1]))
    for seed in range(5):
        ds = load_dataset("npz", path=path, val_fraction=0.5, seed=seed)
        assert np.bincount(ds.y_train.numpy(), minlength=3).tolist() == [4, 1, 1]
        assert np.bincount(ds.y_val.numpy(), minlength=3).tolist() == [5, 1, 0]


def test_npz_nan_padded_sequences_keep_their_padding_out_of_the_statistics(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 13, size=40)  # (n,)
    x = rng.normal(5.0, 2.0, size=(40, 12, 2))
    x[np.arange(12)[None, :] >= lengths[:, None]] = np.nan  # trailing whole-step padding
    y = np.arange(40) % 2
    ds = load_dataset("npz", path=_npz(tmp_path, x=x, y=y), seed=0)
    assert ds.info["padding"] == {"kind": "trailing NaN", "min_length": int(lengths.min()),
                                  "max_length": 12}
    raw = _raw(ds.x_train, ds)  # (n, 12, 2), NaN kept where padded
    real = ~np.isnan(raw).all(axis=2)  # (n, 12)
    assert (np.isnan(raw).any(axis=2) == ~real).all()  # whole steps only
    np.testing.assert_allclose(ds.norm_mean, raw[real].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(ds.norm_std, raw[real].std(axis=0), rtol=1e-6)
    n_real = sorted(real.sum(axis=1).tolist() + (~np.isnan(_raw(ds.x_val, ds)).all(2)).sum(
        1).tolist() + (~np.isnan(_raw(ds.x_test, ds)).all(2)).sum(1).tolist())
    assert n_real == sorted(lengths.tolist())  # every sequence keeps its own length


def test_npz_regression_targets_are_nan_where_inputs_are_padding(tmp_path):
    x = np.ones((20, 6, 1))
    x[:5, 4:] = np.nan
    y = np.zeros((20, 6, 1))
    y[:5, 4:] = np.nan  # the user padded the targets too: accepted
    ds = load_dataset("npz", path=_npz(tmp_path, x=x, y=y), seed=0)
    pad_x = torch.isnan(torch.cat([ds.x_train, ds.x_val, ds.x_test])).all(-1)
    pad_y = torch.isnan(torch.cat([ds.y_train, ds.y_val, ds.y_test])).all(-1)
    assert torch.equal(pad_x, pad_y) and int(pad_y.sum()) == 10
    y[7, 2] = np.nan  # a NaN target at a real step is still an error
    with pytest.raises(DataError, match=r"y in .* finite, found nan at \(7, 2, 0\)"):
        load_dataset("npz", path=_npz(tmp_path, x=x, y=y))


def _bad_cases():
    """(name, writer(tmp_path) -> path, substrings the DataError message must contain)."""
    x, y = _indexed_classification(n=20)
    reg_x, reg_y = np.zeros((20, 6, 1)), np.zeros((20, 6, 2))

    def with_(**changes):
        return lambda tmp: _npz(tmp, **{"x": x, "y": y, **changes})

    def only(**arrays):
        return lambda tmp: _npz(tmp, **arrays)

    def raw_bytes(tmp):
        (tmp / "junk.npz").write_bytes(b"this is not a zip archive")
        return str(tmp / "junk.npz")

    def npy(tmp):
        np.save(tmp / "single.npy", x)
        return str(tmp / "single.npy")

    nan_x, inf_y, nan_test = x.copy(), reg_y.copy(), np.zeros((4, 12))
    nan_x[3, 5] = np.nan
    inf_y[1, 2, 0] = np.inf
    nan_test[2, 1] = np.nan
    return [
        ("missing file", lambda tmp: str(tmp / "nope.npz"), ["not found", "nope.npz"]),
        ("not a zip", raw_bytes, ["cannot read", "junk.npz"]),
        ("npy not npz", npy, ["single.npy", "not an .npz"]),
        ("missing y", only(x=x, labels=y), ["missing ['y']", "found ['labels', 'x']"]),
        ("x_test alone", with_(x_test=x), ["x_test", "y_test", "neither"]),
        ("x 1-D", with_(x=np.zeros(20)), ["x in", "ndim", "(20,)"]),
        ("x 4-D", with_(x=np.zeros((20, 2, 2, 2))), ["x in", "ndim", "(20, 2, 2, 2)"]),
        ("y 2-D", with_(y=np.zeros((20, 2))), ["y in", "ndim", "(20, 2)"]),
        ("strings", with_(x=np.array([["a"] * 12] * 20)), ["x in", "numeric", "<U1"]),
        ("object array", with_(x=np.array([None] * 20, dtype=object)), ["cannot read arrays"]),
        ("length mismatch", with_(y=y[:19]), ["equal length", "20 vs 19"]),
        ("nan in x", with_(x=nan_x), ["x in", "finite", "nan", "(3, 5)"]),
        ("inf in y", only(x=reg_x, y=inf_y), ["y in", "finite", "inf", "(1, 2, 0)"]),
        ("nan in x_test", with_(x_test=nan_test, y_test=np.zeros(4, int)), ["x_test", "finite"]),
        ("unknown test label", with_(x_test=x[:4], y_test=[0, 1, 3, 0]),
         ["y_test", "label 3", "never has", "[0, 1, 2]"]),
        ("test label kind", with_(x_test=x[:4], y_test=np.array(["a", "b", "a", "b"])),
         ["y_test", "<U1", "int64"]),
        ("object labels", with_(y=np.array([None] * 20, dtype=object)), ["cannot read arrays"]),
        ("nan inside x", with_(x=np.where(np.arange(12) == 4, np.nan, x)),
         ["x in", "(0, 4)", "trailing padding"]),
        ("all padding", with_(x=np.where(np.arange(20)[:, None] == 2, np.nan, x)),
         ["sequence 2", "all NaN"]),
        ("fractional label", with_(y=y + 0.5), ["whole", "0.5"]),
        (
            "empty x",
            only(x=np.zeros((0, 12)), y=np.zeros(0, int)),
            ["x in", "non-empty", "(0, 12)"],
        ),
        ("empty steps", only(x=np.zeros((20, 0)), y=y), ["x in", "non-empty", "(20, 0)"]),
        ("one class", with_(y=np.zeros(20, int)), ["at least 2 distinct labels", "[0]"]),
        ("overflowing x", with_(x=x * 1e300), ["too large to normalize", "rescale"]),
        ("test too small", only(x=x[:5], y=y[:5]), ["at least 2", "'test'", "5 samples"]),
        ("val too small", only(x=x[:10], y=y[:10]), ["at least 2", "'val'", "8 samples"]),
        ("regression length", only(x=reg_x, y=np.zeros((20, 5, 2))), ["y in", "length 6"]),
        (
            "test layout",
            with_(x_test=np.zeros((4, 11)), y_test=[0, 1, 0, 1]),
            ["x_test", "(4, 11, 1)"],
        ),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda case: case[0])
def test_npz_bad_input_raises_one_clear_line(case, tmp_path):
    _, write, needles = case
    with pytest.raises(DataError) as err:
        load_dataset("npz", path=write(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


# ----------------------------------------------------------------------------- smnist


def _write_idx(path, magic: int, array: np.ndarray, gz: bool) -> None:
    blob = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(f"{path}.gz" if gz else path, "wb") as fh:
        fh.write(blob)


def _write_mnist(folder, gz: bool, n_train=20, n_test=10):
    rng = np.random.default_rng(1)
    arrays = {
        "train": (rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train)),
        "t10k": (rng.integers(0, 256, (n_test, 28, 28)), rng.integers(0, 10, n_test)),
    }
    for prefix, (images, labels) in arrays.items():
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", 2051, images, gz)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", 2049, labels, gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_smnist_parses_idx_files(tmp_path, gz):
    arrays = _write_mnist(tmp_path, gz)
    ds = load_dataset("smnist", data_dir=str(tmp_path))
    assert (ds.task, ds.d_input, ds.d_output, ds.seq_len) == ("classification", 1, 10, 784)
    assert (ds.x_train.shape, ds.x_val.shape, ds.x_test.shape) == (
        (18, 784, 1),
        (2, 784, 1),
        (10, 784, 1),
    )
    images, labels = arrays["t10k"]
    pixels = np.rint(_raw(ds.x_test, ds)[..., 0] * 255)
    np.testing.assert_array_equal(pixels, images.reshape(10, 784))  # row-major, in file order
    np.testing.assert_array_equal(ds.y_test.numpy(), labels)
    images, labels = arrays["train"]
    by_pixels = {
        img.reshape(784).tobytes(): lab
        for img, lab in zip(images.astype(np.uint8), labels, strict=True)
    }
    for xs, ys in ((ds.x_train, ds.y_train), (ds.x_val, ds.y_val)):
        rows = np.rint(_raw(xs, ds)[..., 0] * 255).astype(np.uint8)
        assert [by_pixels[row.tobytes()] for row in rows] == ys.tolist()


def _corrupt(folder, name: str, transform) -> None:
    path = folder / name
    path.write_bytes(transform(path.read_bytes()))


@pytest.mark.parametrize(
    ("name", "transform", "needles"),
    [
        (
            "train-images-idx3-ubyte",
            lambda b: struct.pack(">I", 2049) + b[4:],
            ["magic 2051", "2049"],
        ),
        ("t10k-labels-idx1-ubyte", lambda b: struct.pack(">I", 7) + b[4:], ["magic 2049", "got 7"]),
        ("train-images-idx3-ubyte", lambda b: b[:-5], ["truncated", "15680", "15675"]),
        ("t10k-images-idx3-ubyte", lambda b: b[:10], ["truncated", "10 bytes"]),
        ("train-labels-idx1-ubyte", lambda b: b + b"\x00", ["corrupted", "21"]),
        (
            "train-labels-idx1-ubyte",
            lambda b: b[:7] + b"\x13" + b[8:-1],
            ["20 images", "19 labels"],
        ),
        ("t10k-labels-idx1-ubyte", lambda b: b[:-1] + b"\x0a", ["[0, 10)", "10"]),
    ],
    ids=[
        "bad-magic-images",
        "bad-magic-labels",
        "truncated",
        "short-header",
        "trailing",
        "count-mismatch",
        "label-range",
    ],
)
def test_smnist_malformed_file_names_it(tmp_path, name, transform, needles):
    _write_mnist(tmp_path, gz=False)
    _corrupt(tmp_path, name, transform)
    with pytest.raises(DataError) as err:
        load_dataset("smnist", data_dir=str(tmp_path))
    assert name in str(err.value)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_smnist_broken_gzip_names_the_file(tmp_path):
    _write_mnist(tmp_path, gz=True)
    _corrupt(tmp_path, "t10k-images-idx3-ubyte.gz", lambda b: b[: len(b) // 2])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("smnist", data_dir=str(tmp_path))


def test_smnist_missing_file_or_folder_names_expected_files(tmp_path):
    _write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing MNIST IDX files \['t10k-labels-idx1-ubyte'\]"):
        load_dataset("smnist", data_dir=str(tmp_path))
    with pytest.raises(DataError) as err:
        load_dataset("smnist", data_dir=str(tmp_path / "absent"))
    assert "absent" in str(err.value)
    for base in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        assert base in str(err.value)


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"name": "cifar"}, "'cifar'"),
        ({"name": "lti-sysid", "val_fraction": 0.0}, "val_fraction=0.0"),
        ({"name": "lti-sysid", "val_fraction": 0.51}, "(0, 0.5]"),
        ({"name": "lti-sysid", "val_fraction": float("nan")}, "val_fraction=nan"),
        ({"name": "lti-sysid", "seed": -1}, "seed=-1"),
        ({"name": "lti-sysid", "path": "x.npz"}, "path= is only used by dataset 'npz'"),
        ({"name": "npz", "data_dir": "mnist"}, "data_dir= is only used by dataset 'smnist'"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, needle):
    name = kwargs.pop("name")
    with pytest.raises(ConfigError) as err:
        load_dataset(name, **kwargs)
    assert needle in str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, CompressmError)
    if name == "cifar":
        assert all(known in str(err.value) for known in DATASETS)


@pytest.mark.parametrize(
    ("name", "needle"), [("npz", "path="), ("smnist", "t10k-images-idx3-ubyte")]
)
def test_missing_data_location_raises_data_error(name, needle):
    with pytest.raises(DataError, match=needle):
        load_dataset(name)


@pytest.mark.parametrize("module", ["_datasets", "_builtin", "_files", "_arrays", "_pystdlib"])
def test_docstring_examples_run(module):
    assert doctest.testmod(importlib.import_module(f"compressm_tune.data.{module}")).failed == 0
