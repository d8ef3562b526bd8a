"""Energy backends: the abstract interface, the null object and the CPU-time estimate.

A backend turns a window of work into millijoules. :meth:`EnergyBackend.begin` returns an
opaque token and :meth:`EnergyBackend.end` the energy consumed since that token, so windows
may overlap (the Zeus habit). Hardware counters (NVML, RAPL) live in their own modules.
"""

from __future__ import annotations

import abc
import time

from compressm_tune.errors import EnergyBackendError

__all__ = [
    "CpuTimeEstimateBackend",
    "EnergyBackend",
    "EnergyBackendError",
    "NullEnergyBackend",
    "DEFAULT_WATTS_PER_CORE",
]

# Rough share of package power per busy core: a server part draws ~3.5 W/core
# (225 W / 64 cores), a desktop part 10+ W/core. Figures from it are labelled "estimate".
DEFAULT_WATTS_PER_CORE = 5.0
# Sources refreshing this slowly (NVML: every 20-100 ms) get energy windows of their own.
LONG_WINDOW_REFRESH_S = 0.01
MIN_ENERGY_WINDOW_S = 1.0
ENERGY_WINDOW_ERROR = 0.05  # one refresh period at most this share of an energy window



class EnergyBackend(abc.ABC):
    """Reads the energy consumed by a window of work.

    Attributes
    ----------
    method : str
        Label stored beside every figure this backend produces, e.g. ``"rapl"``.
        Labels of estimates start with ``"estimate"``.
    note : str
        One human-readable line on what is measured and how (written into profiles).
    """

    method: str = "abstract"
    note: str = ""
    # How often the reading advances, in seconds (0: read exactly at call time). A window
    # shorter than a few refresh periods reads 0 or one jump: the profiler gives a source that
    # refreshes every >= LONG_WINDOW_REFRESH_S windows of its own (see long_window_s).
    refresh_s: float = 0.0

    def long_window_s(self) -> float | None:
        """Shortest energy window that reads this source to within ``ENERGY_WINDOW_ERROR``,
        and at least ``MIN_ENERGY_WINDOW_S`` (Zeus measures >= 1 s windows for the same
        reason); ``None`` when the timing windows themselves are long enough."""
        if self.refresh_s < LONG_WINDOW_REFRESH_S:
            return None
        return max(MIN_ENERGY_WINDOW_S, self.refresh_s / ENERGY_WINDOW_ERROR)

    @property
    def is_estimate(self) -> bool:
        """Whether figures are modelled rather than read from an energy counter."""
        return self.method.startswith("estimate")

    @abc.abstractmethod
    def begin(self) -> object:
        """Start a window and return an opaque token for :meth:`end`."""

    @abc.abstractmethod
    def end(self, token: object) -> float | None:
        """Return the energy in millijoules consumed since ``token``; ``None`` if unavailable."""

    def close(self) -> None:  # noqa: B027 - optional hook; most backends hold nothing
        """Release threads or library handles; the default holds none."""


class NullEnergyBackend(EnergyBackend):
    """Null object used when no energy source exists: every window reports ``None``.

    Examples
    --------
    >>> backend = NullEnergyBackend("no NVML on this machine")
    >>> backend.end(backend.begin()) is None
    True
    >>> backend.method
    'unavailable'
    """

    method = "unavailable"

    def __init__(self, reason: str = "no energy source available") -> None:
        self.note = f"energy not measured: {reason}"

    def begin(self) -> object:
        """Return a placeholder token."""
        return None

    def end(self, token: object) -> float | None:
        """Return ``None``: nothing is measured."""
        return None


class CpuTimeEstimateBackend(EnergyBackend):
    """Estimate energy as process CPU time x a fixed power per busy core.

    Used on CPUs whose RAPL counters are absent or unreadable. The process CPU time
    (user + system, all threads) is read with :func:`time.process_time`; each CPU-second
    is charged ``watts_per_core`` joules. Idle and uncore power are not counted, so the
    figure is a rough, comparable estimate, never a measurement.

    Parameters
    ----------
    watts_per_core : float
        Power in watts charged per busy core, > 0.

    Examples
    --------
    >>> backend = CpuTimeEstimateBackend(watts_per_core=4.0)
    >>> backend.method, backend.is_estimate
    ('estimate_cpu_time', True)
    >>> backend.end(backend.begin()) >= 0.0
    True
    """

    method = "estimate_cpu_time"

    def __init__(self, watts_per_core: float = DEFAULT_WATTS_PER_CORE) -> None:
        if not watts_per_core > 0:
            raise ValueError(f"watts_per_core must be > 0, got {watts_per_core=}")
        self.watts_per_core = float(watts_per_core)
        self.note = (
            f"process CPU time x {self.watts_per_core:g} W per busy core; "
            "idle and uncore power not counted"
        )

    def begin(self) -> object:
        """Return the process CPU time in seconds."""
        return time.process_time()

    def end(self, token: object) -> float | None:
        """Return CPU-seconds since ``token`` x watts per core, in millijoules."""
        cpu_time_s = time.process_time() - float(token)  # type: ignore[arg-type]
        return cpu_time_s * self.watts_per_core * 1e3
