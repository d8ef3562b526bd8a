"""Timing calls and measuring windows of work.

Timing repeats calls after a warm-up, for at least a minimum amount of work, and summarizes them
robustly (:class:`TimingStats`). :class:`MeasurementMonitor` reads time and energy in named
windows (the Zeus ``begin_window`` / ``end_window`` pattern).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from compressm_tune.hardware._energy import EnergyBackend, NullEnergyBackend

__all__ = [
    "CPU_TIMING_METHOD", "TIMING_METHOD", "CallTimes", "Measurement", "MeasurementMonitor",
    "TimingStats", "fixed_threads", "synchronize", "time_calls", "time_repeats", "time_samples",
    "warm_up",
]


TIMING_METHOD = (
    "wall clock (time.perf_counter) per call; {warmup} warm-up call(s) per model, then "
    "{rounds} interleaved round(s) over all models in shuffled order, together at least "
    "{min_time_s:g} s of work and {min_repeats} calls per metric; in every round the batch-1 "
    "latency and step timings start with one untimed call (caches are cold after the other "
    "models ran), so all their timed calls are warm; the device is synchronized "
    "before and after every call; median (p50), IQR (p75-p25), p90, p99 reported; "
    "torch intra-op threads fixed to {threads}"
)
CPU_TIMING_METHOD = (
    "; batch-1 inference also timed in CPU time of the timed thread "
    "(time.thread_time_ns) around each call: latency_cpu, the time the thread was on a core, "
    "which waiting for a core shared with other processes does not inflate"
)


@dataclass(frozen=True)
class TimingStats:
    """Statistics of repeated calls, all times in milliseconds per call.

    Attributes
    ----------
    p50_ms : float
        Median.
    p90_ms, p99_ms : float
        90th and 99th percentiles (linear interpolation).
    iqr_ms : float
        Interquartile range p75 - p25, the spread.
    mean_ms, min_ms : float
        Mean and fastest call.
    repeats : int
        Number of timed calls.
    total_s : float
        Sum of the timed calls, in seconds.
    """

    p50_ms: float
    p90_ms: float
    p99_ms: float
    iqr_ms: float
    mean_ms: float
    min_ms: float
    repeats: int
    total_s: float

    @property
    def median_ms(self) -> float:
        """The median, same as ``p50_ms``."""
        return self.p50_ms

    @classmethod
    def from_samples(cls, samples_ms: np.ndarray) -> TimingStats:
        """Summarize per-call times in milliseconds (at least one).

        Examples
        --------
        >>> s = TimingStats.from_samples(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
        >>> s.p50_ms, s.iqr_ms, s.repeats
        (3.0, 2.0, 5)
        """
        samples_ms = np.asarray(samples_ms, dtype=float)
        if samples_ms.size == 0:
            raise ValueError("at least one timing sample is needed, got 0")
        p25, p50, p75, p90, p99 = np.percentile(samples_ms, [25, 50, 75, 90, 99])
        return cls(
            p50_ms=float(p50),
            p90_ms=float(p90),
            p99_ms=float(p99),
            iqr_ms=float(p75 - p25),
            mean_ms=float(samples_ms.mean()),
            min_ms=float(samples_ms.min()),
            repeats=int(samples_ms.size),
            total_s=float(samples_ms.sum() / 1e3),
        )


def warm_up(fn: Callable[[], object], calls: int) -> None:
    """Call ``fn`` ``calls`` times untimed (allocator, caches, JIT, lazy init)."""
    for _ in range(calls):
        fn()


@dataclass(frozen=True)
class CallTimes:
    """Per-call times of :func:`time_calls`, in call order.

    Attributes
    ----------
    wall_ms : numpy.ndarray
        ``(repeats,)`` float64 wall-clock time of each call, ms.
    thread_cpu_ms : numpy.ndarray
        ``(repeats,)`` float64 CPU time the calling thread consumed during each call, ms
        (``time.thread_time_ns``, read just outside the wall-clock window). With all work on
        the calling thread (a CPU with one intra-op thread) it is the call's time on a core:
        ``wall_ms - thread_cpu_ms`` is time spent waiting, e.g. for a core other processes
        held. Work on other threads or on a GPU does not count in it.
    """

    wall_ms: np.ndarray
    thread_cpu_ms: np.ndarray


def time_calls(
    fn: Callable[[], object],
    *,
    min_time_s: float,
    min_repeats: int = 5,
    max_repeats: int = 100_000,
    sync: Callable[[], None] = lambda: None,
) -> CallTimes:
    """Time ``fn`` call by call, in wall-clock and thread CPU time, until at least
    ``min_time_s`` of (wall-clock) work and ``min_repeats`` calls.

    Parameters are those of :func:`time_samples`.

    Returns
    -------
    CallTimes

    Examples
    --------
    >>> times = time_calls(lambda: sum(range(10_000)), min_time_s=0.0, min_repeats=3)
    >>> times.wall_ms.shape, times.thread_cpu_ms.shape
    ((3,), (3,))
    """
    if not 0 <= min_time_s < math.inf or not 1 <= min_repeats <= max_repeats:
        raise ValueError(
            "0 <= min_time_s < inf and 1 <= min_repeats <= max_repeats must hold, got "
            f"{min_time_s=}, {min_repeats=}, {max_repeats=}"
        )
    wall_ms: list[float] = []
    cpu_ms: list[float] = []
    total_s = 0.0
    while len(wall_ms) < max_repeats and (total_s < min_time_s or len(wall_ms) < min_repeats):
        sync()
        cpu_start_ns = time.thread_time_ns()
        start_s = time.perf_counter()
        fn()
        sync()
        elapsed_s = time.perf_counter() - start_s
        cpu_ms.append((time.thread_time_ns() - cpu_start_ns) / 1e6)
        wall_ms.append(elapsed_s * 1e3)
        total_s += elapsed_s
    return CallTimes(np.array(wall_ms), np.array(cpu_ms))


def time_samples(
    fn: Callable[[], object],
    *,
    min_time_s: float,
    min_repeats: int = 5,
    max_repeats: int = 100_000,
    sync: Callable[[], None] = lambda: None,
) -> np.ndarray:
    """Time ``fn`` call by call until at least ``min_time_s`` of work and ``min_repeats`` calls.

    Parameters
    ----------
    fn : callable
        The work; its result is discarded.
    min_time_s : float
        Minimum summed call time in seconds, >= 0.
    min_repeats, max_repeats : int
        Bounds on the number of calls, ``1 <= min_repeats <= max_repeats``.
    sync : callable
        Called before starting and after stopping each call's clock
        (``torch.cuda.synchronize`` on a GPU).

    Returns
    -------
    numpy.ndarray
        ``(repeats,)`` float64 wall-clock time of each call in milliseconds, in call order.

    Examples
    --------
    >>> time_samples(lambda: sum(range(100)), min_time_s=0.0, min_repeats=7).shape
    (7,)
    """
    return time_calls(fn, min_time_s=min_time_s, min_repeats=min_repeats,
                      max_repeats=max_repeats, sync=sync).wall_ms


def time_repeats(
    fn: Callable[[], object],
    *,
    min_time_s: float,
    min_repeats: int = 5,
    max_repeats: int = 100_000,
    sync: Callable[[], None] = lambda: None,
) -> TimingStats:
    """:func:`time_samples` summarized as :class:`TimingStats` (same parameters).

    Examples
    --------
    >>> time_repeats(lambda: sum(range(100)), min_time_s=0.0, min_repeats=7).repeats
    7
    """
    return TimingStats.from_samples(
        time_samples(fn, min_time_s=min_time_s, min_repeats=min_repeats,
                     max_repeats=max_repeats, sync=sync)
    )


@contextlib.contextmanager
def fixed_threads(threads: int) -> Iterator[int]:
    """Fix torch's intra-op thread count inside the block; restore it afterwards.

    Yields
    ------
    int
        The thread count torch reports inside the block.

    Examples
    --------
    >>> with fixed_threads(1) as n:
    ...     n
    1
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads=}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def synchronize(device: torch.device) -> None:
    """Wait for all work queued on ``device`` (a no-op on CPU, where calls are synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Measurement:
    """What one window consumed.

    Attributes
    ----------
    key : str
        The window's name.
    latency_ms : float
        Wall-clock time between the synchronized window ends, in milliseconds.
    cpu_time_ms : float
        Process CPU time (user + system, all threads) in the window, in milliseconds.
    energy_mj : float or None
        Energy in millijoules; ``None`` when the backend measures none.
    energy_method : str
        Label of the backend that produced ``energy_mj``; estimates start with ``"estimate"``.
    """

    key: str
    latency_ms: float
    cpu_time_ms: float
    energy_mj: float | None
    energy_method: str

    @property
    def avg_power_w(self) -> float | None:
        """Mean power in watts over the window (mJ / ms = W); ``None`` without energy."""
        if self.energy_mj is None or self.latency_ms <= 0:
            return None
        return self.energy_mj / self.latency_ms


class MeasurementMonitor:
    """Measure time and energy of named, possibly overlapping windows on one device.

    Both window ends synchronize the device before reading the clocks, so a window holds
    all and only the work dispatched inside it.

    Parameters
    ----------
    device : str or torch.device
        Device to synchronize, ``"cpu"`` or ``"cuda:N"``.
    energy_backend : EnergyBackend, optional
        Energy source; the :class:`NullEnergyBackend` when omitted.

    Examples
    --------
    >>> monitor = MeasurementMonitor("cpu")
    >>> monitor.begin_window("sum")
    >>> _ = sum(range(1000))
    >>> m = monitor.end_window("sum")
    >>> m.key, m.latency_ms >= 0, m.energy_method
    ('sum', True, 'unavailable')
    >>> monitor.end_window("sum")
    Traceback (most recent call last):
    ...
    ValueError: no measurement window named 'sum' is open (open: [])
    """

    def __init__(
        self, device: str | torch.device = "cpu", energy_backend: EnergyBackend | None = None
    ) -> None:
        self.device = torch.device(device)
        self.energy_backend = energy_backend or NullEnergyBackend()
        self._windows: dict[str, tuple[float, float, object]] = {}

    def begin_window(self, key: str) -> None:
        """Open a window named ``key``.

        Raises
        ------
        ValueError
            A window named ``key`` is already open.
        """
        if key in self._windows:
            raise ValueError(f"a measurement window named {key!r} is already open")
        synchronize(self.device)
        token = self.energy_backend.begin()
        self._windows[key] = (time.perf_counter(), time.process_time(), token)

    def end_window(self, key: str) -> Measurement:
        """Close the window named ``key`` and return what it consumed.

        Warns
        -----
        UserWarning
            The energy counter did not advance in a non-empty window (too short for its
            update rate); lengthen the window, e.g. with ``ProfilerConfig.min_time_s``.

        Raises
        ------
        ValueError
            No window named ``key`` is open.
        """
        start_s, start_cpu_s, token = self._pop(key)
        synchronize(self.device)
        end_s, end_cpu_s = time.perf_counter(), time.process_time()
        energy_mj = self.energy_backend.end(token)
        latency_ms = (end_s - start_s) * 1e3
        if energy_mj is not None and energy_mj <= 0.0 and latency_ms > 0.0:
            warnings.warn(
                f"window {key!r}: {self.energy_backend.method} read {energy_mj} mJ over "
                f"{latency_ms:.2f} ms; the counter updates too slowly for so short a window: "
                "raise min_time_s to lengthen it",
                stacklevel=2,
            )
        return Measurement(
            key=key,
            latency_ms=latency_ms,
            cpu_time_ms=(end_cpu_s - start_cpu_s) * 1e3,
            energy_mj=energy_mj,
            energy_method=self.energy_backend.method,
        )

    def cancel_window(self, key: str) -> None:
        """Discard the open window named ``key``.

        Raises
        ------
        ValueError
            No window named ``key`` is open.
        """
        _, _, token = self._pop(key)
        self.energy_backend.end(token)

    def _pop(self, key: str) -> tuple[float, float, object]:
        if key not in self._windows:
            raise ValueError(
                f"no measurement window named {key!r} is open (open: {sorted(self._windows)})"
            )
        return self._windows.pop(key)

    def close(self) -> None:
        """Release the energy backend."""
        self.energy_backend.close()

    def __enter__(self) -> MeasurementMonitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
