"""Memory: a call's peak memory, and allocator settings that keep timings comparable.

Peak memory is CUDA's allocator peak on a GPU and sampled RSS growth on a CPU.
:func:`keep_freed_memory` keeps glibc from unmapping freed per-call buffers (the scan's state
sequence is ``L * N * 8`` bytes): otherwise, depending on what the process allocated before,
they are page-faulted back in on every call, and the same model times up to 2x differently from
one process to the next.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch

__all__ = ["MemoryUsage", "keep_freed_memory", "measure_peak_memory", "memory_method", "param_mb"]

_MB = 2**20


@dataclass(frozen=True)
class MemoryUsage:
    """Peak memory a call needed above what was resident before it.

    Attributes
    ----------
    peak_mb : float
        Peak growth in MiB (2**20 bytes) during the call, >= 0.
    method : str
        ``"cuda_max_memory_allocated"`` or ``"rss_sampling"``.
    """

    peak_mb: float
    method: str


def memory_method(device: torch.device) -> str:
    """How :func:`measure_peak_memory` measures on ``device``.

    Examples
    --------
    >>> memory_method(torch.device("cpu"))
    'rss_sampling'
    """
    return "cuda_max_memory_allocated" if device.type == "cuda" else "rss_sampling"


def param_mb(module: torch.nn.Module) -> float:
    """Return the size of a module's parameters and buffers in MiB.

    Examples
    --------
    >>> round(param_mb(torch.nn.Linear(256, 256, bias=False)), 3)
    0.25
    """
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / _MB


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``) so RSS growth is visible."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def measure_peak_memory(
    fn: Callable[[], object], device: torch.device, *, interval_s: float = 0.0005
) -> MemoryUsage:
    """Run ``fn`` once and return its peak memory growth.

    On CUDA the allocator's peak (``torch.cuda.max_memory_allocated``) is exact. On CPU a
    thread samples the process RSS every ``interval_s`` seconds and the growth over the RSS
    just before the call is reported; freed heap is first returned to the OS (glibc
    ``malloc_trim``), but memory the allocator reuses from earlier calls is not counted,
    so the CPU figure is a lower bound resolved to the sampling period.

    Parameters
    ----------
    fn : callable
        The work, run once.
    device : torch.device
        Where ``fn`` allocates.
    interval_s : float
        RSS sampling period on CPU, in seconds.

    Returns
    -------
    MemoryUsage
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline_bytes = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak_bytes = torch.cuda.max_memory_allocated(device) - baseline_bytes
        return MemoryUsage(peak_mb=max(peak_bytes, 0) / _MB, method=memory_method(device))

    process = psutil.Process()
    _release_free_heap()
    baseline_bytes = process.memory_info().rss
    peak = [baseline_bytes]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    return MemoryUsage(peak_mb=(peak[0] - baseline_bytes) / _MB, method=memory_method(device))


_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024  # keep up to 256 MiB of free heap top
_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's maximum: allocations below come from the heap


def keep_freed_memory() -> str | None:
    """Raise glibc's trim and mmap thresholds for this process; say what was done.

    Process-wide and left in place: glibc cannot be put back into its adaptive mode, and its
    static defaults (128 KiB) would unmap every larger buffer on free, which is worse for a
    process that goes on to train. A process keeps up to 256 MiB of freed heap instead of
    returning it to the OS.

    Returns
    -------
    str or None
        A sentence for the profile's timing method, or ``None`` where there is no glibc
        ``mallopt`` (macOS, Windows, musl without it) and nothing was changed.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    trimmed = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    mapped = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    if not (trimmed and mapped):
        return None
    return ("glibc malloc trim and mmap thresholds raised (mallopt: 256 MiB, 32 MiB) so that "
            "per-call buffers are reused, not unmapped and page-faulted back in on every call")
