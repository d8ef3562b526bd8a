"""Real datasets shipped inside Python packages (nothing is downloaded): the ``datasets`` extra.

``digits``: scikit-learn's 1797 handwritten digits (8x8 images, grey levels 0-16), read row by
row as 64-step, 1-channel sequences; 10 classes; a fixed stratified 20% test split (the same
for every seed; the seed draws only the validation split).

``sunspots``, ``co2``, ``elnino``: statsmodels' real series as one-step-ahead forecasting
(regression, one output per step): the input is the raw series over a window of ``L`` steps
(normalized like every input, with the train statistics), the target at step ``t`` is the
value at ``t + 1``. The series is cut in time into train (the first
70%), validation and test (the last 15% each; ``val_fraction`` of the series for validation
when given), and every window's targets lie inside one part (inputs may reach back into the
previous part: that history is known when forecasting). Windows overlap (stride 1), so
neighbouring samples are correlated. Targets are the series standardized with the train
part's mean and std (``info["target_scale"]``: ``raw = y * std + mean``), so MSEs compare
across series.

A series with a trend is forecast **relative to its window's first value** (``info["level"]``
says ``"window start"``): inputs ``raw[i:i+L] - raw[i]``, targets ``(raw[t+1] - raw[i]) / std``
with ``std`` that of the train windows' targets (``raw = y * std + x_raw[0]``), as ARIMA
differences such a series. Why: Mauna Loa's CO2 rises every year, so in absolute terms its test
part (2.5-4.0 train standard deviations above the train mean) lies wholly above anything the
model trained on; a forecaster would extrapolate, and how it does is set by the seed (the full
model's test MSE spread 6x over three seeds), not by what it learned.

* ``sunspots``: yearly mean sunspot number 1700-2008 (309 values), ``L = 24``;
* ``co2``: weekly atmospheric CO2 at Mauna Loa 1958-2001 (2284 values, 59 gaps filled by
  linear interpolation), ``L = 52``, relative to the window's start (a trend);
* ``elnino``: monthly Pacific sea surface temperature 1950-2010 (732 values), ``L = 24``.
"""

from __future__ import annotations

import numpy as np

from compressm_tune.errors import DataError, MissingDependencyError

__all__ = ["SERIES", "digits", "series"]

_EXTRA = "pip install 'compressm-tune[datasets]'"
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0  # the test split is fixed; seeds move only the validation split
_SERIES_TEST_FRACTION = 0.15
SERIES = {"sunspots": 24, "co2": 52, "elnino": 24}  # name -> window length L
_TRENDING = ("co2",)  # forecast relative to the window's first value (module docstring)


def digits():
    """scikit-learn's digits as ``(n, 64, 1)`` sequences: ``(task, train, test, classes, info)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise MissingDependencyError(f"dataset 'digits' needs scikit-learn: {_EXTRA}") from exc
    bunch = load_digits()
    x = bunch.data.astype(np.float32)[..., None]  # (1797, 64, 1), row-major pixels
    y = bunch.target.astype(np.int64)  # (1797,)
    rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
    test = np.zeros(len(y), dtype=bool)
    for k in np.unique(y):  # stratified: each class sends 20% of its samples to test
        members = rng.permutation(np.flatnonzero(y == k))
        test[members[:round(_DIGITS_TEST_FRACTION * len(members))]] = True
    info = {"source": "sklearn.datasets.load_digits", "image": [8, 8],
            "order": "row-major pixels, grey levels 0-16", "test_split_seed": _DIGITS_SPLIT_SEED}
    return "classification", (x[~test], y[~test]), (x[test], y[test]), 10, info


def _raw_series(name: str) -> tuple[np.ndarray, str]:
    try:
        from statsmodels import datasets as smd
    except ImportError as exc:
        raise MissingDependencyError(f"dataset {name!r} needs statsmodels: {_EXTRA}") from exc
    if name == "sunspots":
        frame = smd.sunspots.load_pandas().data
        return frame["SUNACTIVITY"].to_numpy(np.float64), "yearly mean sunspot number, 1700-2008"
    if name == "co2":
        values = smd.co2.load_pandas().data["co2"].to_numpy(np.float64).copy()
        gaps = np.isnan(values)
        t = np.arange(len(values))
        values[gaps] = np.interp(t[gaps], t[~gaps], values[~gaps])
        return values, "weekly CO2 at Mauna Loa (ppm), 1958-2001, gaps interpolated"
    frame = smd.elnino.load_pandas().data
    return (frame.drop(columns="YEAR").to_numpy(np.float64).ravel(),
            "monthly Pacific sea surface temperature (deg C), 1950-2010")


def _windows(raw: np.ndarray, length: int, first: int, stop: int, relative: bool
             ) -> tuple[np.ndarray, np.ndarray]:
    """Raw windows ``x = raw[i:i+L]``, ``y = raw[i+1:i+L+1]`` whose targets lie in
    ``[first, stop)``; with ``relative``, both less the window's first value ``raw[i]``."""
    starts = np.arange(max(0, first - 1), stop - length)  # targets i+1 .. i+L
    idx = starts[:, None] + np.arange(length)  # (n, L)
    x, y = raw[idx], raw[idx + 1]
    if relative:
        x, y = x - x[:, :1], y - x[:, :1]
    return x, y


def series(name: str, val_fraction: float | None = None):
    """One statsmodels series as forecasting windows (module docstring).

    Returns ``(task, train, val, test, d_output, info)`` with each split ``(x, y)`` of shape
    ``(n, L, 1)``: the split is chronological, so it is made here, not drawn at random.
    """
    raw, what = _raw_series(name)
    length = SERIES[name]
    n = len(raw)
    val_share = _SERIES_TEST_FRACTION if val_fraction is None else val_fraction
    val_start = round(n * (1 - _SERIES_TEST_FRACTION - val_share))
    test_start = round(n * (1 - _SERIES_TEST_FRACTION))
    relative = name in _TRENDING
    parts = [_windows(raw, length, a, b, relative)
             for a, b in ((0, val_start), (val_start, test_start), (test_start, n))]
    if relative:  # the targets' own spread in training: y = (raw[t+1] - raw[i]) / std
        mean, std = 0.0, float(parts[0][1].std())
    else:
        mean, std = float(raw[:val_start].mean()), float(raw[:val_start].std())
    train, val, test = ((x[..., None].astype(np.float32),
                         ((y - mean) / std)[..., None].astype(np.float32)) for x, y in parts)
    for part, (x, _) in zip(("train", "val", "test"), (train, val, test), strict=True):
        if len(x) < 2:
            raise DataError(f"dataset {name!r}: the {part} part holds {len(x)} windows of "
                            f"length {length}; every split needs at least 2 (val_fraction="
                            f"{val_share:g})")
    info = {"source": f"statsmodels.datasets.{name}", "series": what, "values": n,
            "window": length, "horizon": 1, "target_scale": [mean, std],
            "level": "window start" if relative else "absolute",
            "split": {"val_start": val_start, "test_start": test_start}}
    return "regression", train, val, test, 1, info
