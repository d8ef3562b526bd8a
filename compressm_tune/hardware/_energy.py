"""Energy backends: read the energy a window of work consumed, in millijoules.

:meth:`EnergyBackend.begin` returns an opaque token and :meth:`EnergyBackend.end` the energy
consumed since it, so windows may overlap (the Zeus habit). Sources: NVML on NVIDIA GPUs (the
total-energy counter, else power samples integrated on a thread), RAPL package counters on
CPUs, else an estimate from process CPU time labelled as one, or nothing
(:class:`NullEnergyBackend`). :func:`select_energy_backend` picks one for a device.
"""

from __future__ import annotations

import abc
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from compressm_tune.errors import ConfigError, EnergyBackendError, MissingDependencyError

__all__ = [
    "CpuTimeEstimateBackend", "DEFAULT_WATTS_PER_CORE", "ENERGY_CHOICES", "EnergyBackend",
    "NullEnergyBackend", "NvmlCounterBackend", "NvmlPowerSamplingBackend",
    "RAPL_ROOT", "RaplBackend", "import_pynvml", "nvml_backend", "nvml_device_info",
    "select_energy_backend",
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


RAPL_ROOT = Path("/sys/class/powercap")
# Top-level package zones only ("intel-rapl:0"); sub-zones ("intel-rapl:0:0", core/dram)
# are contained in their package and would be double counted.
_PACKAGE_ZONE = re.compile(r"^intel-rapl:\d+$")


class RaplBackend(EnergyBackend):
    """Sum of the RAPL package counters (``energy_uj``), with wrap-around correction.

    Each counter wraps at its ``max_energy_range_uj``; one wrap per window is corrected.
    The counters cover the whole package, so work of other processes on a shared
    machine is counted too.

    ``root`` is the powercap directory (tests point it at a fake tree). Raises
    EnergyBackendError when no package zone exists or its counter is unreadable (the message
    says how to fix it).
    """

    method = "rapl"

    def __init__(self, root: Path = RAPL_ROOT) -> None:
        zones = sorted(p for p in Path(root).glob("intel-rapl:*") if _PACKAGE_ZONE.match(p.name))
        if not zones:
            raise EnergyBackendError(f"no RAPL package zone under {root} (not an Intel/AMD host?)")
        self._counters: list[tuple[Path, int]] = []
        for zone in zones:
            try:
                max_range_uj = int((zone / "max_energy_range_uj").read_text())
                int((zone / "energy_uj").read_text())
            except PermissionError as err:
                raise EnergyBackendError(
                    f"RAPL counter {zone / 'energy_uj'} is not readable; run "
                    "`sudo chmod a+r /sys/class/powercap/intel-rapl:*/energy_uj` or use the "
                    "CPU-time estimate (energy='estimate')"
                ) from err
            except (OSError, ValueError) as err:
                raise EnergyBackendError(f"cannot read RAPL zone {zone}: {err}") from err
            self._counters.append((zone / "energy_uj", max_range_uj))
        self.note = f"RAPL package counters ({len(zones)} zone(s)), whole package incl. other work"

    def _read_uj(self) -> list[int]:
        return [int(path.read_text()) for path, _ in self._counters]

    def begin(self) -> object:
        """Return the counter readings in microjoules."""
        return self._read_uj()

    def end(self, token: object) -> float | None:
        """Return the energy since ``token`` in millijoules, correcting one wrap per zone."""
        total_uj = 0
        for start_uj, now_uj, (_, max_range_uj) in zip(
            token, self._read_uj(), self._counters, strict=True  # type: ignore[arg-type]
        ):
            delta_uj = now_uj - start_uj
            if delta_uj < 0:  # the counter wrapped at max_energy_range_uj
                delta_uj += max_range_uj
            total_uj += delta_uj
        return total_uj / 1e3


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

    Raises MissingDependencyError without ``pynvml``, EnergyBackendError when NVML cannot be
    initialised or has no such device."""
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
    (seconds; NVML refreshes power every ~20-100 ms) while at least one window is open; both
    window ends take a sample of their own.
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

    Raises MissingDependencyError without ``pynvml``, EnergyBackendError when NVML cannot be
    initialised, has no such device, or reads no power at all."""
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


ENERGY_CHOICES = ("auto", "nvml", "rapl", "estimate", "none")


def select_energy_backend(
    device: str | torch.device,
    energy: str = "auto",
    *,
    watts_per_core: float = DEFAULT_WATTS_PER_CORE,
    rapl_root: Path = RAPL_ROOT,
) -> EnergyBackend:
    """Return the energy backend for ``device``.

    With ``energy="auto"`` a CUDA device gets NVML (total-energy counter, else power sampling)
    and falls back to the :class:`NullEnergyBackend` when NVML is missing; a CPU gets RAPL
    when readable, else :class:`CpuTimeEstimateBackend`. An explicit choice that cannot be
    honoured raises instead of falling back (the Zeus habit).

    ``device`` is ``"cpu"`` or ``"cuda:N"``; ``watts_per_core`` is the CPU-time estimate's power
    per busy core; ``rapl_root`` the powercap directory (tests use a fake tree). The backend's
    ``method`` labels every figure; its ``note`` says what is measured.

    Raises
    ------
    ConfigError
        ``energy`` is not a known choice, or asks for NVML on a CPU device.
    EnergyBackendError, MissingDependencyError
        An explicitly requested source cannot be opened.

    Examples
    --------
    >>> select_energy_backend("cpu", "estimate", watts_per_core=3.0).method
    'estimate_cpu_time'
    >>> select_energy_backend("cpu", "none").method
    'unavailable'
    """
    if energy not in ENERGY_CHOICES:
        raise ConfigError(f"energy must be one of {ENERGY_CHOICES}, got {energy=}")
    dev = torch.device(device)
    if energy == "none":
        return NullEnergyBackend("disabled (energy='none')")
    if energy == "estimate":
        return CpuTimeEstimateBackend(watts_per_core)
    if dev.type == "cuda":
        if energy == "rapl":
            raise ConfigError(f"energy='rapl' measures the CPU package, not {dev}; use 'nvml'")
        try:
            return nvml_backend(dev.index or 0)
        except (EnergyBackendError, MissingDependencyError) as err:
            if energy == "nvml":
                raise
            return NullEnergyBackend(f"NVML unavailable on {dev}: {err}")
    if energy == "nvml":
        raise ConfigError(f"energy='nvml' needs a CUDA device, got {dev}")
    try:
        return RaplBackend(rapl_root)
    except EnergyBackendError as err:
        if energy == "rapl":
            raise
        backend = CpuTimeEstimateBackend(watts_per_core)
        backend.note += f" (RAPL unavailable: {err})"
        return backend
