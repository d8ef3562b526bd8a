"""Device fingerprint: what was measured, with which software."""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

from compressm_tune.errors import MissingDependencyError
from compressm_tune.hardware._energy_base import EnergyBackendError
from compressm_tune.hardware._nvml import nvml_device_info

__all__ = ["DeviceFingerprint", "fingerprint"]

_MB = 2**20


@dataclass(frozen=True)
class DeviceFingerprint:
    """The machine and software a profile was measured on.

    Attributes
    ----------
    device : str
        The profiled torch device, ``"cpu"`` or ``"cuda:N"``.
    cpu_model : str
        CPU model name.
    cpu_physical_cores, cpu_logical_cores : int
        Core counts of the machine (not of the process's affinity mask).
    memory_total_mb : float
        Host memory in MiB.
    gpu_name, gpu_driver, cuda_version : str or None
        GPU model, driver and CUDA runtime; ``None`` on a CPU profile.
    gpu_memory_mb : float or None
        GPU memory in MiB; ``None`` on a CPU profile.
    torch_version, numpy_version, python_version, platform : str
        Software versions and OS.
    onnxruntime_version : str or None
        ``None`` when onnxruntime is not installed.
    torch_threads, torch_interop_threads : int
        Intra-op and inter-op thread counts during the measurement.
    """

    device: str
    cpu_model: str
    cpu_physical_cores: int
    cpu_logical_cores: int
    memory_total_mb: float
    gpu_name: str | None
    gpu_driver: str | None
    gpu_memory_mb: float | None
    cuda_version: str | None
    torch_version: str
    onnxruntime_version: str | None
    numpy_version: str
    python_version: str
    platform: str
    torch_threads: int
    torch_interop_threads: int

    @property
    def slug(self) -> str:
        """File-name-safe device name, e.g. ``"cpu-amd-epyc-2c"`` or ``"cuda-nvidia-h100"``.

        Examples
        --------
        >>> fp = fingerprint("cpu")
        >>> fp.slug.startswith("cpu-") and fp.slug.endswith(f"-{fp.cpu_logical_cores}c")
        True
        """
        if self.gpu_name:
            name, suffix = self.gpu_name, ""
        else:
            name, suffix = self.cpu_model, f"-{self.cpu_logical_cores}c"
        name = re.sub(r"\(r\)|\(tm\)|\bcpu\b|@.*$|\bprocessor\b", " ", name.lower())
        name = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"
        return f"{torch.device(self.device).type}-{name}{suffix}"

    @property
    def label(self) -> str:
        """Short human-readable name for tables and plots."""
        if self.gpu_name:
            return self.gpu_name
        return f"{self.cpu_model} ({self.torch_threads} thr)"


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _onnxruntime_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def _gpu_info(device: torch.device) -> dict[str, object]:
    """GPU name, driver and memory: NVML when it answers, else torch's device properties."""
    index = device.index or 0
    try:
        return nvml_device_info(index)
    except (EnergyBackendError, MissingDependencyError):
        props = torch.cuda.get_device_properties(index)
        return {"gpu_name": props.name, "gpu_driver": None,
                "gpu_memory_mb": props.total_memory / _MB}


def fingerprint(device: str | torch.device = "cpu") -> DeviceFingerprint:
    """Describe this machine for ``device`` with torch's current thread settings.

    Parameters
    ----------
    device : str or torch.device
        ``"cpu"`` or ``"cuda:N"`` (must exist).

    Returns
    -------
    DeviceFingerprint

    Examples
    --------
    >>> fingerprint("cpu").gpu_name is None
    True
    """
    dev = torch.device(device)
    gpu: dict[str, object] = {"gpu_name": None, "gpu_driver": None, "gpu_memory_mb": None}
    if dev.type == "cuda":
        gpu = _gpu_info(dev)
    return DeviceFingerprint(
        device=str(dev),
        cpu_model=_cpu_model(),
        cpu_physical_cores=psutil.cpu_count(logical=False) or 1,
        cpu_logical_cores=psutil.cpu_count(logical=True) or 1,
        memory_total_mb=psutil.virtual_memory().total / _MB,
        gpu_name=gpu["gpu_name"],  # type: ignore[arg-type]
        gpu_driver=gpu["gpu_driver"],  # type: ignore[arg-type]
        gpu_memory_mb=gpu["gpu_memory_mb"],  # type: ignore[arg-type]
        cuda_version=torch.version.cuda if dev.type == "cuda" else None,
        torch_version=torch.__version__,
        onnxruntime_version=_onnxruntime_version(),
        numpy_version=np.__version__,
        python_version=platform.python_version(),
        platform=platform.platform(),
        torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
    )
