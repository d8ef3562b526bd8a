"""A TorchScript inference module rebuilt from the network's weights.

``LRULayer.forward`` and ``SelectiveLayer.forward`` call C kernels through autograd Functions,
which TorchScript can neither script nor trace into a length-independent graph, so the
scripted module re-states the inference arithmetic of
:class:`~compressm_tune.exporter._weights.BlockWeights` with an explicit time loop (dynamic
length) and a ``step`` method in :meth:`SSMModel.allocate_state`'s layout. A block is the
shared part (BatchNorm fold, ``D``, GELU, GLU, residual) around one layer module,
:class:`_ScriptedLRU` or :class:`_ScriptedSelective`, each with ``forward`` over a sequence and
``step`` over one token; with a chunk length the LRU's ``forward`` is chunked like the ONNX
sequence graph (:mod:`._weights`). A Mamba block (:class:`_ScriptedMamba`) wraps
:class:`_ScriptedSelective` on its inner channels. The saved file needs only ``torch.jit.load``: no
compressm_tune import on the loading side.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compressm_tune.exporter._weights import (
    BlockWeights,
    LRUWeights,
    Mamba2BlockWeights,
    MambaBlockWeights,
    ModelWeights,
    SelectiveWeights,
    check_chunk,
    lru_chunk,
    segment_masks,
)

__all__ = ["ScriptedSSM", "script_model"]


def _buf(module: nn.Module, name: str, value: np.ndarray) -> None:
    module.register_buffer(name, torch.from_numpy(np.array(value, dtype=np.float32)))


class _ScriptedLRU(nn.Module):
    """The LRU layer without ``D``; see :class:`LRUWeights` for the equations.

    ``chunk = 0``: ``forward`` walks the sequence token by token. ``chunk = T``: the chunked
    form of :class:`._weights.LRUChunk` (the same constants as the ONNX graph): every chunk's
    states in one ``bmm``, then a loop over the chunks (not the tokens) for the carries.
    """

    def __init__(self, w: LRUWeights, chunk: int | None) -> None:
        super().__init__()
        for name in ("lam_re", "lam_im", "b_re", "b_im", "c_re", "c_im"):
            _buf(self, name, getattr(w, name))
        self.chunk = int(chunk or 0)
        c = lru_chunk(w, self.chunk or 1)
        for name in ("b_cat", "c_cat", "decay", "carry_in"):
            _buf(self, name, getattr(c, name))
        _buf(self, "carry_step", c.carry_step[:, 0])  # (N, 2, 2)

    def forward(self, hn: torch.Tensor) -> torch.Tensor:
        """``(batch, L, H) -> (batch, L, H)``."""
        if self.chunk > 0:
            return self._chunked(hn)
        v_re = hn @ self.b_re  # (B, L, N)
        v_im = hn @ self.b_im  # (B, L, N)
        s_re = torch.zeros_like(v_re[:, 0])  # (B, N)
        s_im = torch.zeros_like(v_im[:, 0])  # (B, N)
        out_re = torch.empty_like(v_re)  # (B, L, N)
        out_im = torch.empty_like(v_im)  # (B, L, N)
        for t in range(v_re.shape[1]):
            s_re, s_im = (self.lam_re * s_re - self.lam_im * s_im + v_re[:, t],
                          self.lam_re * s_im + self.lam_im * s_re + v_im[:, t])
            out_re[:, t] = s_re
            out_im[:, t] = s_im
        return out_re @ self.c_re + out_im @ self.c_im

    def _chunked(self, hn: torch.Tensor) -> torch.Tensor:
        b, length, t, n = hn.shape[0], hn.shape[1], self.chunk, self.lam_re.shape[0]
        c = (length + t - 1) // t
        v = F.pad(hn @ self.b_cat, [0, 0, 0, c * t - length])  # (B, C*T, 2N), zeros at the end
        v = v.reshape(-1, n).t().reshape(n, b * c, 2 * t)  # columns (t, part)
        x = torch.bmm(v, self.decay)  # (N, B*C, 2T), zero carry
        if c > 1:
            ends = x.reshape(n, b, c, t, 2)[:, :, :, t - 1]  # (N, B, C, 2)
            carry = torch.zeros_like(ends[:, :, 0])  # (N, B, 2)
            carries: list[torch.Tensor] = []
            for i in range(c):
                carries.append(carry)
                carry = (self.carry_step[:, None] * carry[:, :, None, :]).sum(-1) + ends[:, :, i]
            into = torch.stack(carries, 2).reshape(n, b * c, 2)  # carry into each chunk
            x = x + torch.bmm(into, self.carry_in)
        x = x.reshape(n, -1).t().reshape(b, c * t, 2 * n)
        return x[:, :length] @ self.c_cat

    def step(self, hn: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hn (batch, H)``, ``state (batch, N, 2)`` -> ``(y (batch, H), state)``."""
        s_re, s_im = state[:, :, 0], state[:, :, 1]  # (B, N) each
        new_re = self.lam_re * s_re - self.lam_im * s_im + hn @ self.b_re  # (B, N)
        new_im = self.lam_re * s_im + self.lam_im * s_re + hn @ self.b_im  # (B, N)
        return new_re @ self.c_re + new_im @ self.c_im, torch.stack((new_re, new_im), -1)

