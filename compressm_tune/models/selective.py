"""Selective (Mamba-style S6) SSM layer: input-dependent step size, B and C; diagonal real A.

Per channel ``h`` (H of them) and state index ``n`` (N of them, shared by all channels)::

    delta_t = softplus(W_up W_down u_t + dt_bias)          (H,)   step size, input-dependent
    B_t     = W_B u_t,   C_t = W_C u_t                     (N,)   input-dependent
    A       = -exp(A_log)                                  (H, N) diagonal, real, negative
    x_t     = exp(delta_t A) * x_{t-1} + (delta_t u_t) B_t (H, N)  zero-order hold, as Mamba
    y_t     = x_t C_t + D * u_t                            (H,)

This is the S6 layer of the Mamba paper (Algorithm 2) without Mamba's block around it (input
expansion, short convolution, SiLU gate): it slots into the same residual block as the LRU
(norm -> SSM -> GELU -> GLU -> residual), so every other part of the toolchain treats both
layers alike and a comparison between them isolates the recurrence. The reference path is
plain PyTorch, so it runs and exports anywhere; on CPU float32 ``forward`` uses the optional C
kernel (``selective_fwd`` / ``selective_bwd`` in ``_scan_kernel.c``, built at install time like
the LRU scan), which fuses the scan with its read-out so that no ``(B, L, H, N)`` tensor is
formed: the eager path materializes four of them and spends its time moving them through memory.

Because ``A`` is diagonal and every state index has its own column of ``W_B``/``W_C``, removing
a state is slicing index ``n`` out of ``A_log``, ``W_B`` and ``W_C``: the surviving states keep
their basis (see :mod:`compressm_tune.reduction._selective` for how indices are ranked).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from compressm_tune.errors import ConfigError
from compressm_tune.models import _triton
from compressm_tune.models._scan import torch_forced

try:  # the fused kernel is optional: without a C compiler the torch path below is used
    from compressm_tune.models import _scan_kernel
except ImportError:  # pragma: no cover - exercised only on installs without a compiler
    _scan_kernel = None
if _scan_kernel is not None and not hasattr(_scan_kernel, "selective_importance"):
    _scan_kernel = None  # pragma: no cover - an extension built before the selective kernel

__all__ = ["SelectiveLayer", "discretize", "keep_state_indices", "scan_readout", "selective_scan",
           "selective_scan_reference"]

_CHUNK = 8  # time steps per chunk: log2(T) doubling passes vs L/T sequential carries


def _scan(a: torch.Tensor, b: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """``x_t = a_t * x_{t-1} + b_t`` along dim 1 (``x_{-1} = 0``), or backwards in time.

    Chunked: inside each chunk of ``_CHUNK`` steps an associative (Hillis-Steele) scan runs on
    all chunks at once; a short sequential pass then carries each chunk's last state into the
    next. Only products of decays (each in (0, 1]) are formed, so nothing can overflow.
    """
    if reverse:
        return _scan(a.flip(1), b.flip(1)).flip(1)
    batch, length = a.shape[:2]
    rest = a.shape[2:]
    chunk = min(_CHUNK, length)
    pad = -length % chunk
    if pad:
        a = torch.cat((a, a.new_ones(batch, pad, *rest)), 1)
        b = torch.cat((b, b.new_zeros(batch, pad, *rest)), 1)
    n_chunks = a.shape[1] // chunk
    decay = a.reshape(batch, n_chunks, chunk, *rest).clone()  # (B, C, T, ...)
    x = b.reshape(batch, n_chunks, chunk, *rest).clone()  # (B, C, T, ...)
    step = 1
    while step < chunk:  # after the pass with `step`, x[t] sums b[t-2*step+1 .. t]
        x[:, :, step:] = decay[:, :, step:] * x[:, :, :-step] + x[:, :, step:]
        decay[:, :, step:] = decay[:, :, step:] * decay[:, :, :-step]
        step *= 2
    for c in range(1, n_chunks):  # carry: chunk c starts from the last state of chunk c-1
        x[:, c] += decay[:, c] * x[:, c - 1, -1:]
    return x.reshape(batch, n_chunks * chunk, *rest)[:, :length]


class _SelectiveScan(torch.autograd.Function):
    """Time-varying scan whose backward is the same scan run in reverse.

    With ``r_t = dL/dx_t`` accumulated through the recurrence, ``r_t = g_t + a_{t+1} r_{t+1}``;
    then ``dL/db_t = r_t`` and ``dL/da_t = r_t * x_{t-1}``. Only ``a`` and ``x`` are saved.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = _scan(a, b)
        ctx.save_for_backward(a, x)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, x = ctx.saved_tensors
        a_next = torch.cat((a[:, 1:], torch.zeros_like(a[:, :1])), 1)  # a_{t+1}, 0 past the end
        r = _scan(a_next, grad.contiguous(), reverse=True)  # (B, L, ...)
        x_prev = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), 1)  # x_{t-1}
        return r * x_prev, r


