"""Real-valued float32 weights of an :class:`~compressm_tune.models.SSMModel`, as graphs use them.

Both writers (ONNX and TorchScript) are built from this one extraction, so they compute the
same arithmetic. Every quantity torch derives from the raw parameters at run time (lambda,
``B * gamma``, ``A = -exp(A_log)``, the BatchNorm scale) is derived here *with torch's own
float32 code* (``LRULayer._lambda`` etc.), so the exported constants are bit-identical to what
eager torch uses. With |lambda| near 0.999 a one-ulp difference in lambda would otherwise grow
~1000x over a long sequence.

A block is the part the paper's architectures share (BatchNorm fold, ``D``, GELU, GLU,
residual: :class:`BlockWeights`) around one SSM layer, :class:`LRUWeights` or
:class:`SelectiveWeights`; a Mamba block (:class:`MambaBlockWeights`) holds its own norm,
projections and convolution around a :class:`SelectiveWeights` S6 core. Each block record knows
its streaming state's shape (``state_shape``, without the batch axis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from compressm_tune.models import LRULayer, MambaBlock, SelectiveLayer, SSMModel

__all__ = ["BlockWeights", "LRUWeights", "MambaBlockWeights", "ModelWeights", "SelectiveWeights",
           "extract_weights"]


@dataclass(frozen=True)
class LRUWeights:
    """The diagonal complex recurrence in real arithmetic (N complex states), float32::

        v_re  = h @ b_re ; v_im = h @ b_im                   (.., N) each, gamma folded in
        s_re' = lam_re * s_re - lam_im * s_im + v_re         diagonal complex recurrence
        s_im' = lam_re * s_im + lam_im * s_re + v_im
        y     = s_re' @ c_re + s_im' @ c_im                  Re(C s), (.., H)

    The streaming state is ``(N, 2)``: ``[..., 0]`` the real, ``[..., 1]`` the imaginary part.
    """

    arch: ClassVar[str] = "lru"
    lam_re: np.ndarray  # (N,)
    lam_im: np.ndarray  # (N,)
    b_re: np.ndarray  # (H, N)  (B_re * gamma)^T
    b_im: np.ndarray  # (H, N)  (B_im * gamma)^T
    c_re: np.ndarray  # (N, H)  C_re^T
    c_im: np.ndarray  # (N, H)  -C_im^T  (so that Re(C s) = s_re @ c_re + s_im @ c_im)

    @property
    def state_dim(self) -> int:
        """N, the number of complex states."""
        return int(self.lam_re.shape[0])

    @property
    def state_shape(self) -> tuple[int, ...]:
        """Streaming state per sequence: ``(N, 2)``."""
        return (self.state_dim, 2)


@dataclass(frozen=True)
class SelectiveWeights:
    """The selective (S6) recurrence, float32, for inputs ``h`` (.., H)::

        delta = softplus(h @ dt_down @ dt_up + dt_bias)      (.., H)  input-dependent step
        bt    = h @ b_proj ; ct = h @ c_proj                 (.., N)  input-dependent B, C
        x'    = exp(delta[.., None] * a) * x + (delta * h)[.., None] * bt[.., None, :]
        y     = sum_n x' * ct[.., None, :]                   (.., H)

    The streaming state is ``x``, ``(H, N)``.
    """

    arch: ClassVar[str] = "selective"
    a: np.ndarray  # (H, N)  A = -exp(A_log), < 0
    b_proj: np.ndarray  # (H, N)  B_proj^T
    c_proj: np.ndarray  # (H, N)  C_proj^T
    dt_down: np.ndarray  # (H, R)  dt_down^T
    dt_up: np.ndarray  # (R, H)  dt_up^T
    dt_bias: np.ndarray  # (H,)

    @property
    def state_dim(self) -> int:
        """N, the state width shared by every channel."""
        return int(self.a.shape[1])

    @property
    def state_shape(self) -> tuple[int, ...]:
        """Streaming state per sequence: ``(H, N)``."""
        return tuple(int(n) for n in self.a.shape)


SSMWeights = LRUWeights | SelectiveWeights


@dataclass(frozen=True)
class BlockWeights:
    """One block around its SSM layer (H = d_model), all float32.

    The block computes, per token ``x`` (.., H)::

        h     = x * bn_scale + bn_shift                      BatchNorm with running statistics
        y     = ssm(h) + d * h                               the layer (LRU or selective) + D h
        g     = gelu(y)                                      exact (erf) GELU
        out   = x + (g @ glu_a + glu_a_bias) * sigmoid(g @ glu_b + glu_b_bias)
    """

    bn_scale: np.ndarray  # (H,)  1 / sqrt(running_var + eps)
    bn_shift: np.ndarray  # (H,)  -running_mean * bn_scale
    ssm: SSMWeights
    d: np.ndarray  # (H,)
    glu_a: np.ndarray  # (H, H)  first half of the GLU projection, transposed
    glu_a_bias: np.ndarray  # (H,)
    glu_b: np.ndarray  # (H, H)  gate half, transposed
    glu_b_bias: np.ndarray  # (H,)

    @property
    def state_dim(self) -> int:
        """N, the layer's state width."""
        return self.ssm.state_dim

    @property
    def arch(self) -> str:
        return self.ssm.arch

    @property
    def state_shape(self) -> tuple[int, ...]:
        return self.ssm.state_shape


