"""Fused GPU scans in Triton: the LRU's complex diagonal scan and the selective (S6) scan.

Why Triton and why these shapes. On a GPU the pure-PyTorch scans launch many small kernels
(the LRU's chunk carry is a Python loop) and the selective path materializes four
``(batch, L, H, N)`` tensors. Here each scan is one launch per direction:

* **LRU** ``x_t = lam * x_{t-1} + v_t`` (complex, as (re, im) pairs): one program per
  (sequence, block of states) walks the sequence in chunks of ``T`` steps; inside a chunk a
  ``tl.associative_scan`` over the affine maps ``x -> a x + b`` (complex) gives every step at
  once, and the chunk's last state carries into the next. ``REVERSE`` walks time backwards,
  which is the backward pass (run with ``conj(lam)``).
* **Selective** ``x_t = exp(delta_t A) x_{t-1} + delta_t u_t B_t``, ``y_t = sum_n x_t C_t``:
  one program per (sequence, block of channels) holds a ``(T, BH, N)`` tile in registers; the
  forward stores only ``y`` and each chunk's starting state (``(B, chunks, H, N)``); the
  backward walks the chunks in reverse, recomputes the chunk's states from its checkpoint and
  runs the adjoint ``r_t = g_t + a_{t+1} r_{t+1}`` as a reverse associative scan. No
  ``(B, L, H, N)`` tensor is ever stored. The same kernel, with ``IMPORTANCE``, computes the
  state-importance sums ``sum x_t^2 q_t`` (``q_t = C_t^2 + a_{t+1}^2 q_{t+1}``) of
  :mod:`compressm_tune.reduction._selective`.

Everything accumulates in float32. The kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the tests check them against the plain loops without a
GPU. :func:`available` says whether Triton imports at all.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton use the torch paths
    triton = None

__all__ = ["available", "lru_scan", "selective_backward", "selective_forward",
           "selective_importance", "selective_supported"]

_LRU_T = 32  # steps per chunk: the associative scan's depth vs the sequential chunk carries
_LRU_BLOCK_N = 32  # complex states per program
_SEL_TILE = 4096  # elements of one (T, BH, N) register tile of the selective kernels
_SEL_MAX_N = 1024  # wider selective states fall back to the torch path


def available() -> bool:
    """Whether Triton imported (CUDA builds of torch ship it; ``pip install triton`` on CPU)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _affine(a1, b1, a2, b2):
        """Compose ``x -> a1 x + b1`` then ``x -> a2 x + b2`` (real)."""
        return a2 * a1, a2 * b1 + b2

    @triton.jit
    def _affine_complex(ar1, ai1, br1, bi1, ar2, ai2, br2, bi2):
        """Compose ``x -> a1 x + b1`` then ``x -> a2 x + b2`` (complex as re, im)."""
        return (ar2 * ar1 - ai2 * ai1, ar2 * ai1 + ai2 * ar1,
                ar2 * br1 - ai2 * bi1 + br2, ar2 * bi1 + ai2 * br1 + bi2)

    @triton.jit
    def _last_row(tile, rows, T: tl.constexpr):
        """Row ``T - 1`` of a tile whose leading axis is time (registers cannot be indexed)."""
        return tl.sum(tl.where(rows == T - 1, tile, 0.0), axis=0)

    @triton.jit
    def _lru_scan_kernel(lam_ptr, v_ptr, x_ptr, x0_ptr, L, N,
                         HAS_X0: tl.constexpr, REVERSE: tl.constexpr,
                         T: tl.constexpr, BLOCK_N: tl.constexpr):
        b = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        mask_n = n < N
        lr = tl.load(lam_ptr + 2 * n, mask=mask_n, other=0.0)
        li = tl.load(lam_ptr + 2 * n + 1, mask=mask_n, other=0.0)
        if HAS_X0:
            cr = tl.load(x0_ptr + (b * N + n) * 2, mask=mask_n, other=0.0)
            ci = tl.load(x0_ptr + (b * N + n) * 2 + 1, mask=mask_n, other=0.0)
        else:
            cr = tl.zeros((BLOCK_N,), dtype=tl.float32)
            ci = tl.zeros((BLOCK_N,), dtype=tl.float32)
        rows = tl.arange(0, T)[:, None]  # (T, 1)
        ar = tl.broadcast_to(lr[None, :], (T, BLOCK_N))
        ai = tl.broadcast_to(li[None, :], (T, BLOCK_N))
        base = b.to(tl.int64) * L * N * 2
        for c in range(0, tl.cdiv(L, T)):
            t = c * T + rows  # (T, 1) position in walking order
            if REVERSE:
                t_idx = L - 1 - t
            else:
                t_idx = t
            mask = (t < L) & mask_n[None, :]
            off = base + (t_idx * N + n[None, :]) * 2  # (T, BN)
            vr = tl.load(v_ptr + off, mask=mask, other=0.0)
            vi = tl.load(v_ptr + off + 1, mask=mask, other=0.0)
            pr, pi, xr, xi = tl.associative_scan((ar, ai, vr, vi), 0, _affine_complex)
            xr = xr + pr * cr[None, :] - pi * ci[None, :]  # + lam^(k+1) * carry
            xi = xi + pr * ci[None, :] + pi * cr[None, :]
            tl.store(x_ptr + off, xr, mask=mask)
            tl.store(x_ptr + off + 1, xi, mask=mask)
            cr = _last_row(xr, rows, T)
            ci = _last_row(xi, rows, T)

    @triton.jit
    def _selective_fwd_kernel(delta_ptr, A_ptr, B_ptr, C_ptr, u_ptr, y_ptr, ckpt_ptr,
                              L, H, N, n_chunks,
                              T: tl.constexpr, BH: tl.constexpr, NP: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1) * BH + tl.arange(0, BH)  # (BH,)
        n = tl.arange(0, NP)  # (NP,)
        mask_h, mask_n = h < H, n < N
        mask_hn = mask_h[:, None] & mask_n[None, :]
        A = tl.load(A_ptr + h[:, None] * N + n[None, :], mask=mask_hn, other=0.0)  # (BH, NP)
        x = tl.zeros((BH, NP), dtype=tl.float32)
        rows = tl.arange(0, T)[:, None]  # (T, 1)
        rows3 = rows[:, :, None]  # (T, 1, 1)
        seq = b.to(tl.int64) * L
        for c in range(0, n_chunks):
            ck = (b.to(tl.int64) * n_chunks + c) * H
            tl.store(ckpt_ptr + (ck + h[:, None]) * N + n[None, :], x, mask=mask_hn)
            t = c * T + rows  # (T, 1)
            m_th = (t < L) & mask_h[None, :]
            m_tn = (t < L) & mask_n[None, :]
            d = tl.load(delta_ptr + (seq + t) * H + h[None, :], mask=m_th, other=0.0)  # (T, BH)
            u = tl.load(u_ptr + (seq + t) * H + h[None, :], mask=m_th, other=0.0)
            bt = tl.load(B_ptr + (seq + t) * N + n[None, :], mask=m_tn, other=0.0)  # (T, NP)
            ct = tl.load(C_ptr + (seq + t) * N + n[None, :], mask=m_tn, other=0.0)
            a = tl.exp(d[:, :, None] * A[None, :, :])  # (T, BH, NP)
            drive = (d * u)[:, :, None] * bt[:, None, :]
            p, xs = tl.associative_scan((a, drive), 0, _affine)
            xs = xs + p * x[None, :, :]
            y = tl.sum(xs * ct[:, None, :], axis=2)  # (T, BH)
            tl.store(y_ptr + (seq + t) * H + h[None, :], y, mask=m_th)
            x = tl.sum(tl.where(rows3 == T - 1, xs, 0.0), axis=0)

    @triton.jit
    def _selective_bwd_kernel(delta_ptr, A_ptr, B_ptr, C_ptr, u_ptr, gy_ptr, ckpt_ptr,
                              gdelta_ptr, gA_ptr, gB_ptr, gC_ptr, gu_ptr, imp_ptr,
                              L, H, N, n_chunks,
                              T: tl.constexpr, BH: tl.constexpr, NP: tl.constexpr,
                              IMPORTANCE: tl.constexpr):
        """Adjoint pass (or, with IMPORTANCE, the observability pass of the importance sums).

        Per chunk, walked last to first: the states ``x_{t-1}`` are recomputed from the
        chunk's checkpoint by a scan whose first element is the identity (so the scan is
        exclusive); ``x_t = a_t x_{t-1} + b_t``; the adjoint ``r_t = g_t + a_{t+1} r_{t+1}``
        (importance: ``q_t = C_t^2 + a_{t+1}^2 q_{t+1}``) comes from a reverse scan plus the
        carry from the next chunk.
        """
        b = tl.program_id(0)
        pid_h = tl.program_id(1)
        h = pid_h * BH + tl.arange(0, BH)
        n = tl.arange(0, NP)
        mask_h, mask_n = h < H, n < N
        mask_hn = mask_h[:, None] & mask_n[None, :]
        A = tl.load(A_ptr + h[:, None] * N + n[None, :], mask=mask_hn, other=0.0)  # (BH, NP)
        r_next = tl.zeros((BH, NP), dtype=tl.float32)  # adjoint at the next chunk's first step
        grad_A = tl.zeros((BH, NP), dtype=tl.float32)
        imp = tl.zeros((NP,), dtype=tl.float32)
        rows = tl.arange(0, T)[:, None]
        rows3 = rows[:, :, None]
        seq = b.to(tl.int64) * L
        for i in range(0, n_chunks):
            c = n_chunks - 1 - i
            ck = (b.to(tl.int64) * n_chunks + c) * H
            x_start = tl.load(ckpt_ptr + (ck + h[:, None]) * N + n[None, :], mask=mask_hn,
                              other=0.0)
            t = c * T + rows  # (T, 1)
            m_th = (t < L) & mask_h[None, :]
            m_tn = (t < L) & mask_n[None, :]
            d = tl.load(delta_ptr + (seq + t) * H + h[None, :], mask=m_th, other=0.0)
            u = tl.load(u_ptr + (seq + t) * H + h[None, :], mask=m_th, other=0.0)
            bt = tl.load(B_ptr + (seq + t) * N + n[None, :], mask=m_tn, other=0.0)
            ct = tl.load(C_ptr + (seq + t) * N + n[None, :], mask=m_tn, other=0.0)
            # the previous step's element, identity at the chunk's first step
            m_prev = rows >= 1
            d_p = tl.load(delta_ptr + (seq + t - 1) * H + h[None, :], mask=m_th & m_prev,
                          other=0.0)
            u_p = tl.load(u_ptr + (seq + t - 1) * H + h[None, :], mask=m_th & m_prev,
                          other=0.0)
            b_p = tl.load(B_ptr + (seq + t - 1) * N + n[None, :], mask=m_tn & m_prev,
                          other=0.0)
            p_prev, x_prev = tl.associative_scan(
                (tl.exp(d_p[:, :, None] * A[None, :, :]),
                 (d_p * u_p)[:, :, None] * b_p[:, None, :]), 0, _affine)
            x_prev = x_prev + p_prev * x_start[None, :, :]  # (T, BH, NP)  x_{t-1}
            a = tl.exp(d[:, :, None] * A[None, :, :])  # (T, BH, NP)
            du = d * u  # (T, BH)
            x = a * x_prev + du[:, :, None] * bt[:, None, :]  # x_t
            m_next = (t + 1) < L
            d_n = tl.load(delta_ptr + (seq + t + 1) * H + h[None, :], mask=m_next & mask_h[None, :],
                          other=0.0)
            a_next = tl.exp(d_n[:, :, None] * A[None, :, :])  # a_{t+1}; its r_{t+1} is 0 past L
            if IMPORTANCE:
                g = tl.broadcast_to((ct * ct)[:, None, :], (T, BH, NP))
                a_next = a_next * a_next
            else:
                gy = tl.load(gy_ptr + (seq + t) * H + h[None, :], mask=m_th, other=0.0)
                g = gy[:, :, None] * ct[:, None, :]
            p_r, r = tl.associative_scan((a_next, g), 0, _affine, reverse=True)
            r = r + p_r * r_next[None, :, :]  # (T, BH, NP)
            r_next = tl.sum(tl.where(rows3 == 0, r, 0.0), axis=0)
            if IMPORTANCE:
                imp += tl.sum(tl.sum(x * x * r, axis=0), axis=0)
            else:
                q = r * x_prev * a  # dL/da_t * a_t
                gd = tl.sum(q * A[None, :, :] + r * (u[:, :, None] * bt[:, None, :]), axis=2)
                tl.store(gdelta_ptr + (seq + t) * H + h[None, :], gd, mask=m_th)
                rb = tl.sum(r * bt[:, None, :], axis=2)  # (T, BH)
                tl.store(gu_ptr + (seq + t) * H + h[None, :], rb * d, mask=m_th)
                grad_A += tl.sum(q * d[:, :, None], axis=0)
                tl.atomic_add(gB_ptr + (seq + t) * N + n[None, :],
                              tl.sum(r * du[:, :, None], axis=1), mask=m_tn)
                tl.atomic_add(gC_ptr + (seq + t) * N + n[None, :],
                              tl.sum(gy[:, :, None] * x, axis=1), mask=m_tn)
        if IMPORTANCE:
            n_h = tl.num_programs(1)
            tl.store(imp_ptr + (b * n_h + pid_h) * N + n, imp, mask=mask_n)
        else:
            tl.atomic_add(gA_ptr + h[:, None] * N + n[None, :], grad_A, mask=mask_hn)


