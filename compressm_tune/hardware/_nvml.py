"""NVIDIA GPU energy through NVML (``nvidia-ml-py``, imported as ``pynvml``).

Two backends: the total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, millijoules,
Volta and newer) and, where that is not supported, power samples (``nvmlDeviceGetPowerUsage``,
milliwatts) taken on a thread and integrated over each window.
"""

from __future__ import annotations

import abc
import os
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from compressm_tune.errors import MissingDependencyError
from compressm_tune.hardware._energy_base import EnergyBackend, EnergyBackendError

__all__ = [
    "NvmlCounterBackend",
    "NvmlPowerSamplingBackend",
    "import_pynvml",
    "nvml_backend",
    "nvml_device_info",
]


def import_pynvml() -> ModuleType:
    """Import ``pynvml`` or raise :class:`MissingDependencyError` naming the package."""
    try:
        import pynvml
    except ImportError as err:
        raise MissingDependencyError(
            "NVML energy needs the `nvidia-ml-py` package: pip install nvidia-ml-py"
        ) from err
    return pynvml


def _nvml_index(cuda_index: int) -> int | str:
    """Map a CUDA ordinal to an NVML index or UUID, honouring ``CUDA_VISIBLE_DEVICES``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return cuda_index
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if cuda_index >= len(entries):
        raise EnergyBackendError(f"cuda:{cuda_index} is not in CUDA_VISIBLE_DEVICES={visible!r}")
    entry = entries[cuda_index]
    return int(entry) if entry.isdigit() else entry


def _open_handle(cuda_index: int) -> tuple[ModuleType, Any]:
    """Initialise NVML and return ``(pynvml, handle)`` for a CUDA ordinal."""
    pynvml = import_pynvml()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        raise EnergyBackendError(f"NVML could not be initialised: {err}") from err
    index = _nvml_index(cuda_index)
    try:
        if isinstance(index, int):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        else:
            handle = pynvml.nvmlDeviceGetHandleByUUID(index)
    except pynvml.NVMLError as err:
        pynvml.nvmlShutdown()
        raise EnergyBackendError(f"NVML has no device for cuda:{cuda_index}: {err}") from err
    return pynvml, handle


def nvml_device_info(cuda_index: int) -> dict[str, Any]:
    """Return ``{"gpu_name", "gpu_driver", "gpu_memory_mb"}`` from NVML for a CUDA ordinal.

    Raises
    ------
    MissingDependencyError
        ``pynvml`` is not installed.
    EnergyBackendError
        NVML cannot be initialised or has no such device.
    """
    pynvml, handle = _open_handle(cuda_index)
    try:
        return {
            "gpu_name": pynvml.nvmlDeviceGetName(handle),
            "gpu_driver": pynvml.nvmlSystemGetDriverVersion(),
            "gpu_memory_mb": pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**20,
        }
    finally:
        pynvml.nvmlShutdown()


# Assumed when the reading does not move while probed (an idle board's constant power).
_DEFAULT_REFRESH_S = 0.1


def refresh_period(read: Callable[[], float], timeout_s: float = 1.0) -> float:
    """How often ``read()`` returns a new value, in seconds: the median time between the
    changes seen while polling it for up to ``timeout_s`` (three changes suffice).

    NVML's counter and power readings advance in steps of 20-100 ms depending on the board;
    a window of that length reads zero or one step, which is why energy needs longer windows.
    """
    changes: list[float] = []
    last = read()
    deadline = time.perf_counter() + timeout_s
    while len(changes) < 4 and time.perf_counter() < deadline:
        value = read()
        if value != last:
            changes.append(time.perf_counter())
            last = value
    if len(changes) < 2:
        return _DEFAULT_REFRESH_S
    return float(np.median(np.diff(changes)))


class _NvmlBackend(EnergyBackend):
    """Holds one NVML handle; :meth:`close` shuts the library reference down once."""

    def __init__(self, pynvml: ModuleType, handle: Any) -> None:
        self._pynvml = pynvml
        self._handle = handle
        self._closed = False
        self.refresh_s = refresh_period(lambda: self._read())
        window_s = self.long_window_s()
        if window_s is not None:
            self.note += (f"; the reading refreshes every {self.refresh_s * 1e3:.0f} ms, so "
                          f"energy is read over windows of >= {window_s:g} s")

    @abc.abstractmethod
    def _read(self) -> float:
        """The raw reading whose refresh period bounds the error of a window."""

    def close(self) -> None:
        """Drop this backend's NVML reference (NVML counts ``nvmlInit`` calls)."""
        if not self._closed:
            self._closed = True
            self._pynvml.nvmlShutdown()


