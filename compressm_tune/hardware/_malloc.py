"""Keep glibc's allocator from handing large freed buffers back to the OS between calls.

glibc adjusts its mmap and trim thresholds as a process runs. Depending on what the process
allocated before, a model's per-call buffers (the scan's state sequence is ``L * N * 8`` bytes,
1 MiB at L=256, N=512) are either reused from the heap or unmapped (or trimmed off the heap
top) on free and page-faulted back in on the next call. Measured on a 2-core CPU, a 1-block
N=512 model took 2.5 ms per inference in one state and 4.9 ms in the other (480 page faults and
1.4 ms of system time per call), so the same model measured in two processes could differ by
2x. Raising both thresholds makes every process reuse its buffers, the steady state a
long-running inference process (or onnxruntime's arena) reaches.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["keep_freed_memory"]

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
