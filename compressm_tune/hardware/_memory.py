"""Peak memory of one call: CUDA's allocator peak on a GPU, sampled RSS growth on a CPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch

__all__ = ["MemoryUsage", "measure_peak_memory", "memory_method", "param_mb"]

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
