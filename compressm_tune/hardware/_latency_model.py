"""Predict the cost of a model with any per-layer widths from a profile.

A profile measures models of k equal-width blocks at every width N, for several block counts
k (``config.blocks`` and ``config.extra_blocks``). Each measurement is modelled as
``t_k(N) = overhead + k * c(N)``: one fixed cost (encoder, head, dispatch) shared by every
model and one per-block cost per measured width. Both are fitted together by least squares
over all records with relative residuals (weights ``1 / t``), so the split between fixed and
per-block cost rests on every block count at every width, not on one difference at one width.
Between measured widths ``c`` is interpolated (piecewise linear in N, or a quadratic fitted with
relative weights), and a model with widths ``[N_1, ..., N_k]`` is predicted as
``overhead + sum_i c(N_i)``. A block's cost does not depend on its position: measured on a
2-core CPU, ``[512, 4, 4]`` and ``[4, 4, 512]`` take the same time within noise.

The profile is a snapshot: on a shared machine the same models can run several percent slower
or faster an hour later. :func:`check_drift` re-times the profile's own equal-width models at a
few widths, with the profile's settings, and :class:`Drift` gives the ratio to scale predictions
by (``LatencyModel(..., scale=)``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compressm_tune.errors import ConfigError
from compressm_tune.hardware._config import fingerprint
from compressm_tune.hardware._profile import METRICS, Profile
from compressm_tune.hardware._profiler import measure_models

__all__ = [
    "Drift", "HoldoutResult", "INTERPOLATIONS", "LatencyModel", "TIME_METRICS", "check_drift",
    "measured_here", "reference_widths",
]


INTERPOLATIONS = ("piecewise", "quadratic")
# Metrics that a machine running slower or faster than when profiled moves by one factor.
TIME_METRICS = ("latency_ms", "latency_min_ms", "latency_cpu_ms", "step_ms", "batch_ms",
                "train_step_ms")


def _piecewise(widths: np.ndarray, costs: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation, extrapolating the end segments linearly."""
    i = np.clip(np.searchsorted(widths, at) - 1, 0, len(widths) - 2)
    w0, w1, c0, c1 = widths[i], widths[i + 1], costs[i], costs[i + 1]
    return c0 + (c1 - c0) * (at - w0) / (w1 - w0)