def lru_scan(lam: torch.Tensor, v: torch.Tensor, x0: torch.Tensor | None,
             reverse: bool) -> torch.Tensor:
    """``x_t = lam x_{t-1} + v_t`` (or backwards in time) for float32 ``(B, L, N, 2)``."""
    lam, v = lam.contiguous(), v.contiguous()
    batch, length, n = v.shape[:3]
    x = torch.empty_like(v)
    if x0 is not None:
        x0 = x0.contiguous()
    grid = (batch, triton.cdiv(n, _LRU_BLOCK_N))
    _lru_scan_kernel[grid](lam, v, x, x0 if x0 is not None else v, length, n,
                           HAS_X0=x0 is not None, REVERSE=reverse,
                           T=_LRU_T, BLOCK_N=_LRU_BLOCK_N)
    return x


def selective_supported(state_dim: int) -> bool:
    """Whether the selective kernels take this width (one register tile holds every state)."""
    return triton is not None and state_dim <= _SEL_MAX_N


def _selective_tiles(length: int, d_model: int, state_dim: int) -> tuple[int, int, int]:
    """(T, BH, NP): chunk length, channels per program, padded state width."""
    np_ = triton.next_power_of_2(state_dim)
    t = max(4, min(16, _SEL_TILE // (4 * np_), triton.next_power_of_2(length)))
    bh = max(1, min(_SEL_TILE // (t * np_), triton.next_power_of_2(d_model)))
    return t, bh, np_


def selective_forward(delta, A, Bt, Ct, u) -> tuple[torch.Tensor, torch.Tensor]:
    """``y (B, L, H)`` and the chunk checkpoints ``(B, chunks, H, N)`` the backward needs."""
    batch, length, h = u.shape
    n = A.shape[1]
    t, bh, np_ = _selective_tiles(length, h, n)
    n_chunks = triton.cdiv(length, t)
    y = torch.empty_like(u)
    ckpt = u.new_empty(batch, n_chunks, h, n)
    _selective_fwd_kernel[(batch, triton.cdiv(h, bh))](
        delta, A, Bt, Ct, u, y, ckpt, length, h, n, n_chunks, T=t, BH=bh, NP=np_)
    return y, ckpt


def selective_backward(delta, A, Bt, Ct, u, ckpt, grad_y):
    """Gradients ``(delta, A, B_t, C_t, u)`` of ``sum(grad_y * y)``."""
    batch, length, h = u.shape
    n = A.shape[1]
    t, bh, np_ = _selective_tiles(length, h, n)
    grads = (torch.empty_like(delta), torch.zeros_like(A), torch.zeros_like(Bt),
             torch.zeros_like(Ct), torch.empty_like(u))
    _selective_bwd_kernel[(batch, triton.cdiv(h, bh))](
        delta, A, Bt, Ct, u, grad_y, ckpt, *grads, u, length, h, n, ckpt.shape[1],
        T=t, BH=bh, NP=np_, IMPORTANCE=False)
    return grads


def selective_importance(delta, A, Bt, Ct, u) -> torch.Tensor:
    """``sum_{b,t,h} x_t^2 q_t`` per state, ``(N,)`` float64 (see ``reduction._selective``)."""
    batch, length, h = u.shape
    n = A.shape[1]
    t, bh, np_ = _selective_tiles(length, h, n)
    _, ckpt = selective_forward(delta, A, Bt, Ct, u)
    n_h = triton.cdiv(h, bh)
    parts = u.new_zeros(batch, n_h, n)
    _selective_bwd_kernel[(batch, n_h)](
        delta, A, Bt, Ct, u, u, ckpt, u, A, Bt, Ct, u, parts, length, h, n, ckpt.shape[1],
        T=t, BH=bh, NP=np_, IMPORTANCE=True)
    return parts.double().sum((0, 1))