def selective_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x_t = a_t * x_{t-1} + b_t`` over dim 1 of ``(batch, L, ...)`` tensors, from zero.

    Examples
    --------
    >>> a, b = torch.full((1, 3, 1), 0.5), torch.ones(1, 3, 1)
    >>> selective_scan(a, b).flatten().tolist()
    [1.0, 1.5, 1.75]
    """
    return _SelectiveScan.apply(a, b)


def selective_scan_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The plain time loop (differentiable through autograd); the tests' reference."""
    x, out = torch.zeros_like(b[:, 0]), []
    for t in range(b.shape[1]):
        x = a[:, t] * x + b[:, t]
        out.append(x)
    return torch.stack(out, 1)


def fused_backend(state_dim: int, *tensors: torch.Tensor) -> str | None:
    """Which fused kernel takes these tensors: ``c`` (CPU, the C kernel built) or ``triton``
    (CUDA, state width within one register tile), else None (the torch path). Both compute in
    float32 (lower precisions, as autocast makes them, are upcast); float64 stays on the torch
    path for its precision. TorchScript and tracing cannot see into either kernel."""
    if torch_forced() or torch.jit.is_scripting() or torch.jit.is_tracing() or any(
            t.dtype not in (torch.float32, torch.bfloat16, torch.float16) for t in tensors):
        return None
    device = tensors[0].device.type
    if any(t.device.type != device for t in tensors):
        return None
    if device == "cpu" and _scan_kernel is not None:
        return "c"
    if device == "cuda" and _triton.selective_supported(state_dim):
        return "triton"
    return None


def _kernel_threads(batch: int) -> int:
    """OpenMP threads for the kernel: torch's setting, but no more than there are sequences
    (the kernel is parallel over the batch only)."""
    return max(1, min(torch.get_num_threads(), batch))


def _c_forward(delta, A, Bt, Ct, u) -> torch.Tensor:
    batch, length, h = u.shape
    n = A.shape[1]
    threads = _kernel_threads(batch)
    y = torch.empty_like(u)  # (B, L, H)
    work = A.new_empty(threads, n)  # one state row per thread
    _scan_kernel.selective_fwd(
        delta.data_ptr(), A.data_ptr(), Bt.data_ptr(), Ct.data_ptr(), u.data_ptr(),
        y.data_ptr(), work.data_ptr(), batch, length, h, n, threads,
    )
    return y


