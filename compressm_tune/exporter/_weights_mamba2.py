"""Float32 weights of a Mamba-2 block (:class:`Mamba2BlockWeights`), as
:func:`._weights.extract_weights` reads them and every exported engine embeds them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

__all__ = ["Mamba2BlockWeights"]


@dataclass(frozen=True)
class Mamba2BlockWeights:
    """One Mamba-2 block (:class:`~compressm_tune.models.Mamba2Layer` in a ``MambaBlock``),
    float32, ``C = E + 2 G N`` conv channels, ``nh = E / P`` heads in ``G`` groups::

        hn      = h / sqrt(mean(h^2) + eps) * norm                    RMSNorm, (.., H)
        z       = hn @ in_z (+ in_z_bias)                             (.., E)
        xBC     = hn @ in_xbc (+ in_xbc_bias)                         (.., C): x, B (G, N), C
        dt      = hn @ in_dt (+ in_dt_bias)                           (.., nh)
        x, B, C = split(silu(causal depthwise conv of xBC))           kernel conv (C, K)
        delta   = clip(softplus(dt + dt_bias), *dt_limit)             (.., nh)
        S_t     = exp(delta a) S_{t-1} + (delta x) (x) B              (nh, P, N), a (nh,)
        y       = S_t C + d x                                         per head
        out     = h + rmsnorm_G(y * silu(z)) * norm_weight @ out_w (+ out_bias)

    The streaming state is flat, ``(C (K - 1) + E N,)``: the conv window, then ``S``.
    """

    arch: ClassVar[str] = "mamba2"
    norm: np.ndarray  # (H,)
    eps: float
    in_z: np.ndarray  # (H, E)
    in_xbc: np.ndarray  # (H, C)
    in_dt: np.ndarray  # (H, nh)
    in_z_bias: np.ndarray | None  # (E,)
    in_xbc_bias: np.ndarray | None  # (C,)
    in_dt_bias: np.ndarray | None  # (nh,)
    conv: np.ndarray  # (C, K)  depthwise kernel over every xBC channel, oldest input first
    conv_bias: np.ndarray | None  # (C,)
    dt_bias: np.ndarray  # (nh,)
    a: np.ndarray  # (nh,)  -exp(A_log)
    d: np.ndarray  # (nh,)
    dt_limit: tuple[float, float] | None
    norm_weight: np.ndarray  # (E,)  the gated RMSNorm's
    norm_eps: float
    out_w: np.ndarray  # (E, H)
    out_bias: np.ndarray | None  # (H,)
    n_groups: int
    head_dim: int

    @property
    def d_inner(self) -> int:
        return int(self.in_z.shape[1])

    @property
    def n_heads(self) -> int:
        return int(self.a.shape[0])

    @property
    def state_dim(self) -> int:
        """N, the state width of every head."""
        return (int(self.in_xbc.shape[1]) - self.d_inner) // (2 * self.n_groups)

    @property
    def d_conv(self) -> int:
        return int(self.conv.shape[1])

    @property
    def state_shape(self) -> tuple[int, ...]:
        """Streaming state per sequence, flat: ``(C (K - 1) + E N,)``."""
        return (int(self.conv.shape[0]) * (self.d_conv - 1) + self.d_inner * self.state_dim,)
