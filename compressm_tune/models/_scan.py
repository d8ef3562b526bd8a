"""Diagonal complex linear recurrence ``x_t = lam * x_{t-1} + v_t`` with a fused backward.

Complex numbers are stored as real tensors with a trailing dimension of 2 (re, im), so the
same code path exports to ONNX and TorchScript without complex dtypes.

Three implementations compute the same scan:

* the C kernel (``_scan_kernel``, built at install time, CPU float32): a sequential loop over
  time, vectorized over the state and parallel over the batch;
* the Triton kernel (:mod:`._triton`, CUDA float32): chunks of time scanned associatively in
  registers, one launch per direction;
* a pure-PyTorch chunked scan (any device/dtype; the fallback): within a chunk of ``T`` steps a
  ``lam^(t-s)`` Toeplitz product, across chunks a short sequential carry.

All sit behind one ``autograd.Function`` whose backward is the same recurrence run in reverse
with ``conj(lam)``, so the backward never stores per-step intermediates beyond ``x`` itself.
:func:`scan_reference` is the plain Python loop the tests compare against.
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable

from compressm_tune.models import _triton

try:  # the fused kernel is optional: without a C compiler we fall back to the chunked scan
    from compressm_tune.models import _scan_kernel
except ImportError:  # pragma: no cover - exercised only on installs without a compiler
    _scan_kernel = None

__all__ = ["BACKENDS", "linear_scan", "scan_reference", "kernel_available", "scan_backend",
           "torch_scans"]
_FORCE_TORCH = False  # set inside torch_scans()

BACKENDS = ("c", "triton", "torch")

_CHUNK = 64  # chunk length of the torch scan: T*T*N Toeplitz work vs L/T sequential carries


def kernel_available() -> bool:
    """Whether the compiled C scan kernel was built and imported."""
    return _scan_kernel is not None


@contextlib.contextmanager
def torch_scans():
    """Within the block every scan (LRU and selective) takes the pure-PyTorch path, not the C
    or Triton kernels: the reference the kernels are timed and checked against."""
    global _FORCE_TORCH
    old, _FORCE_TORCH = _FORCE_TORCH, True
    try:
        yield
    finally:
        _FORCE_TORCH = old


def torch_forced() -> bool:
    return _FORCE_TORCH


def scan_backend(lam: torch.Tensor, v: torch.Tensor) -> str:
    """Which implementation :func:`linear_scan` picks for these tensors: ``c`` on CPU float32
    with the kernel built, ``triton`` on CUDA float32, else ``torch``."""
    if _FORCE_TORCH:
        return "torch"
    fp32 = v.dtype == torch.float32 and lam.dtype == torch.float32
    if fp32 and v.device.type == "cpu" and _scan_kernel is not None:
        return "c"
    if fp32 and v.device.type == "cuda" and _triton.available():
        return "triton"
    return "torch"


def _scan_c(lam: torch.Tensor, v: torch.Tensor, x0: torch.Tensor | None, reverse: bool):
    lam = lam.contiguous()  # (N, 2)
    v = v.contiguous()  # (B, L, N, 2)
    x = torch.empty_like(v)  # (B, L, N, 2)
    batch, length, n = v.shape[0], v.shape[1], v.shape[2]
    x0_ptr = 0
    if x0 is not None:
        x0 = x0.contiguous()  # (B, N, 2)
        x0_ptr = x0.data_ptr()
    _scan_kernel.scan(
        lam.data_ptr(), v.data_ptr(), x.data_ptr(), x0_ptr,
        batch, length, n, int(reverse), torch.get_num_threads(),
    )
    return x


def _scan_torch(lam: torch.Tensor, v: torch.Tensor, x0: torch.Tensor | None, reverse: bool):
    lam_c = torch.view_as_complex(lam.contiguous())  # (N,)
    v_c = torch.view_as_complex(v.contiguous())  # (B, L, N)
    if reverse:
        v_c = v_c.flip(1)
    batch, length, n = v_c.shape
    t = min(_CHUNK, length)
    n_chunks = -(-length // t)
    v_c = torch.nn.functional.pad(v_c, (0, 0, 0, n_chunks * t - length))  # (B, C*T, N)
    v_c = v_c.view(batch, n_chunks, t, n)  # (B, C, T, N)
    k = torch.arange(t, device=v.device)
    ones = torch.ones(1, n, dtype=lam_c.dtype, device=v.device)  # (1, N)
    # lam^k by repeated products, not exp(k log lam): exact for a pole at 0 (log 0 = -inf)
    powers = torch.cat((ones, torch.cumprod(lam_c.expand(t - 1, n), dim=0)))  # (T, N)
    lag = k[:, None] - k[None, :]  # (T, T)  t - s
    toeplitz = powers[lag.clamp(min=0)] * (lag >= 0)[..., None]  # (T, T, N)
    local = torch.einsum("tsn,bcsn->bctn", toeplitz, v_c)  # (B, C, T, N)
    carry_gain = powers * lam_c  # (T, N)  lam^(t+1)
    carry = torch.zeros(batch, n, dtype=v_c.dtype, device=v.device) if x0 is None else (
        torch.view_as_complex(x0.contiguous())
    )  # (B, N)
    chunks = []
    for c in range(n_chunks):
        xc = local[:, c] + carry_gain * carry[:, None, :]  # (B, T, N)
        chunks.append(xc)
        carry = xc[:, -1]
    x_c = torch.cat(chunks, dim=1)[:, :length]  # (B, L, N)
    if reverse:
        x_c = x_c.flip(1)
    return torch.view_as_real(x_c.contiguous()).contiguous()  # (B, L, N, 2)


def _scan(lam: torch.Tensor, v: torch.Tensor, x0: torch.Tensor | None, reverse: bool,
          backend: str):
    if backend == "c":
        return _scan_c(lam, v, x0, reverse)
    if backend == "triton":
        return _triton.lru_scan(lam, v, x0, reverse)
    return _scan_torch(lam, v, x0, reverse)


def _conj(z: torch.Tensor) -> torch.Tensor:
    return torch.stack((z[..., 0], -z[..., 1]), dim=-1)


class _LinearScan(torch.autograd.Function):
    """x = scan(lam, v, x0); gradients follow PyTorch's convention for complex numbers
    (d loss/d re + i d loss/d im), under which y = a*z back-propagates conj(a) * grad_y."""

    @staticmethod
    def forward(ctx, lam, v, x0, backend):
        x = _scan(lam, v, x0, reverse=False, backend=backend)
        ctx.save_for_backward(lam, x, x0)
        ctx.backend = backend
        return x

    @staticmethod
    @once_differentiable  # the C kernel works on raw pointers: no graph for a 2nd derivative
    def backward(ctx, grad_x):
        lam, x, x0 = ctx.saved_tensors
        g = _scan(_conj(lam), grad_x.contiguous(), None, reverse=True,
                  backend=ctx.backend)  # (B, L, N, 2) dL/dx_t total
        g_c = torch.view_as_complex(g)  # (B, L, N)
        x_c = torch.view_as_complex(x)  # (B, L, N)
        grad_lam = (x_c[:, :-1].conj() * g_c[:, 1:]).sum((0, 1))  # (N,)
        grad_x0 = None
        if x0 is not None:
            x0_c = torch.view_as_complex(x0.contiguous())  # (B, N)
            grad_lam = grad_lam + (x0_c.conj() * g_c[:, 0]).sum(0)
            if ctx.needs_input_grad[2]:
                lam_c = torch.view_as_complex(lam.contiguous())  # (N,)
                grad_x0 = torch.view_as_real(lam_c.conj() * g_c[:, 0])  # (B, N, 2)
        return torch.view_as_real(grad_lam), g, grad_x0, None


def linear_scan(lam: torch.Tensor, v: torch.Tensor, x0: torch.Tensor | None = None,
                backend: str | None = None):
    """Run ``x_t = lam * x_{t-1} + v_t`` over a batch of sequences.

    Parameters
    ----------
    lam : torch.Tensor
        ``(N, 2)`` real: the diagonal of A as (re, im) pairs, ``|lam| < 1``.
    v : torch.Tensor
        ``(B, L, N, 2)`` real: the driven input ``B u_t`` per step.
    x0 : torch.Tensor, optional
        ``(B, N, 2)`` initial state (``x_{-1}``); zero when omitted.
    backend : {"c", "triton", "torch"}, optional
        Force an implementation (tests, benchmarks); default :func:`scan_backend`'s choice.

    Returns
    -------
    torch.Tensor
        ``(B, L, N, 2)`` states ``x_0 .. x_{L-1}``; differentiable in ``lam``, ``v`` and ``x0``.

    Examples
    --------
    >>> lam = torch.tensor([[0.5, 0.0]])
    >>> v = torch.ones(1, 3, 1, 2)
    >>> linear_scan(lam, v)[0, :, 0, 0].tolist()
    [1.0, 1.5, 1.75]
    """
    if backend is None:
        backend = scan_backend(lam, v)
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return _LinearScan.apply(lam, v, x0, backend)


def scan_reference(lam: torch.Tensor, v: torch.Tensor, x0: torch.Tensor | None = None):
    """The plain time loop that :func:`linear_scan` must match (for tests, not for speed)."""
    lam_c = torch.view_as_complex(lam.contiguous())  # (N,)
    v_c = torch.view_as_complex(v.contiguous())  # (B, L, N)
    state = torch.zeros_like(v_c[:, 0]) if x0 is None else torch.view_as_complex(x0.contiguous())
    out = []
    for t in range(v_c.shape[1]):
        state = lam_c * state + v_c[:, t]  # (B, N)
        out.append(state)
    return torch.view_as_real(torch.stack(out, dim=1))  # (B, L, N, 2)