class _ScriptedSelective(nn.Module):
    """The selective layer without ``D``; see :class:`SelectiveWeights` for the equations.

    ``chunk = T > 0``: ``forward`` loops over chunks of T tokens in the segment-sum form of
    :class:`._onnx_blocks.ChunkedSelective`, with the same constants.
    """

    def __init__(self, w: SelectiveWeights, chunk: int | None) -> None:
        super().__init__()
        for name in ("a", "b_proj", "c_proj", "dt_down", "dt_up", "dt_bias"):
            _buf(self, name, getattr(w, name))
        self.chunk = int(chunk or 0)
        later, keep = segment_masks(self.chunk or 1)
        _buf(self, "later", later[:, :, None])  # (T, T, 1)
        _buf(self, "keep", keep[:, :, None, None])  # (T, T, 1, 1)

    def _drive(self, hn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor]:
        """delta, delta * hn ``(..., H)``; B_t, C_t ``(..., N)``."""
        delta = F.softplus(hn @ self.dt_down @ self.dt_up + self.dt_bias)  # (..., H)
        return delta, delta * hn, hn @ self.b_proj, hn @ self.c_proj

    def _update(self, x: torch.Tensor, delta: torch.Tensor, delta_u: torch.Tensor,
                b_t: torch.Tensor, c_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on ``x (batch, H, N)``: the new state and ``y (batch, H)``."""
        x = torch.exp(delta[:, :, None] * self.a) * x + delta_u[:, :, None] * b_t[:, None, :]
        return x, (x @ c_t[:, :, None]).squeeze(-1)

    def forward(self, hn: torch.Tensor) -> torch.Tensor:
        """``(batch, L, H) -> (batch, L, H)``."""
        if self.chunk > 0:
            return self._chunked(hn)
        delta, delta_u, b_t, c_t = self._drive(hn)  # (B, L, H) x2, (B, L, N) x2
        x = hn.new_zeros(hn.shape[0], self.a.shape[0], self.a.shape[1])  # (B, H, N)
        out = torch.empty_like(hn)  # (B, L, H)
        for t in range(hn.shape[1]):
            x, y = self._update(x, delta[:, t], delta_u[:, t], b_t[:, t], c_t[:, t])
            out[:, t] = y
        return out

    def _chunked(self, hn: torch.Tensor) -> torch.Tensor:
        b, length, t = hn.shape[0], hn.shape[1], self.chunk
        h, n = self.a.shape[0], self.a.shape[1]
        c = (length + t - 1) // t
        drive = self._drive(F.pad(hn, [0, 0, 0, c * t - length]))  # padded at the end
        delta, du, b_t, c_t = [v.reshape(b, c, t, -1) for v in drive]  # (B, C, T, H or N)
        x = hn.new_zeros(b, h, n)  # (B, H, N)
        out: list[torch.Tensor] = []
        for i in range(c):
            d = delta[:, i]  # (B, T, H)
            seg = (d[:, :, None] * self.later).cumsum(1)[..., None]  # (B, T, T, H, 1)
            decay = torch.exp(seg * self.a) * self.keep  # (B, T, T, H, N)
            mix = (decay * (c_t[:, i, :, None, None, :] * b_t[:, i, None, :, None, :])).sum(-1)
            y = (mix * du[:, i, None]).sum(2)  # (B, T, H)
            seen = torch.exp(d.cumsum(1)[..., None] * self.a) * x[:, None]  # (B, T, H, N)
            out.append(y + (seen * c_t[:, i, :, None, :]).sum(-1))
            pushed = decay[:, t - 1] * du[:, i, :, :, None] * b_t[:, i, :, None, :]
            x = seen[:, t - 1] + pushed.sum(1)
        return torch.stack(out, 1).reshape(b, c * t, h)[:, :length]

    def step(self, hn: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hn (batch, H)``, ``state (batch, H, N)`` -> ``(y (batch, H), state)``."""
        delta, delta_u, b_t, c_t = self._drive(hn)
        state, y = self._update(state, delta, delta_u, b_t, c_t)
        return y, state


class _ScriptedBlock(nn.Module):
    """One block around its layer; see :class:`BlockWeights` for the equations."""

    def __init__(self, w: BlockWeights, chunk: int | None) -> None:
        super().__init__()
        for name in ("bn_scale", "bn_shift", "d", "glu_a", "glu_a_bias", "glu_b", "glu_b_bias"):
            _buf(self, name, getattr(w, name))
        self.ssm = (_ScriptedSelective(w.ssm, chunk) if isinstance(w.ssm, SelectiveWeights)
                    else _ScriptedLRU(w.ssm, chunk))

    def _tail(self, x: torch.Tensor, hn: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = F.gelu(y + self.d * hn)  # (..., H)
        a = g @ self.glu_a + self.glu_a_bias  # (..., H)
        return x + a * torch.sigmoid(g @ self.glu_b + self.glu_b_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, L, H) -> (batch, L, H)``."""
        hn = x * self.bn_scale + self.bn_shift  # (B, L, H)
        return self._tail(x, hn, self.ssm(hn))

    def step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_t (batch, H)`` and the layer's state -> ``(out (batch, H), state)``."""
        hn = x_t * self.bn_scale + self.bn_shift  # (B, H)
        y, state = self.ssm.step(hn, state)
        return self._tail(x_t, hn, y), state


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _affine(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x @ w if b is None else x @ w + b


class _ScriptedMamba(nn.Module):
    """One Mamba block; see :class:`MambaBlockWeights` for the equations. Absent biases are
    ``None`` attributes (TorchScript refines ``Optional`` buffers); ``chunk`` as for the S6
    core (:class:`_ScriptedSelective`)."""

    def __init__(self, w: MambaBlockWeights, chunk: int | None) -> None:
        super().__init__()
        for name in ("norm", "in_x", "in_z", "conv", "d", "out_w"):
            _buf(self, name, getattr(w, name))
        for name in ("in_x_bias", "in_z_bias", "conv_bias", "out_bias"):
            value = getattr(w, name)
            if value is None:
                self.register_buffer(name, None)
            else:
                _buf(self, name, value)
        self.eps = float(w.eps)
        self.keep = w.d_conv - 1  # conv inputs carried between tokens
        self.ssm = _ScriptedSelective(w.ssm, chunk)

    def _in(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hn = _rms_norm(h, self.norm, self.eps)
        return _affine(hn, self.in_x, self.in_x_bias), _affine(hn, self.in_z, self.in_z_bias)

    def _out(self, h: torch.Tensor, y: torch.Tensor, xc: torch.Tensor,
             z: torch.Tensor) -> torch.Tensor:
        return h + _affine((y + self.d * xc) * F.silu(z), self.out_w, self.out_bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(batch, L, H) -> (batch, L, H)``."""
        x, z = self._in(h)  # (B, L, E) each
        xc = F.conv1d(x.transpose(1, 2), self.conv[:, None], self.conv_bias,
                      padding=self.keep, groups=self.conv.shape[0])  # (B, E, L + K - 1)
        xc = F.silu(xc[:, :, :h.shape[1]].transpose(1, 2))  # (B, L, E): causal part
        return self._out(h, self.ssm(xc), xc, z)

    def step(self, h: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h (batch, H)``, ``state (batch, E, K - 1 + N)`` -> ``(out (batch, H), state)``."""
        x, z = self._in(h)  # (B, E) each
        window = torch.cat((state[:, :, :self.keep], x[:, :, None]), -1)  # (B, E, K)
        xc = (window * self.conv).sum(-1)  # (B, E)
        conv_bias = self.conv_bias
        if conv_bias is not None:
            xc = xc + conv_bias
        xc = F.silu(xc)
        y, s6 = self.ssm.step(xc, state[:, :, self.keep:])
        return self._out(h, y, xc, z), torch.cat((window[:, :, 1:], s6), -1)


class _ScriptedMamba2(nn.Module):
    """One Mamba-2 block; see :class:`Mamba2BlockWeights` for the equations. ``chunk = T > 0``:
    ``forward`` runs the SSD form of :mod:`._onnx_mamba2` over chunks of T tokens (the same
    segment-sum constants), else token by token. States ``(batch, G, hg, P, N)``."""

    def __init__(self, w: Mamba2BlockWeights, chunk: int | None) -> None:
        super().__init__()
        for name in ("norm", "in_z", "in_xbc", "in_dt", "conv", "dt_bias", "a", "norm_weight",
                     "out_w"):
            _buf(self, name, getattr(w, name))
        for name in ("in_z_bias", "in_xbc_bias", "in_dt_bias", "conv_bias", "out_bias"):
            value = getattr(w, name)
            if value is None:
                self.register_buffer(name, None)
            else:
                _buf(self, name, value)
        _buf(self, "d", np.repeat(w.d, w.head_dim))  # (E,)
        self.eps, self.norm_eps = float(w.eps), float(w.norm_eps)
        self.clip = w.dt_limit is not None
        self.dt_lo, self.dt_hi = w.dt_limit or (0.0, 0.0)
        self.e, self.nh, self.p, self.n = w.d_inner, w.n_heads, w.head_dim, w.state_dim
        self.groups, self.hg = w.n_groups, w.n_heads // w.n_groups
        self.channels, self.keep = int(w.conv.shape[0]), w.d_conv - 1
        self.chunk = int(chunk or 0)
        later, keep = segment_masks(self.chunk or 1)
        _buf(self, "later", later)  # (T, T)
        _buf(self, "mask", keep)  # (T, T)

    def _project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hn = _rms_norm(h, self.norm, self.eps)
        return (_affine(hn, self.in_z, self.in_z_bias), _affine(hn, self.in_xbc, self.in_xbc_bias),
                _affine(hn, self.in_dt, self.in_dt_bias))

    def _split(self, xbc: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                   torch.Tensor, torch.Tensor]:
        gn = self.groups * self.n
        x, b, c = xbc[..., :self.e], xbc[..., self.e:self.e + gn], xbc[..., self.e + gn:]
        delta = F.softplus(dt + self.dt_bias)
        if self.clip:
            delta = delta.clamp(self.dt_lo, self.dt_hi)
        return x, b, c, delta

    def _out(self, h: torch.Tensor, y: torch.Tensor, x: torch.Tensor,
             z: torch.Tensor) -> torch.Tensor:
        g = (y + self.d * x) * F.silu(z)  # (..., E)
        shape = g.shape
        g = g.reshape(shape[:-1] + [self.groups, self.e // self.groups])
        g = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.norm_eps)).reshape(shape)
        return h + _affine(g * self.norm_weight, self.out_w, self.out_bias)

    def _update(self, s: torch.Tensor, x: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token on ``s (B, G, hg, P, N)``: the new state and ``y (B, E)``."""
        bsz = x.shape[0]
        decay = torch.exp(delta * self.a).reshape(bsz, self.groups, self.hg, 1, 1)
        dx = (x.reshape(bsz, self.nh, self.p) * delta[:, :, None]).reshape(
            bsz, self.groups, self.hg, self.p, 1)
        s = decay * s + dx * b.reshape(bsz, self.groups, 1, 1, self.n)
        y = s @ c.reshape(bsz, self.groups, 1, self.n, 1)  # (B, G, hg, P, 1)
        return s, y.reshape(bsz, self.e)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(batch, L, H) -> (batch, L, H)``."""
        z, xbc, dt = self._project(h)
        length = h.shape[1]
        xbc = F.conv1d(xbc.transpose(1, 2), self.conv[:, None], self.conv_bias,
                       padding=self.keep, groups=self.channels)[:, :, :length]
        x, b, c, delta = self._split(F.silu(xbc.transpose(1, 2)), dt)
        y = self._chunked(x, b, c, delta) if self.chunk > 0 else self._tokens(x, b, c, delta)
        return self._out(h, y, x, z)

    def _tokens(self, x: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                delta: torch.Tensor) -> torch.Tensor:
        s = x.new_zeros(x.shape[0], self.groups, self.hg, self.p, self.n)
        out = torch.empty_like(x)  # (B, L, E)
        for t in range(x.shape[1]):
            s, y = self._update(s, x[:, t], b[:, t], c[:, t], delta[:, t])
            out[:, t] = y
        return out

    def _chunked(self, x: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                 delta: torch.Tensor) -> torch.Tensor:
        bsz, length, t = x.shape[0], x.shape[1], self.chunk
        gs, hg, p, n = self.groups, self.hg, self.p, self.n
        nc = (length + t - 1) // t
        pad = nc * t - length
        la = F.pad(delta * self.a, [0, 0, 0, pad]).reshape(bsz, nc, t, self.nh)
        dx = F.pad((x.reshape(bsz, length, self.nh, p) * delta[..., None]).reshape(
            bsz, length, self.e), [0, 0, 0, pad]).reshape(bsz, nc, t, self.nh, p)
        b = F.pad(b, [0, 0, 0, pad]).reshape(bsz, nc, t, gs, n).transpose(2, 3).unsqueeze(3)
        c = F.pad(c, [0, 0, 0, pad]).reshape(bsz, nc, t, gs, n).transpose(2, 3).unsqueeze(3)
        s = x.new_zeros(bsz, gs, hg, p, n)
        out: list[torch.Tensor] = []
        for i in range(nc):
            la_t = la[:, i].transpose(1, 2)  # (B, nh, T)
            seg = (la_t[..., None] * self.later).cumsum(2)  # (B, nh, T, T)
            decay = torch.exp(seg.reshape(bsz, gs, hg, t, t)) * self.mask
            cum = la_t.cumsum(2).reshape(bsz, gs, hg, t, 1)
            b_g, c_g = b[:, i], c[:, i]  # (B, G, 1, T, N)
            dx_g = dx[:, i].transpose(1, 2).reshape(bsz, gs, hg, t, p)
            y = (decay * (c_g @ b_g.transpose(3, 4))) @ dx_g
            y = y + torch.exp(cum) * (c_g @ s.transpose(3, 4))  # (B, G, hg, T, P)
            out.append(y.permute(0, 3, 1, 2, 4).reshape(bsz, t, self.e))
            pushed = (dx_g * decay[:, :, :, t - 1, :, None]).transpose(3, 4) @ b_g
            s = torch.exp(cum[:, :, :, t - 1:]) * s + pushed
        return torch.cat(out, 1)[:, :length]

    def step(self, h: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h (batch, H)``, flat ``state (batch, C (K - 1) + E N)`` -> ``(out, state)``."""
        bsz, cut = h.shape[0], self.channels * self.keep
        z, xbc, dt = self._project(h)
        window = torch.cat((state[:, :cut].reshape(bsz, self.channels, self.keep),
                            xbc[:, :, None]), -1)  # (B, C, K)
        xbc = (window * self.conv).sum(-1)
        conv_bias = self.conv_bias
        if conv_bias is not None:
            xbc = xbc + conv_bias
        x, b, c, delta = self._split(F.silu(xbc), dt)
        s = state[:, cut:].reshape(bsz, self.groups, self.hg, self.p, self.n)
        s, y = self._update(s, x, b, c, delta)
        new = torch.cat((window[:, :, 1:].reshape(bsz, -1), s.reshape(bsz, -1)), 1)
        return self._out(h, y, x, z), new


class ScriptedSSM(nn.Module):
    """Inference-only twin of an :class:`~compressm_tune.models.SSMModel`, scriptable.

    ``forward(x (batch, L, d_input))`` returns ``(batch, d_output)`` with mean pooling or
    ``(batch, L, d_output)`` without; ``step(x_t (batch, d_input), state)`` returns
    ``(y_t, new_state)`` with ``state`` as from ``allocate_state(batch)``. Inputs are
    normalized as in the bundle's manifest.
    """

    def __init__(self, w: ModelWeights, chunk: int | None = None) -> None:
        super().__init__()
        _buf(self, "encoder", w.encoder)
        _buf(self, "encoder_bias", w.encoder_bias)
        _buf(self, "head", w.head)
        _buf(self, "head_bias", w.head_bias)
        chunk = check_chunk(chunk, w.arch)
        self.blocks = nn.ModuleList(
            _ScriptedMamba2(b, chunk) if isinstance(b, Mamba2BlockWeights)
            else _ScriptedMamba(b, chunk) if isinstance(b, MambaBlockWeights)
            else _ScriptedBlock(b, chunk) for b in w.blocks)
        self.tokens = w.tokens  # inputs are token ids: the encoder is an embedding table
        self.final_norm = w.norm_f is not None
        _buf(self, "norm_f", w.norm_f if w.norm_f is not None else np.ones(w.d_model))
        self.norm_eps = float(w.norm_eps)
        self.chunk = int(chunk or 0)  # 0: token by token; T: chunks of T tokens
        self.mean_pool = w.pooling == "mean"
        self.d_model = w.d_model
        self.arch = w.arch  # "lru", "selective", "mamba" or "mamba2"
        self.state_dims = list(w.state_dims)  # list[int], one width per block
        # each block's streaming state without the batch axis: (N, 2) LRU, (H, N) selective
        self.state_shapes = [list(shape) for shape in w.state_shapes]

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens:
            return F.embedding(x, self.encoder)
        return x @ self.encoder + self.encoder_bias

    def _final(self, h: torch.Tensor) -> torch.Tensor:
        return _rms_norm(h, self.norm_f, self.norm_eps) if self.final_norm else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Trailing all-NaN steps of a float input are padding, as for ``SSMModel``: fed as
        zeros (the layers are causal, so they never reach a real step) and never pooled."""
        if self.tokens:
            real = torch.ones(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
        else:
            real = ~torch.isnan(x).all(dim=-1)  # (B, L)
            x = x.masked_fill(~real.unsqueeze(-1), 0.0)
        h = self._encode(x)  # (B, L, H)
        for block in self.blocks:
            h = block(h)  # (B, L, H)
        h = self._final(h)
        if self.mean_pool:
            weight = real.to(h.dtype).unsqueeze(-1)  # (B, L, 1)
            h = (h * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)  # (B, H)
        return h @ self.head + self.head_bias

    @torch.jit.export
    def allocate_state(self, batch: int) -> list[torch.Tensor]:
        """Zero state: one tensor per block (``(batch, N_k, 2)`` LRU, ``(batch, H, N_k)``
        selective, ``(batch, E, K - 1 + N_k)`` Mamba), then (mean pooling) sum and count."""
        state = [torch.zeros([batch] + shape) for shape in self.state_shapes]
        if self.mean_pool:
            state.append(torch.zeros(batch, self.d_model))
            state.append(torch.zeros(1))
        return state

    @torch.jit.export
    def step(self, x_t: torch.Tensor,
             state: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self._encode(x_t)  # (B, H)
        new_state: list[torch.Tensor] = []
        for k, block in enumerate(self.blocks):
            h, s = block.step(h, state[k])
            new_state.append(s)
        h = self._final(h)
        if self.mean_pool:
            total = state[-2] + h  # (B, H)
            count = state[-1] + 1  # (1,)
            new_state.append(total)
            new_state.append(count)
            h = total / count
        return h @ self.head + self.head_bias, new_state


def script_model(w: ModelWeights, chunk: int | None = None) -> torch.jit.ScriptModule:
    """Script (not trace) a :class:`ScriptedSSM`, so the time or chunk loop keeps a dynamic
    length; ``chunk`` as in :func:`~._onnx.build_sequence_model`."""
    return torch.jit.script(ScriptedSSM(w, chunk).eval())