def _c_backward(delta, A, Bt, Ct, u, grad_y):
    batch, length, h = u.shape
    n = A.shape[1]
    threads = _kernel_threads(batch)
    grad_delta = torch.empty_like(delta)  # (B, L, H) written by the kernel
    grad_u = torch.empty_like(u)  # (B, L, H) written by the kernel
    grad_B = torch.zeros_like(Bt)  # (B, L, N) accumulated over channels
    grad_C = torch.zeros_like(Ct)  # (B, L, N) accumulated over channels
    grad_A_parts = A.new_zeros(threads, h, n)  # one accumulator per thread, summed below
    work = A.new_empty(threads, 2 * length * n + 2 * n)  # recomputed x and a of one channel
    _scan_kernel.selective_bwd(
        delta.data_ptr(), A.data_ptr(), Bt.data_ptr(), Ct.data_ptr(), u.data_ptr(),
        grad_y.data_ptr(), grad_delta.data_ptr(), grad_A_parts.data_ptr(),
        grad_B.data_ptr(), grad_C.data_ptr(), grad_u.data_ptr(), work.data_ptr(),
        batch, length, h, n, threads,
    )
    return grad_delta, grad_A_parts.sum(0), grad_B, grad_C, grad_u


class _FusedSelectiveScan(torch.autograd.Function):
    """``y_t[h] = sum_n x_t[h, n] C_t[n]`` with ``x_t = exp(delta_t A) x_{t-1} + delta_t u_t B_t``,
    computed by a fused kernel without storing any ``(B, L, H, N)`` tensor.

    Inputs: ``delta (B, L, H)`` (after softplus, > 0), ``A (H, N)`` (< 0), ``Bt, Ct (B, L, N)``,
    ``u (B, L, H)``; output ``(B, L, H)`` in float32 (inputs of lower precision, as autocast
    makes them, are upcast first: the scan accumulates in float32). The C kernel saves only the
    inputs and recomputes the states of one (sequence, channel) at a time in the backward (see
    ``selective_bwd_batch`` in ``_scan_kernel.c``); the Triton kernel also saves each time
    chunk's starting state, ``(B, L / T, H, N)``, and recomputes within chunks (:mod:`._triton`).
    """

    @staticmethod
    def forward(ctx, delta, A, Bt, Ct, u, backend):
        dtypes = [t.dtype for t in (delta, A, Bt, Ct, u)]
        delta, A, Bt, Ct, u = (t.float().contiguous() for t in (delta, A, Bt, Ct, u))
        if backend == "c":
            y, extra = _c_forward(delta, A, Bt, Ct, u), ()
        else:
            y, ckpt = _triton.selective_forward(delta, A, Bt, Ct, u)
            extra = (ckpt,)
        ctx.save_for_backward(delta, A, Bt, Ct, u, *extra)
        ctx.backend, ctx.dtypes = backend, dtypes
        return y

    @staticmethod
    @once_differentiable  # the kernels work on raw pointers: no graph for a 2nd derivative
    def backward(ctx, grad_y):
        saved = ctx.saved_tensors
        grad_y = grad_y.float().contiguous()  # (B, L, H)
        if ctx.backend == "c":
            grads = _c_backward(*saved, grad_y)
        else:
            grads = _triton.selective_backward(*saved, grad_y)
        return (*(g.to(dt) for g, dt in zip(grads, ctx.dtypes, strict=True)), None)


