"""Where training runs and in which arithmetic: ``--device`` and ``--precision``.

Export, latency measurement and the reducer's float64 Gramian algebra stay where they are (the
deployment runtime, the CPU); only training and evaluation move. Three precisions:

* ``fp32``: float32 everywhere (matrix products too: what CPUs do, and torch's CUDA default);
* ``tf32``: float32 tensors, matrix products on the tensor cores' TF32 mode (CUDA only; this is
  also what JAX uses by default for float32 products on Ampere and newer GPUs);
* ``bf16``: autocast the projections to bfloat16; the scans, norms and the loss stay float32
  (the scan kernels upcast their inputs and accumulate in float32).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

from compressm_tune.errors import ConfigError

__all__ = ["PRECISIONS", "autocast", "check_device_spec", "check_precision", "matmul_precision",
           "module_device", "resolve_device"]

PRECISIONS = ("fp32", "tf32", "bf16")
_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_spec(spec: str) -> str:
    """Return ``spec`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; else ConfigError."""
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return spec


def resolve_device(spec: str) -> torch.device:
    """The torch device for ``spec`` (``auto``: the first CUDA device if any, else CPU).

    Raises ConfigError in one line when a CUDA device is asked for and is not there.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    check_device_spec(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise ConfigError(f"--device {spec}: {why} (torch {torch.__version__}); "
                              "use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {spec}: only {count} CUDA device(s) "
                              f"(cuda:0..cuda:{count - 1})")
    return device


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module``'s parameters live (CPU for a module without any)."""
    return next(module.parameters(), torch.empty(0)).device


def check_precision(precision: str, device: torch.device | None = None) -> str:
    """Return ``precision`` if it is known (and ``tf32`` only with a CUDA device)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, "
                          f"got {precision!r}")
    if precision == "tf32" and device is not None and device.type != "cuda":
        raise ConfigError("--precision tf32 needs a CUDA device (TF32 is a tensor-core mode)")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context of a forward pass: bfloat16 autocast for ``bf16``, nothing otherwise.
    (Backward passes run outside it, in the dtypes the forward recorded.)"""
    if precision == "bf16":
        # no cast cache: it must not outlive a CUDA graph capture, and weights are cast once
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """TF32 float32 matrix products for ``tf32`` inside the context (forward and backward:
    torch reads the setting at each product), restored afterwards."""
    if precision != "tf32":
        yield
        return
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)
