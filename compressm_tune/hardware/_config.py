"""What a profile measures and where: the run's settings (:class:`ProfilerConfig`) and the
device's fingerprint (:class:`DeviceFingerprint`: hardware and software versions)."""

from __future__ import annotations

import math
import platform
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import psutil
import torch

from compressm_tune.errors import ConfigError, EnergyBackendError, MissingDependencyError
from compressm_tune.hardware._energy import (
    DEFAULT_WATTS_PER_CORE,
    ENERGY_CHOICES,
    nvml_device_info,
)
from compressm_tune.models import ARCHS

__all__ = [
    "DeviceFingerprint", "ProfilerConfig", "RUNTIMES", "fingerprint", "parse_block_counts",
    "parse_widths",
]


RUNTIMES = ("torch", "torchscript", "onnxruntime")


@dataclass(frozen=True)
class ProfilerConfig:
    """What :func:`profile_device` measures and how long it spends.

    The defaults (8 widths x 3 block counts) finish in about four minutes on 2 CPU cores.

    Examples
    --------
    >>> ProfilerConfig(widths=(8, 4)).widths
    (4, 8)
    >>> ProfilerConfig(blocks=0)
    Traceback (most recent call last):
    ...
    compressm_tune.errors.ConfigError: blocks must be an integer >= 1, got blocks=0
    """

    device: str = field(default="auto", metadata={
        "help": "'auto' (cuda:0 if present, else cpu), 'cpu' or 'cuda:N'"})
    runtime: str = field(default="torch", metadata={  # training steps always run in eager torch
        "choices": RUNTIMES, "help": "inference runtime"})
    arch: str = field(default="lru", metadata={
        "choices": ARCHS, "help": "SSM layer of the measured models"})
    widths: tuple[int, ...] = field(default=(4, 8, 16, 32, 64, 128, 256, 512), metadata={
        "help": "state widths: '4,8,16' or 'a,b,...,c'"})
    hidden: int = field(default=64, metadata={"help": "H, residual width of every block"})
    blocks: int = field(default=2, metadata={"help": "K, equal-width blocks per measured model"})
    # Other block counts also measured at every width, so that fixed and per-block cost are
    # fitted across block counts; None: 1 and 2*K (the range of models the search builds)
    extra_blocks: tuple[int, ...] | None = field(default=None, metadata={
        "help": "other block counts also measured at every width, to separate fixed from "
                "per-block cost: '1,4' (default: 1 and 2K)"})
    seq_len: int = field(default=256, metadata={"help": "L, tokens per sequence"})
    batch: int = field(default=16, metadata={"help": "training-step batch"})
    throughput_batch: int = field(default=32, metadata={
        "help": "batch of the throughput measurement"})
    threads: int | None = field(default=None, metadata={
        "help": "intra-op threads (default: 1 on a CPU, one per physical core on a GPU host)"})
    min_time_s: float = field(default=0.5, metadata={
        "help": "each timing repeats until this many seconds of work"})
    warmup: int = field(default=3, metadata={"help": "untimed calls before each timing"})
    min_repeats: int = field(default=5, metadata={"help": "timed calls at least"})
    # interleaved passes over all models, so load drift hits every model alike; many short
    # passes average drift out better than a few long ones (each model's median then pools
    # ~30 independent stretches of the machine's state)
    rounds: int = field(default=30, metadata={
        "help": "interleaved timing passes over all widths"})
    energy: str = field(default="auto", metadata={
        "choices": ENERGY_CHOICES,
        "help": "energy source; an explicit choice that is unavailable is an error"})
    watts_per_core: float = field(default=DEFAULT_WATTS_PER_CORE, metadata={
        "help": "W per busy core for the CPU-time estimate"})
    d_input: int = field(default=1, metadata={"cli": False})  # input channels (MNIST-like)
    d_output: int = field(default=10, metadata={"cli": False})  # classes
    seed: int = field(default=0, metadata={"help": "torch seed for weights and inputs"})

    def __post_init__(self) -> None:
        widths = tuple(sorted({int(w) for w in self.widths}))
        object.__setattr__(self, "widths", widths)
        if len(widths) < 2 or widths[0] < 1:
            raise ConfigError(f"widths must hold at least two distinct widths >= 1, got {widths}")
        for name in ("hidden", "blocks", "seq_len", "batch", "throughput_batch", "min_repeats",
                     "rounds", "d_input", "d_output"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {name}={value!r}")
        if self.extra_blocks is not None:
            extra = tuple(sorted(set(self.extra_blocks)))
            object.__setattr__(self, "extra_blocks", extra)
            if (not extra or any(isinstance(k, bool) or not isinstance(k, int) or k < 1
                                 for k in extra) or self.blocks in extra):
                raise ConfigError(
                    "extra_blocks must list at least one block count >= 1 other than blocks, "
                    f"got extra_blocks={self.extra_blocks!r} with blocks={self.blocks!r}"
                )
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {ARCHS}, got arch={self.arch!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"threads must be None or an integer >= 1, got {self.threads=}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"warmup must be an integer >= 0, got {self.warmup=}")
        if not 0 <= self.min_time_s < math.inf:  # inf: a timing that never ends
            raise ConfigError(f"min_time_s must be >= 0 and finite, got {self.min_time_s=}")
        if not 0 < self.watts_per_core < math.inf:
            raise ConfigError(f"watts_per_core must be > 0 and finite, got "
                              f"{self.watts_per_core=}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {RUNTIMES}, got {self.runtime=}")
        if self.energy not in ENERGY_CHOICES:
            raise ConfigError(f"energy must be one of {ENERGY_CHOICES}, got {self.energy=}")
        if self.device != "auto":
            try:
                dev = torch.device(self.device)
            except RuntimeError as err:
                raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda:N', got "
                                  f"{self.device=}") from err
            if dev.type not in ("cpu", "cuda"):
                raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda:N', got {self.device=}")

    @property
    def block_counts(self) -> tuple[int, ...]:
        """``blocks`` followed by the extra block counts (``extra_blocks``, else 1 and 2K).

        Examples
        --------
        >>> ProfilerConfig(blocks=2).block_counts
        (2, 1, 4)
        >>> ProfilerConfig(blocks=1, extra_blocks=(3,)).block_counts
        (1, 3)
        """
        extra = self.extra_blocks
        if extra is None:
            extra = tuple(k for k in (1, 2 * self.blocks) if k != self.blocks)
        return (self.blocks, *extra)

    def resolved(self) -> ProfilerConfig:
        """Return a copy with ``device``, ``threads`` and ``extra_blocks`` made concrete.

        Raises
        ------
        ConfigError
            A CUDA device was requested but torch sees no such device.
        """
        device = self.device
        if device == "auto":
            device = "cuda:0" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda":
            index = dev.index or 0
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                raise ConfigError(
                    f"device {device!r} requested but torch sees "
                    f"{torch.cuda.device_count()} CUDA device(s); use device='cpu'"
                )
            device = f"cuda:{index}"
        # one thread on a CPU unless asked: batch-1 deployment runs on one core, and more
        # threads on a shared machine time the other processes as much as the model
        threads = self.threads or (1 if device == "cpu" else psutil.cpu_count(logical=False)
                                   or 1)
        return replace(self, device=device, threads=threads, extra_blocks=self.block_counts[1:])


def parse_widths(text: str) -> tuple[int, ...]:
    """Parse a width list: ``"4,8,16"``, or ``"a,b,...,c"``, a progression.

    ``a,b,...,c`` doubles (or multiplies by ``b/a``) when ``b`` is a multiple of ``a`` and that
    progression reaches ``c`` exactly, else steps by ``b - a``.

    Examples
    --------
    >>> parse_widths("4,8,...,64")
    (4, 8, 16, 32, 64)
    >>> parse_widths("8,16,...,40")
    (8, 16, 24, 32, 40)
    >>> parse_widths("3,2, 5")
    (3, 2, 5)
    """
    tokens = [t.strip() for t in text.split(",")]
    try:
        if "..." not in tokens:
            return tuple(int(t) for t in tokens)
        if len(tokens) != 4 or tokens[2] != "...":
            raise ValueError
        a, b, c = int(tokens[0]), int(tokens[1]), int(tokens[3])
    except ValueError as err:
        raise ConfigError(
            f"widths must be integers separated by commas, or 'a,b,...,c', got {text!r}"
        ) from err
    if not 0 < a < b <= c:
        raise ConfigError(f"'a,b,...,c' needs 0 < a < b <= c, got {text!r}")
    if b % a == 0:
        ratio, widths = b // a, [a]
        while widths[-1] < c:
            widths.append(widths[-1] * ratio)
        if widths[-1] == c:
            return tuple(widths)
    if (c - a) % (b - a) == 0:
        return tuple(range(a, c + 1, b - a))
    raise ConfigError(f"'a,b,...,c' must reach c exactly by doubling or stepping, got {text!r}")


def parse_block_counts(text: str) -> tuple[int, ...]:
    """Parse a comma-separated list of block counts, e.g. ``"1,4"``.

    Examples
    --------
    >>> parse_block_counts("1, 4")
    (1, 4)
    """
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as err:
        raise ConfigError(f"block counts must be integers separated by commas, got {text!r}"
                          ) from err


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
