"""Choose the energy backend for a device (GPU: NVML; CPU: RAPL, else the CPU-time estimate)."""

from __future__ import annotations

from pathlib import Path

import torch

from compressm_tune.errors import ConfigError, MissingDependencyError
from compressm_tune.hardware._energy_base import (
    DEFAULT_WATTS_PER_CORE,
    CpuTimeEstimateBackend,
    EnergyBackend,
    EnergyBackendError,
    NullEnergyBackend,
)
from compressm_tune.hardware._nvml import nvml_backend
from compressm_tune.hardware._rapl import RAPL_ROOT, RaplBackend

__all__ = ["ENERGY_CHOICES", "select_energy_backend"]

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

    Parameters
    ----------
    device : str or torch.device
        ``"cpu"`` or ``"cuda:N"``.
    energy : {"auto", "nvml", "rapl", "estimate", "none"}
        Which source to use.
    watts_per_core : float
        Power per busy core for the CPU-time estimate, in watts.
    rapl_root : pathlib.Path
        The powercap directory (tests use a fake tree).

    Returns
    -------
    EnergyBackend
        Its ``method`` labels every figure; its ``note`` says what is measured.

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