@dataclass(frozen=True)
class MambaBlockWeights:
    """One Mamba block (:class:`~compressm_tune.models.MambaBlock`), all float32::

        hn    = h / sqrt(mean(h^2) + eps) * norm              RMSNorm, (.., H)
        x     = hn @ in_x (+ in_x_bias) ; z = hn @ in_z (+ in_z_bias)           (.., E)
        xc    = silu(causal depthwise conv of x: sum_j conv[:, j] x_{t-K+1+j} + conv_bias)
        y     = (s6(xc) + d * xc) * silu(z)                   S6 core on E channels
        out   = h + y @ out_w (+ out_bias)

    The streaming state is ``(E, K - 1 + N)``: the last ``K - 1`` conv inputs, then the S6
    state.
    """

    arch: ClassVar[str] = "mamba"
    norm: np.ndarray  # (H,)
    eps: float
    in_x: np.ndarray  # (H, E)  first half of in_proj, transposed
    in_z: np.ndarray  # (H, E)  gate half, transposed
    in_x_bias: np.ndarray | None  # (E,)
    in_z_bias: np.ndarray | None  # (E,)
    conv: np.ndarray  # (E, K)  depthwise kernel, oldest input first
    conv_bias: np.ndarray | None  # (E,)
    ssm: SelectiveWeights  # the S6 core, H = E
    d: np.ndarray  # (E,)
    out_w: np.ndarray  # (E, H)
    out_bias: np.ndarray | None  # (H,)

    @property
    def state_dim(self) -> int:
        """N, the S6 core's state width."""
        return self.ssm.state_dim

    @property
    def d_conv(self) -> int:
        return int(self.conv.shape[1])

    @property
    def state_shape(self) -> tuple[int, ...]:
        """Streaming state per sequence: ``(E, K - 1 + N)``."""
        return (int(self.conv.shape[0]), self.d_conv - 1 + self.state_dim)


@dataclass(frozen=True)
class ModelWeights:
    """The whole network: encoder -> blocks -> (final norm) -> (mean pool) -> head, float32.

    Token models (``tokens``): ``encoder`` is the embedding table ``(vocab, H)``, looked up by
    id, and ``encoder_bias`` is zero."""

    encoder: np.ndarray  # (d_input, H)  W^T, or (vocab, H) embedding table
    encoder_bias: np.ndarray  # (H,)
    blocks: tuple[BlockWeights | MambaBlockWeights, ...]
    head: np.ndarray  # (H, d_output)  W^T
    head_bias: np.ndarray  # (d_output,)
    pooling: str  # "mean" or "none"
    tokens: bool = False  # inputs are token ids (batch, L) int64
    norm_f: np.ndarray | None = None  # (H,)  final RMSNorm weight (Mamba)
    norm_eps: float = 1e-5

    @property
    def arch(self) -> str:
        """``"lru"``, ``"selective"`` or ``"mamba"`` (every block is of the same kind)."""
        return self.blocks[0].arch

    @property
    def d_input(self) -> int:
        """Input channels (1 for token ids)."""
        return 1 if self.tokens else int(self.encoder.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.encoder.shape[1])

    @property
    def d_output(self) -> int:
        return int(self.head.shape[1])

    @property
    def state_dims(self) -> list[int]:
        return [b.state_dim for b in self.blocks]

    @property
    def state_shapes(self) -> list[tuple[int, ...]]:
        """Each block's streaming state without the batch axis (LRU ``(N, 2)``, selective
        ``(H, N)``, Mamba ``(E, K - 1 + N)``), as :meth:`SSMModel.allocate_state` lays it out."""
        return [b.state_shape for b in self.blocks]


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())