def _quadratic(widths: np.ndarray, costs: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Least-squares quadratic in N with residuals relative to each cost."""
    degree = min(2, len(widths) - 1)
    weights = 1.0 / np.maximum(np.abs(costs), 1e-12 * np.abs(costs).max() + 1e-300)
    return np.polyval(np.polyfit(widths, costs, degree, w=weights), at)


_INTERPOLATORS = {"piecewise": _piecewise, "quadratic": _quadratic}


def _weighted_lstsq(design: np.ndarray, totals: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Least squares of ``design @ x = totals`` with rows scaled by ``scale``."""
    return np.linalg.lstsq(design * scale[:, None], totals * scale, rcond=None)[0]


@dataclass(frozen=True)
class HoldoutResult:
    """Leave-one-out error of a metric's prediction on the profile's own interior widths.

    Attributes
    ----------
    metric, interpolation : str
        What was predicted and how the per-layer cost was interpolated.
    widths : tuple of int
        The held-out widths (each interior width, one at a time).
    rel_errors : tuple of float
        Signed ``(predicted - measured) / measured`` for each held-out width.
    """

    metric: str
    interpolation: str
    widths: tuple[int, ...]
    rel_errors: tuple[float, ...]

    @property
    def max_abs_rel_error(self) -> float:
        """Largest absolute relative error (0.1 = 10 %)."""
        return float(np.max(np.abs(self.rel_errors)))

    @property
    def mean_abs_rel_error(self) -> float:
        """Mean absolute relative error (0.1 = 10 %)."""
        return float(np.mean(np.abs(self.rel_errors)))


class LatencyModel:
    """Per-layer cost model of one device, built from a :class:`Profile`.

    Use :meth:`from_profile`; :meth:`predict` then costs any list of per-layer widths.

    Parameters
    ----------
    profile : Profile
        The measured profile.
    interpolation : {"auto", "piecewise", "quadratic"}
        How per-layer costs are interpolated across widths; ``"auto"`` picks, per metric,
        the one with the lower mean leave-one-out error on the profile's interior widths.
    scale : float
        Factor on every time metric's prediction (:data:`TIME_METRICS`), for a machine that
        runs slower or faster than when it was profiled: :meth:`Drift.scale` of
        :func:`check_drift`. Energy and memory are not scaled.
    """

    def __init__(self, profile: Profile, interpolation: str = "auto",
                 scale: float = 1.0) -> None:
        if interpolation not in ("auto", *INTERPOLATIONS):
            raise ValueError(
                f"interpolation must be 'auto' or one of {INTERPOLATIONS}, got {interpolation!r}"
            )
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite factor, got {scale!r}")
        self.scale = float(scale)
        if len(profile.widths) < 3 and interpolation == "auto":
            interpolation = "piecewise"  # nothing to hold out
        self.profile = profile
        self._widths = np.array(profile.widths, dtype=float)
        self._fits: dict[str, tuple[float, np.ndarray, str]] = {}
        for metric in METRICS:
            if any(r.metric(metric) is None for r in profile.all_records):
                continue
            overhead, costs = self._split(metric, np.ones(len(self._widths), dtype=bool))
            method = interpolation
            if method == "auto":
                method = min(INTERPOLATIONS,
                             key=lambda m: self._holdout(metric, m).mean_abs_rel_error)
            self._fits[metric] = (overhead, costs, method)

    @classmethod
    def from_profile(cls, profile: Profile, interpolation: str = "auto",
                     scale: float = 1.0) -> LatencyModel:
        """Build the model of ``profile`` (see the class docstring).

        Examples
        --------
        >>> from compressm_tune.hardware import load_profile
        >>> model = LatencyModel.from_profile(load_profile(path))  # doctest: +SKIP
        >>> model.predict([47, 31, 12], metric="latency_ms")  # doctest: +SKIP
        3.1
        """
        return cls(profile, interpolation, scale)

    @property
    def metrics(self) -> list[str]:
        """The metrics this profile can predict (energy is absent when it was not measured)."""
        return list(self._fits)

    def interpolation(self, metric: str = "latency_ms") -> str:
        """The interpolation used for ``metric``."""
        return self._fit(metric)[2]

    def _split(self, metric: str, keep: np.ndarray, overhead: float | None = None
               ) -> tuple[float, np.ndarray]:
        """Fixed cost and per-block costs at the kept widths, fitted over their records.

        Weighted least squares of ``overhead + k * c_j = t`` with relative residuals. A
        negative fixed cost is noise (nothing runs in negative time): the fit is then redone
        with the fixed cost held at 0, with a warning when it is beyond plausible noise. A
        given ``overhead`` is held instead of fitted (the kept records may all have one block
        count, which cannot separate the two).
        """
        widths = [int(w) for w in self._widths[keep]]
        column = {w: j for j, w in enumerate(widths)}
        records = [r for r in self.profile.all_records if r.state_dim in column]
        totals = np.array([r.metric(metric) for r in records], dtype=float)  # (R,)
        design = np.zeros((len(records), 1 + len(widths)))  # (R, 1 + W): overhead, c_j
        design[:, 0] = 1.0
        for i, r in enumerate(records):
            design[i, 1 + column[r.state_dim]] = r.blocks
        scale = 1.0 / np.maximum(np.abs(totals), 1e-12 * np.abs(totals).max() + 1e-300)
        if overhead is None:
            overhead = float(_weighted_lstsq(design, totals, scale)[0])
            if overhead < -0.1 * totals.min():  # beyond plausible noise of a near-zero cost
                warnings.warn(
                    f"{metric}: the fixed-cost estimate is negative ({overhead:.4g}), "
                    "measurement noise; fitted with it held at 0. Re-profile with a larger "
                    "min_time_s (--min-time-s) or more rounds (--rounds)",
                    stacklevel=3,
                )
            overhead = max(overhead, 0.0)
        costs = _weighted_lstsq(design[:, 1:], totals - overhead, scale)  # (W,)
        return overhead, costs

    def _holdout(self, metric: str, interpolation: str) -> HoldoutResult:
        widths = self._widths
        measured = np.array(self.profile.values(metric), dtype=float)
        blocks = self.profile.config.blocks
        errors = []
        all_widths = np.ones(len(widths), dtype=bool)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the full fit warned already
            full_overhead = self._split(metric, all_widths)[0]
        for i in range(1, len(widths) - 1):
            keep = np.arange(len(widths)) != i
            kept = {r.blocks for r in self.profile.all_records if r.state_dim != widths[i]}
            # Hold the full fit's fixed cost when only one block count is left to fit from.
            held = None if len(kept) > 1 else full_overhead
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                overhead, costs = self._split(metric, keep, held)
            cost = _INTERPOLATORS[interpolation](widths[keep], costs, widths[i : i + 1])[0]
            errors.append((overhead + blocks * cost - measured[i]) / measured[i])
        held_out = tuple(int(w) for w in widths[1:-1])
        return HoldoutResult(metric, interpolation, held_out, tuple(float(e) for e in errors))

    def _fit(self, metric: str) -> tuple[float, np.ndarray, str]:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
        if metric not in self._fits:
            cfg = self.profile.config
            why = f"energy_method={self.profile.energy_method!r}"
            if metric == "latency_cpu_ms":
                why = (f"device={cfg.device!r}, threads={cfg.threads!r}: measured on a CPU "
                       "with 1 thread only, by schema version 2 on")
            raise ValueError(f"metric {metric!r} was not measured in this profile ({why})")
        return self._fits[metric]

    def overhead(self, metric: str = "latency_ms") -> float:
        """The fixed cost (encoder, head, dispatch) of ``metric``, in its unit."""
        return self._fit(metric)[0]

    def per_layer(self, width: int, metric: str = "latency_ms") -> float:
        """The cost of one block of state width ``width``, in the metric's unit."""
        overhead, costs, method = self._fit(metric)
        return float(_INTERPOLATORS[method](self._widths, costs, np.array([float(width)]))[0])

    def predict(self, state_dims: Sequence[int], metric: str = "latency_ms") -> float:
        """Predict ``metric`` of a model whose blocks have widths ``state_dims``.

        Parameters
        ----------
        state_dims : sequence of int
            One state width per block, each >= 1; any count of blocks. Widths outside the
            profiled range are extrapolated (end segment or quadratic; less reliable).
        metric : str
            One of :data:`METRICS`: ``"latency_ms"``, ``"latency_min_ms"``,
            ``"latency_cpu_ms"``, ``"step_ms"``, ``"batch_ms"``, ``"train_step_ms"``,
            ``"energy_mj"``, ``"peak_mem_mb"``, ``"infer_mem_mb"``.

        Returns
        -------
        float
            In the metric's unit, at the profile's hidden width, sequence length and batches;
            time metrics times ``scale``.
        """
        dims = [int(n) for n in state_dims]
        if not dims or min(dims) < 1:
            raise ValueError(f"state_dims must list at least one width >= 1, got {state_dims!r}")
        overhead, costs, method = self._fit(metric)
        per_layer = _INTERPOLATORS[method](self._widths, costs, np.array(dims, dtype=float))
        scale = self.scale if metric in TIME_METRICS else 1.0
        return float(scale * (overhead + per_layer.sum()))

    def holdout_error(self, metric: str = "latency_ms", interpolation: str | None = None
                      ) -> HoldoutResult:
        """Leave-one-out error of ``metric`` on the profile's interior widths.

        Each interior width is removed from the fit in turn (all its records, every block
        count) and the ``config.blocks``-block model at that width is predicted from the other
        widths and compared with its measurement.

        Parameters
        ----------
        metric : str
            One of :attr:`metrics`.
        interpolation : str, optional
            Override the interpolation; defaults to the one in use for ``metric``.

        Raises
        ------
        ValueError
            Fewer than three widths were profiled (no interior width to hold out).
        """
        method = interpolation or self._fit(metric)[2]
        if len(self._widths) < 3:
            raise ValueError(
                f"holding out needs >= 3 profiled widths, got {self.profile.widths}"
            )
        if method not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {method!r}")
        return self._holdout(metric, method)

    def fast_widths(self, metric: str = "latency_ms", tolerance: float = 0.1) -> list[int]:
        """The profile's fast widths (last width of each cost plateau), see
        :meth:`Profile.fast_widths`."""
        return self.profile.fast_widths(metric, tolerance)


DRIFT_ROUNDS = 10  # interleaved rounds of the check: a third of a profile's, a few seconds
# A drift beyond this is worth acting on: the latency model's own error is a few percent.
DRIFT_TOLERANCE = 0.05


@dataclass(frozen=True)
class Drift:
    """How this machine times the profile's reference models now, relative to the profile.

    Attributes
    ----------
    metric : str
        The metric compared (a time metric of :data:`METRICS`).
    widths : tuple of int
        Reference widths; each model has ``profile.config.blocks`` blocks of that width.
    profiled, measured : tuple of float
        The profile's and the new measurement's value per reference model.
    """

    metric: str
    widths: tuple[int, ...]
    profiled: tuple[float, ...]
    measured: tuple[float, ...]

    @property
    def ratios(self) -> tuple[float, ...]:
        """``measured / profiled`` per reference model."""
        return tuple(m / p for m, p in zip(self.measured, self.profiled, strict=True))

    @property
    def scale(self) -> float:
        """Median ratio: what to multiply the profile's time predictions by (1.17 = 17 %
        slower now). The median, so one reference model disturbed by a burst of load does not
        move it."""
        return float(np.median(self.ratios))

    @property
    def significant(self) -> bool:
        """Whether the machine moved by more than ``DRIFT_TOLERANCE``: worth acting on."""
        return abs(self.scale - 1.0) > DRIFT_TOLERANCE

    def change(self) -> str:
        """``"17% slower"`` or ``"8% faster"``."""
        return f"{abs(self.scale - 1):.0%} {'slower' if self.scale > 1 else 'faster'}"

    def summary(self) -> str:
        """One line: the scale and the per-width ratios."""
        per = ", ".join(f"N={w}: {r:.3f}" for w, r in zip(self.widths, self.ratios, strict=True))
        return (f"{self.metric} now / profile = {self.scale:.3f} (median of {per})")


def measured_here(profile: Profile) -> bool:
    """Whether ``profile`` describes this machine (its device fingerprint's slug)."""
    return profile.device.slug == fingerprint(profile.config.device).slug


def reference_widths(profile: Profile, count: int = 3) -> tuple[int, ...]:
    """``count`` profiled widths spread evenly (in log width) over the profile's range."""
    widths = profile.widths
    idx = np.unique(np.round(np.linspace(0, len(widths) - 1, count + 2)[1:-1]).astype(int))
    return tuple(widths[i] for i in idx)


def check_drift(profile: Profile, widths: Sequence[int] | None = None,
                metric: str = "latency_ms", rounds: int = DRIFT_ROUNDS,
                progress: bool = False) -> Drift:
    """Re-measure the profile's ``K``-block models at ``widths`` on this machine.

    Parameters
    ----------
    profile : Profile
        Measured on this machine (same device kind, runtime and settings are reused).
    widths : sequence of int, optional
        Profiled widths to re-measure; default :func:`reference_widths` (three).
    metric : str
        A time metric the profile holds, e.g. ``"latency_ms"`` or ``"latency_cpu_ms"``.
    rounds : int
        Interleaved timing rounds (the profile's own method, fewer rounds).
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    Drift

    Raises
    ------
    ConfigError
        The profile is of another machine (a drift check compares a machine with itself), a
        width the profile did not measure, or a metric it does not hold.
    """
    if not measured_here(profile):
        raise ConfigError(f"the profile was measured on {profile.device.label}, this machine "
                          f"is {fingerprint(profile.config.device).label}: a drift check "
                          "compares a machine with itself")
    widths = tuple(int(w) for w in (widths or reference_widths(profile)))
    by_width = {r.state_dim: r for r in profile.records}
    missing = [w for w in widths if w not in by_width]
    if missing or not widths:
        raise ConfigError(f"drift check widths must be profiled widths {profile.widths}, "
                          f"got {list(widths)}")
    if metric not in TIME_METRICS or any(by_width[w].metric(metric) is None for w in widths):
        raise ConfigError(f"drift check metric must be a time metric this profile holds, "
                          f"got {metric!r}")
    config = dataclasses.replace(profile.config, rounds=min(rounds, profile.config.rounds))
    K = profile.config.blocks
    records = measure_models([(w,) * K for w in widths], config, progress=progress)
    return Drift(metric, widths, tuple(by_width[w].metric(metric) for w in widths),
                 tuple(r.metric(metric) for r in records))
