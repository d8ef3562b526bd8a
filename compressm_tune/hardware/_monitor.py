"""Named measurement windows (the Zeus ``begin_window`` / ``end_window`` pattern)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from compressm_tune.hardware._energy_base import EnergyBackend, NullEnergyBackend

__all__ = ["Measurement", "MeasurementMonitor", "synchronize"]


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
                "raise min_time_s (--min-time-s) to lengthen it",
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
