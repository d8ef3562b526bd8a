"""Real datasets shipped in packages: scikit-learn's digits and statsmodels' series.

References are the packages' own arrays, read here directly: the sequences must be exactly the
images row by row, and the forecasting windows exactly the series, shifted by one step.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from compressm_tune.data import DATASETS, load_dataset
from compressm_tune.errors import MissingDependencyError

sklearn_datasets = pytest.importorskip("sklearn.datasets")
sm_datasets = pytest.importorskip("statsmodels.datasets")


def _raw(ds, x):
    return x.numpy()[..., 0] * ds.norm_std[0] + ds.norm_mean[0]


def test_digits_are_the_images_row_by_row_with_a_fixed_stratified_test_split():
    images = sklearn_datasets.load_digits()
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=3)
    assert {"digits", "sunspots", "co2", "elnino"} <= set(DATASETS)
    assert a.task == "classification" and a.d_output == 10 and a.pooling == "mean"
    assert a.x_train.shape[1:] == (64, 1) and a.seq_len == 64
    assert len(a.x_train) + len(a.x_val) + len(a.x_test) == len(images.target) == 1797
    np.testing.assert_array_equal(a.y_test.numpy(), b.y_test.numpy())  # test split is fixed
    np.testing.assert_allclose(_raw(a, a.x_test), _raw(b, b.x_test), atol=1e-4)
    assert not np.array_equal(a.y_val.numpy(), b.y_val.numpy())  # the seed draws validation
    counts = np.bincount(a.y_test.numpy(), minlength=10)
    np.testing.assert_allclose(counts / np.bincount(images.target), 0.2, atol=0.01)
    flat = images.images.reshape(len(images.target), 64)  # (1797, 64) row-major pixels
    raw = _raw(a, a.x_test)
    for i in (0, 100, len(raw) - 1):
        match = np.flatnonzero(np.abs(flat - raw[i]).max(axis=1) < 1e-3)
        assert len(match) and images.target[match[0]] == a.y_test[i]


@pytest.mark.parametrize("name,column,length", [("sunspots", "SUNACTIVITY", 24),
                                                ("elnino", None, 24), ("co2", "co2", 52)])
def test_series_are_chronological_one_step_forecasts_of_the_raw_series(name, column, length):
    frame = getattr(sm_datasets, name).load_pandas().data
    series = (frame[column].to_numpy(float) if column
              else frame.drop(columns="YEAR").to_numpy(float).ravel())
    ds = load_dataset(name, val_fraction=0.15)
    assert ds.task == "regression" and ds.pooling == "none" and ds.seq_len == length
    mean, std = ds.info["target_scale"]
    for x, y in ((ds.x_train, ds.y_train), (ds.x_val, ds.y_val), (ds.x_test, ds.y_test)):
        assert x.shape == y.shape and x.shape[1:] == (length, 1)
        assert not np.isnan(x.numpy()).any() and not np.isnan(y.numpy()).any()
        y_raw = y.numpy()[..., 0] * std + mean
        np.testing.assert_allclose(y_raw[:, :-1], _raw(ds, x)[:, 1:], rtol=1e-4, atol=1e-3)
    n = len(series)
    split = ds.info["split"]
    assert split == {"val_start": round(0.7 * n), "test_start": round(0.85 * n)}
    train_y = ds.y_train.numpy()[..., 0] * std + mean
    test_y = ds.y_test.numpy()[..., 0] * std + mean
    if column != "co2":  # co2's gaps are interpolated; the others are the raw values
        np.testing.assert_allclose(_raw(ds, ds.x_train)[0], series[:length], atol=1e-3)
        np.testing.assert_allclose(test_y[-1, -1], series[-1], atol=1e-3)
    # every window's targets lie in its own part of the series, in time order
    assert train_y.shape[0] == split["val_start"] - length
    assert len(ds.x_val) == split["test_start"] - split["val_start"] - length + 1
    assert len(ds.x_test) == n - split["test_start"] - length + 1
    if column != "co2":
        np.testing.assert_allclose(std, series[:split["val_start"]].std(), rtol=1e-6)


def test_co2_is_forecast_relative_to_each_windows_start_so_test_needs_no_extrapolation():
    """Mauna Loa's CO2 rises: in absolute terms its test part lies above every training
    target. Relative to each window's first value, the windows are the series' own differences
    and the test targets lie inside the training targets' range."""
    values = sm_datasets.co2.load_pandas().data["co2"].to_numpy(float)
    ds = load_dataset("co2", val_fraction=0.15)
    assert ds.info["level"] == "window start"
    mean, std = ds.info["target_scale"]
    assert mean == 0.0
    split = ds.info["split"]
    for x, y, first in ((ds.x_train, ds.y_train, 0),
                        (ds.x_test, ds.y_test, split["test_start"] - 1)):
        x_rel = _raw(ds, x)
        np.testing.assert_allclose(x_rel[:, 0], 0.0, atol=1e-3)
        for i in (0, len(x_rel) - 1):
            window = values[first + i:first + i + 53]
            if np.isnan(window).any():  # the package's gaps (interpolated in the dataset)
                continue
            np.testing.assert_allclose(x_rel[i], window[:-1] - window[0], atol=1e-3)
            np.testing.assert_allclose(y.numpy()[i, :, 0] * std, window[1:] - window[0],
                                       atol=1e-3)
    train_y, test_y = ds.y_train.numpy(), ds.y_test.numpy()
    lo, hi = train_y.min(), train_y.max()
    margin = 0.1 * (hi - lo)  # absolute levels: the whole test part 0.7 spans above it
    assert lo - margin < test_y.min() and test_y.max() < hi + margin
    np.testing.assert_allclose(train_y.std(), 1.0, rtol=1e-4)


@pytest.mark.parametrize("name,module", [("digits", "sklearn.datasets"),
                                         ("sunspots", "statsmodels")])
def test_a_missing_package_names_the_datasets_extra(monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependencyError, match=r"compressm-tune\[datasets\]"):
        load_dataset(name)