def _opt(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else _np(t)


def _mamba_block(block: MambaBlock) -> MambaBlockWeights:
    layer = block.ssm
    e = layer.d_inner
    w, b = layer.in_proj.weight, layer.in_proj.bias  # (2E, H), (2E,) or None
    return MambaBlockWeights(
        norm=_np(block.norm.weight), eps=float(block.norm.eps),
        in_x=_np(w[:e].T), in_z=_np(w[e:].T),
        in_x_bias=None if b is None else _np(b[:e]), in_z_bias=None if b is None else _np(b[e:]),
        conv=_np(layer.conv1d.weight[:, 0]), conv_bias=_opt(layer.conv1d.bias),
        ssm=_layer_weights(layer.s6), d=_np(layer.s6.D),
        out_w=_np(layer.out_proj.weight.T), out_bias=_opt(layer.out_proj.bias),
    )


def _layer_weights(layer: LRULayer | SelectiveLayer) -> SSMWeights:
    if isinstance(layer, SelectiveLayer):
        return SelectiveWeights(
            a=_np(-torch.exp(layer.A_log)),  # as SelectiveLayer.forward computes it
            b_proj=_np(layer.B_proj.T), c_proj=_np(layer.C_proj.T),
            dt_down=_np(layer.dt_down.T), dt_up=_np(layer.dt_up.T), dt_bias=_np(layer.dt_bias),
        )
    lam = layer._lambda()  # (N, 2)
    gamma = torch.exp(layer.gamma_log)[:, None]  # (N, 1)
    return LRUWeights(
        lam_re=_np(lam[:, 0]), lam_im=_np(lam[:, 1]),
        b_re=_np((layer.B_re * gamma).T), b_im=_np((layer.B_im * gamma).T),
        c_re=_np(layer.C_re.T), c_im=_np(-layer.C_im.T),
    )


def extract_weights(model: SSMModel) -> ModelWeights:
    """Read ``model``'s inference-time weights (eval mode semantics) as float32 numpy arrays.

    Examples
    --------
    >>> from compressm_tune.models import SSMConfig
    >>> config = SSMConfig(d_input=2, d_output=3, d_model=4, state_dims=[5, 2])
    >>> w = extract_weights(SSMModel(config))
    >>> w.arch, w.state_dims, w.blocks[0].ssm.b_re.shape, w.head.shape
    ('lru', [5, 2], (4, 5), (4, 3))
    >>> w = extract_weights(SSMModel(SSMConfig(arch="selective", d_model=4, state_dims=[5, 2])))
    >>> w.arch, w.state_shapes
    ('selective', [(4, 5), (4, 2)])
    """
    blocks: list[BlockWeights | MambaBlockWeights] = []
    with torch.no_grad():
        for block in model.blocks:
            if isinstance(block, MambaBlock):
                blocks.append(_mamba_block(block))
                continue
            norm = block.norm
            scale = torch.rsqrt(norm.running_var + norm.eps)  # (H,)  as torch's CPU batch_norm
            h = block.ssm.d_model
            w, b = block.glu.proj.weight, block.glu.proj.bias  # (2H, H), (2H,)
            blocks.append(BlockWeights(
                bn_scale=_np(scale), bn_shift=_np(-norm.running_mean * scale),
                ssm=_layer_weights(block.ssm), d=_np(block.ssm.D),
                glu_a=_np(w[:h].T), glu_a_bias=_np(b[:h]),
                glu_b=_np(w[h:].T), glu_b_bias=_np(b[h:]),
            ))
        config = model.config
        tokens = config.vocab_size is not None
        encoder = model.encoder.weight  # Linear (H, d_input) or Embedding (vocab, H)
        norm_f = getattr(model.norm_f, "weight", None)  # RMSNorm (Mamba) or Identity
        return ModelWeights(
            encoder=_np(encoder if tokens else encoder.T),
            encoder_bias=np.zeros(config.d_model, np.float32) if tokens
            else _np(model.encoder.bias),
            blocks=tuple(blocks), head=_np(model.head.weight.T), head_bias=_np(model.head.bias),
            pooling=config.pooling, tokens=tokens, norm_f=_opt(norm_f),
            norm_eps=float(config.norm_eps),
        )