def discretize(delta: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor,
               u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decay ``a = exp(delta A)`` and drive ``b = delta u B_t``, ``(..., H, N)`` each, from
    ``delta, u (..., H)``, ``A (H, N)``, ``B_t (..., N)`` (zero-order hold, as Mamba)."""
    a = torch.exp(delta[..., None] * A)  # (..., H, N)
    b = (delta * u)[..., None] * Bt[..., None, :]  # (..., H, N)
    return a, b


def scan_readout(delta: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, Ct: torch.Tensor,
                 u: torch.Tensor) -> torch.Tensor:
    """``y_t[h] = sum_n x_t[h, n] C_t[n]`` with ``x_t = exp(delta_t A) x_{t-1} + delta_t u_t
    B_t``, from zero, for ``delta, u (batch, L, H)``, ``A (H, N)``, ``B_t, C_t (batch, L, N)``
    (no ``D u`` term): the S6 scan with its read-out.

    The fused kernel where one applies (:func:`fused_backend`: float32 out, no ``(B, L, H,
    N)`` tensor stored), else :func:`discretize` + :func:`selective_scan` in torch, which is
    also the reference the kernels are tested against.
    """
    backend = fused_backend(A.shape[1], delta, A, Bt, Ct, u)
    if backend is not None:
        return _FusedSelectiveScan.apply(delta, A, Bt, Ct, u, backend)  # (B, L, H) fp32
    x = selective_scan(*discretize(delta, A, Bt, u))  # (B, L, H, N)
    return (x @ Ct[..., None]).squeeze(-1)  # (B, L, H)


def importance_sums(delta: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, Ct: torch.Tensor,
                    u: torch.Tensor) -> torch.Tensor | None:
    """``sum_{b,t,h} x_t^2 q_t`` per state (float64, (N,)) by a fused kernel, or None where
    none applies; see :mod:`compressm_tune.reduction._selective` for the definition.
    Takes :meth:`SelectiveLayer.projections` and the inputs, never a ``(B, L, H, N)`` tensor."""
    backend = fused_backend(A.shape[1], delta, A, Bt, Ct, u)
    if backend is None:
        return None
    delta, A, Bt, Ct, u = (t.detach().contiguous() for t in (delta, A, Bt, Ct, u))
    if backend == "triton":
        return _triton.selective_importance(delta, A, Bt, Ct, u)
    batch, length, h = u.shape
    n = A.shape[1]
    threads = _kernel_threads(batch)
    acc = torch.zeros(threads, n, dtype=torch.float64)  # one accumulator per thread
    work = A.new_empty(threads, 2 * length * n + 2 * n)  # states and decays of one channel
    _scan_kernel.selective_importance(
        delta.data_ptr(), A.data_ptr(), Bt.data_ptr(), Ct.data_ptr(), u.data_ptr(),
        acc.data_ptr(), work.data_ptr(), batch, length, h, n, threads,
    )
    return acc.sum(0)


class SelectiveLayer(nn.Module):
    """One S6 layer, ``(batch, L, H) -> (batch, L, H)`` (see the module docstring).

    Parameters
    ----------
    d_model : int
        H, the input and output width (one recurrence per channel).
    state_dim : int
        N, the state width shared by every channel (Mamba's ``d_state``).
    dt_rank : int, optional
        Rank of the step-size projection; default ``ceil(H / 16)`` as Mamba.
    dt_min, dt_max : float
        ``softplus(dt_bias)`` is initialized log-uniformly in this range (Mamba's init).

    Examples
    --------
    >>> layer = SelectiveLayer(d_model=4, state_dim=8)
    >>> layer(torch.randn(2, 5, 4)).shape
    torch.Size([2, 5, 4])
    """

    # No weight decay and the SSM learning-rate factor (Mamba exempts A_log from decay too).
    recurrence_parameters = ("A_log", "dt_bias")
    # Which axis of each parameter indexes the state: what a truncation slices.
    state_axes = {"A_log": 1, "B_proj": 0, "C_proj": 0}

    def __init__(
        self,
        d_model: int,
        state_dim: int,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if d_model < 1 or state_dim < 1:
            raise ConfigError(
                f"d_model >= 1 and state_dim >= 1 must hold, got {d_model=} {state_dim=}")
        if not 0.0 < dt_min < dt_max:
            raise ConfigError(f"0 < dt_min < dt_max must hold, got {dt_min=} {dt_max=}")
        kw = {"device": device, "dtype": dtype}
        h, n = d_model, state_dim
        r = dt_rank or math.ceil(h / 16)
        self.d_model = h
        bound = 1 / math.sqrt(h)  # nn.Linear's default init, as Mamba's x_proj
        self.B_proj = nn.Parameter(torch.empty(n, h, **kw).uniform_(-bound, bound))  # (N, H)
        self.C_proj = nn.Parameter(torch.empty(n, h, **kw).uniform_(-bound, bound))  # (N, H)
        self.dt_down = nn.Parameter(torch.empty(r, h, **kw).uniform_(-bound, bound))  # (R, H)
        self.dt_up = nn.Parameter(torch.empty(h, r, **kw).uniform_(-r**-0.5, r**-0.5))  # (H, R)
        dt = torch.exp(torch.rand(h, **kw) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min))  # (H,)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        a = torch.arange(1, n + 1, **kw).repeat(h, 1)  # (H, N) S4D-real init: A = -(1..N)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(h, **kw))  # (H,)

    @property
    def state_dim(self) -> int:
        """Current state width N (changes after a reduction)."""
        return self.A_log.shape[1]

    def projections(
        self, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The input-dependent system for inputs ``u (..., H)``, before any broadcast:
        ``delta (..., H)``, ``A (H, N)``, ``B_t (..., N)``, ``C_t (..., N)``."""
        delta = F.softplus(u @ self.dt_down.T @ self.dt_up.T + self.dt_bias)  # (..., H)
        return delta, -torch.exp(self.A_log), u @ self.B_proj.T, u @ self.C_proj.T

    def scan_inputs(self, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the scan receives for layer inputs ``u (batch, L, H)``: ``delta, A, B_t, C_t``
        (:meth:`projections`) and ``u`` itself, as :func:`scan_readout` takes them (the Mamba
        layers put a projection and a convolution before theirs); state importance scores
        these."""
        return (*self.projections(u), u)

    def discretize(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decay ``a = exp(delta A)``, drive ``b = delta u B`` and read-out ``C`` for inputs
        ``u (..., H)``: ``a, b (..., H, N)`` and ``C (..., N)``."""
        delta, A, b_t, c_t = self.projections(u)
        return (*discretize(delta, A, b_t, u), c_t)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Run the layer over whole sequences: ``u (batch, L, H) -> y (batch, L, H)``.

        Float32 on CPU with the C kernel built, or on CUDA with Triton: a fused scan that
        stores no ``(B, L, H, N)`` tensor. Otherwise (float64, no compiler, TorchScript or
        tracing) the torch path, :meth:`discretize` + :func:`selective_scan`, which is also
        the reference the kernels are tested against.
        """
        return scan_readout(*self.projections(u), u) + self.D * u  # (B, L, H)

    def allocate_state(
        self, batch_size: int, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """A zero streaming state ``(batch, H, N)`` for :meth:`step`."""
        return torch.zeros(batch_size, self.d_model, self.state_dim,
                           device=device or self.A_log.device, dtype=dtype or self.A_log.dtype)

    def step(self, u_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance one token: ``u_t (batch, H)``, ``state (batch, H, N)`` -> ``(y_t, state)``."""
        a, b, c = self.discretize(u_t)  # (B, H, N) x2, (B, N)
        state = a * state + b  # (B, H, N)
        return (state @ c[..., None]).squeeze(-1) + self.D * u_t, state

    def keep_states(self, keep: torch.Tensor) -> None:
        """Model surgery: keep only the state indices ``keep`` (ascending, unique).

        New ``nn.Parameter`` objects are created, so any optimizer over the old ones must be
        rebuilt; the kept states are unchanged, so their optimizer moments stay valid.
        """
        keep_state_indices(self, keep)


def keep_state_indices(layer: nn.Module, keep: torch.Tensor) -> None:
    """Slice the state indices ``keep`` (ascending, unique, in ``[0, layer.state_dim)``) out of
    every parameter ``layer.state_axes`` names, along its axis, as new ``nn.Parameter``
    objects: the surgery of every index-keeping layer."""
    n = layer.state_dim
    device = next(iter(layer.parameters())).device
    keep = torch.as_tensor(keep, dtype=torch.long, device=device)
    if keep.dim() != 1 or len(keep) == 0 or len(torch.unique(keep)) != len(keep) or (
            int(keep.min()) < 0 or int(keep.max()) >= n):
        raise ConfigError(f"keep must list distinct state indices in [0, {n}), "
                          f"got {keep.tolist()}")
    for name, axis in layer.state_axes.items():
        value = getattr(layer, name).detach().index_select(axis, keep)
        setattr(layer, name, nn.Parameter(value.clone()))
