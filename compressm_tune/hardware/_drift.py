"""Has this machine changed since its profile was measured? Re-measure a few reference models.

A profile is a snapshot. On a shared machine the same models ran 17 % slower ten minutes
after one profile was taken (a neighbour on the other core; ``latency_cpu_ms`` moved as much,
so it was not waiting for a core; ``bench_results/profiler_accuracy_drift.md``), and 8 %
faster two hours after another (``bench_results/profiler_accuracy.md``). No latency model
predicts that, but a few seconds of measurement see it: :func:`check_drift` re-times the
profile's own equal-width models at a few widths, with the profile's settings, and
:class:`Drift` gives the ratio to scale predictions by
(:class:`~compressm_tune.hardware.LatencyModel` ``scale=``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compressm_tune.errors import ConfigError
from compressm_tune.hardware._fingerprint import fingerprint
from compressm_tune.hardware._latency_model import TIME_METRICS
from compressm_tune.hardware._profiler import measure_models
from compressm_tune.hardware._schema import Profile

__all__ = ["Drift", "check_drift", "measured_here", "reference_widths"]

DRIFT_ROUNDS = 10  # interleaved rounds of the check: a third of a profile's, a few seconds
# A drift beyond this is worth acting on: the latency model's own error on this machine is
# about 4 % (median, bench_results/profiler_accuracy.md).
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
