"""Repeated timing with warm-up, a minimum amount of work, and robust statistics."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["CallTimes", "TimingStats", "fixed_threads", "time_calls", "time_repeats",
           "time_samples", "warm_up", "TIMING_METHOD"]

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
    if min_time_s < 0 or not 1 <= min_repeats <= max_repeats:
        raise ValueError(
            "min_time_s >= 0 and 1 <= min_repeats <= max_repeats must hold, got "
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