class NvmlCounterBackend(_NvmlBackend):
    """GPU energy from the NVML total-energy counter (millijoules since driver load)."""

    method = "nvml_total_energy"
    note = "NVML total-energy counter (nvmlDeviceGetTotalEnergyConsumption), GPU board only"

    def _read(self) -> float:
        return float(self._pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def begin(self) -> object:
        """Return the counter in millijoules."""
        return self._pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)

    def end(self, token: object) -> float | None:
        """Return millijoules since ``token``."""
        now_mj = self._pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        return float(now_mj - token)  # type: ignore[operator]


class NvmlPowerSamplingBackend(_NvmlBackend):
    """GPU energy by integrating NVML power samples (trapezoid rule) over each window.

    A daemon thread samples ``nvmlDeviceGetPowerUsage`` (milliwatts) every ``interval_s``
    while at least one window is open; both window ends take a sample of their own.

    Parameters
    ----------
    interval_s : float
        Sampling period in seconds; NVML refreshes power every ~20-100 ms.
    """

    method = "nvml_power_sampling"

    def __init__(self, pynvml: ModuleType, handle: Any, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.note = f"NVML power samples every {interval_s * 1e3:g} ms, integrated per window"
        super().__init__(pynvml, handle)
        self._samples: list[tuple[float, float]] = []  # (perf_counter s, power mW)
        self._open_windows = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> float:
        return float(self._pynvml.nvmlDeviceGetPowerUsage(self._handle))

    def _sample(self) -> None:
        power_mw = float(self._pynvml.nvmlDeviceGetPowerUsage(self._handle))
        with self._lock:
            self._samples.append((time.perf_counter(), power_mw))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def begin(self) -> object:
        """Start the sampler if idle; return the window's start time in seconds."""
        with self._lock:
            self._open_windows += 1
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, daemon=True)
                self._thread.start()
        start_s = time.perf_counter()
        self._sample()
        return start_s

    def end(self, token: object) -> float | None:
        """Integrate the samples since ``token``; stop the sampler if no window is open."""
        self._sample()
        end_s = time.perf_counter()
        with self._lock:
            window = [(t, p) for t, p in self._samples if float(token) <= t <= end_s]  # type: ignore[arg-type]
            self._open_windows -= 1
            stop = self._open_windows == 0
            if stop:
                self._samples.clear()
        if stop:
            self._stop_thread()
        pairs = zip(window, window[1:], strict=False)
        return sum(0.5 * (p0 + p1) * (t1 - t0) for (t0, p0), (t1, p1) in pairs)  # mW x s = mJ

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Stop the sampler thread and release NVML."""
        self._stop_thread()
        super().close()


def nvml_backend(cuda_index: int, *, interval_s: float = 0.01) -> EnergyBackend:
    """Open the best NVML backend for a CUDA ordinal: the counter, else power sampling.

    Raises
    ------
    MissingDependencyError
        ``pynvml`` is not installed.
    EnergyBackendError
        NVML cannot be initialised, has no such device, or reads no power at all.
    """
    pynvml, handle = _open_handle(cuda_index)
    probes: list[tuple[Callable[[Any], Any], Callable[[], EnergyBackend]]] = [
        (pynvml.nvmlDeviceGetTotalEnergyConsumption, lambda: NvmlCounterBackend(pynvml, handle)),
        (
            pynvml.nvmlDeviceGetPowerUsage,
            lambda: NvmlPowerSamplingBackend(pynvml, handle, interval_s),
        ),
    ]
    reasons = []
    for probe, make in probes:
        try:
            probe(handle)
        except pynvml.NVMLError as err:  # NotSupported before Volta, NoPermission in some VMs
            reasons.append(f"{probe.__name__}: {err}")
            continue
        return make()
    pynvml.nvmlShutdown()
    raise EnergyBackendError(f"NVML reads no energy or power on cuda:{cuda_index}: {reasons}")
