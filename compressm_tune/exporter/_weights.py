"""Float32 weights of an :class:`~compressm_tune.models.SSMModel`, and the chunked-scan
constants derived from them: the arrays every exported engine embeds.

Both writers (ONNX and TorchScript) are built from this one extraction, so they compute the
same arithmetic. Every quantity torch derives from raw parameters at run time (lambda,
``B * gamma``, ``A = -exp(A_log)``, the BatchNorm scale) is derived here with torch's own float32
code, so the constants are bit-identical to eager torch's: with |lambda| near 0.999 a one-ulp
difference would grow ~1000x over a long sequence.

A block is the shared part (BatchNorm fold, ``D``, GELU, GLU, residual: :class:`BlockWeights`)
around one layer, :class:`LRUWeights` or :class:`SelectiveWeights`; a Mamba block
(:class:`MambaBlockWeights`) holds its norm, projections and convolution around a selective S6
core, a Mamba-2 block (:class:`Mamba2BlockWeights`, :mod:`._weights_mamba2`) its own. Each block
record knows its streaming state's shape (``state_shape``, no batch axis).

Chunked form of an LRU layer: inside a chunk of ``T`` tokens ``x_t = lam x_{t-1} + v_t``
unrolls to ``x_t = sum_{s <= t} lam^(t - s) v_s + lam^(t + 1) x_carry``, so a chunk's states are
one batched matmul with a constant Toeplitz matrix per state and only the carry walks the
chunks. A complex ``z`` acts on ``(re, im)`` as ``[[re, -im], [im, re]]``, so every matrix is
real. Powers of lambda are repeated float64 products of the float32 lambda (never
``exp(k log lam)``): a pole at 0 stays exact and the only rounding is the final cast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from compressm_tune.errors import ExportOptionError
from compressm_tune.exporter import _edge
from compressm_tune.exporter._weights_mamba2 import Mamba2BlockWeights
from compressm_tune.models import LRULayer, Mamba2Layer, MambaBlock, SelectiveLayer, SSMModel

__all__ = ["CHUNK_ARCHS", "CHUNK_CHOICES", "CHUNK_KEY", "BlockWeights", "LRUChunk",
           "LRUWeights", "Mamba2BlockWeights", "MambaBlockWeights", "ModelWeights",
           "SelectiveWeights", "check_chunk", "chunk_label", "extract_weights", "lru_chunk",
           "max_chunk", "segment_masks"]


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
    blocks: tuple[BlockWeights | MambaBlockWeights | Mamba2BlockWeights, ...]
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


def _mamba2_block(block: MambaBlock) -> Mamba2BlockWeights:
    layer: Mamba2Layer = block.ssm
    e = layer.d_inner
    w, b = layer.in_proj.weight, layer.in_proj.bias  # rows z (E), x (E), dt (nh)
    bc = layer.bc_proj.reshape(-1, layer.d_model)  # (2GN, H)
    conv, conv_bias = layer._conv_parameters()  # (C, K), (C,) or None
    xbc_bias = None if b is None else torch.cat((b[e:2 * e], layer.bc_bias.reshape(-1)))
    return Mamba2BlockWeights(
        norm=_np(block.norm.weight), eps=float(block.norm.eps),
        in_z=_np(w[:e].T), in_xbc=_np(torch.cat((w[e:2 * e], bc)).T), in_dt=_np(w[2 * e:].T),
        in_z_bias=None if b is None else _np(b[:e]), in_xbc_bias=_opt(xbc_bias),
        in_dt_bias=None if b is None else _np(b[2 * e:]),
        conv=_np(conv), conv_bias=_opt(conv_bias), dt_bias=_np(layer.dt_bias),
        a=_np(-torch.exp(layer.A_log)), d=_np(layer.D), dt_limit=layer.dt_limit,
        norm_weight=_np(layer.norm_weight), norm_eps=float(layer.norm_eps),
        out_w=_np(layer.out_proj.weight.T), out_bias=_opt(layer.out_proj.bias),
        n_groups=layer.n_groups, head_dim=layer.head_dim,
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
                blocks.append(_mamba2_block(block) if isinstance(block.ssm, Mamba2Layer)
                              else _mamba_block(block))
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


CHUNK_KEY = _edge.CHUNK_KEY  # ONNX metadata: "scan" or the chunk length T
CHUNK_ARCHS = ("lru", "selective", "mamba", "mamba2")  # layers with a chunked sequence graph

CHUNK_CHOICES = (8, 16, 32, 64)  # chunk lengths the export measures (see choose_chunk)
MAX_DECAY_FLOATS = 1 << 20  # cap per block on the (N, 2T, 2T) decay: 4 MB of float32
MAX_CARRY_FLOATS = 1 << 16  # cap per block on the (N, 2G, 2G) chunk-to-chunk matrix: 256 kB
MAX_GROUPS = 64  # G, chunks whose carries come in closed form, at most
MAX_SEGMENT_FLOATS = 1 << 20  # cap on a selective chunk's (T, T, H, N) decays per sequence


def chunk_label(chunk: int | None) -> str:
    """How a graph variant is written in metadata and manifest: ``"scan"`` or ``"T"``.

    Examples
    --------
    >>> chunk_label(None), chunk_label(32)
    ('scan', '32')
    """
    return "scan" if chunk is None else str(int(chunk))


def check_chunk(chunk: int | None, arch: str) -> int | None:
    """Return ``chunk`` (None = per-token Scan, else T >= 1) or raise ExportOptionError."""
    if chunk is None:
        return None
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ExportOptionError(f"chunk must be None or an integer >= 1, got {chunk=}")
    if arch not in CHUNK_ARCHS:
        raise ExportOptionError(f"a chunked sequence graph exists for {CHUNK_ARCHS} layers, "
                                f"not {arch!r}; use chunk=None")
    return int(chunk)


def max_chunk(layer: LRUWeights | SelectiveWeights | Mamba2BlockWeights) -> int:
    """The largest chunk in :data:`CHUNK_CHOICES` whose constants (LRU: the ``(N, 2T, 2T)``
    decay) or per-chunk temporaries (selective: ``(T, T, H, N)`` decays per sequence) fit the
    size cap.

    Examples
    --------
    >>> w = lambda n: LRUWeights(*[np.zeros(n, np.float32)] * 2, *[np.zeros((1, n))] * 2,
    ...                          *[np.zeros((n, 1))] * 2)
    >>> max_chunk(w(16)), max_chunk(w(256)), max_chunk(w(1024))
    (64, 32, 16)
    """
    if isinstance(layer, Mamba2BlockWeights):  # scalar decays: (T, T) per head
        fits = [t for t in CHUNK_CHOICES if t * t * layer.n_heads <= MAX_SEGMENT_FLOATS]
    elif isinstance(layer, SelectiveWeights):
        size = layer.a.size  # H * N
        fits = [t for t in CHUNK_CHOICES if t * t * size <= MAX_SEGMENT_FLOATS]
    else:
        fits = [t for t in CHUNK_CHOICES if layer.state_dim * 4 * t * t <= MAX_DECAY_FLOATS]
    return max(fits) if fits else min(CHUNK_CHOICES)


def segment_masks(chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Constants of a selective chunk, ``(T, T)`` each: ``later`` and ``keep``.

    ``later[r, s]`` is 1 where ``r > s``, so a cumulative sum over ``r`` of ``delta_r later[r,
    s]`` is ``sum_{s < r <= t} delta_r`` at ``[t, s]``: the step sizes from token ``s`` to token
    ``t``, added term by term rather than as a difference of cumulative sums, whose
    cancellation would cost precision in ``exp(A * sum)`` (the ``segsum`` of ``mamba_ssm``'s
    SSD). ``keep[t, s]`` is 1 where ``s <= t``. A ``(T*T, T)`` matrix of those sums cost
    ``T^3`` multiply-adds per channel and 1 MB per layer at T=64; the masked sum costs ``T^2``.

    Examples
    --------
    >>> later, keep = segment_masks(3)
    >>> np.cumsum(np.array([1.0, 2.0, 4.0])[:, None] * later, axis=0)  # [t, s]
    array([[0., 0., 0.],
           [2., 0., 0.],
           [6., 4., 0.]])
    """
    t = np.arange(chunk)
    keep = (t[None, :] <= t[:, None]).astype(np.float32)  # [t, s]
    return (t[:, None] > t[None, :]).astype(np.float32), keep


def _rot(z: np.ndarray) -> np.ndarray:
    """Complex ``z (...)`` as real matrices ``(..., 2, 2)`` acting on ``(re, im)`` columns."""
    return np.stack([np.stack([z.real, -z.imag], -1), np.stack([z.imag, z.real], -1)], -2)


class LRUChunk:
    """The float32 constants of one LRU layer's chunked form for chunk length ``T``.

    Attributes
    ----------
    b_cat : (H, 2N)
        ``[b_re | b_im]``: the drive ``v = h @ b_cat``, real parts first.
    c_cat : (2N, H)
        ``[c_re; c_im]``: the read-out ``y = [x_re | x_im] @ c_cat``.
    decay : (N, 2T, 2T)
        Per state, the right factor of a chunk's states ``x[n] = v[n] @ decay[n]`` with
        ``v[n]`` of shape ``(rows, 2T)``: entry ``[(s, q), (t, p)]`` is part ``p`` of
        ``lam_n^(t-s)`` acting on part ``q`` (0 = re, 1 = im) for ``s <= t``, zero otherwise.
        Time is the outer and the part the inner index, so that a drive ``(tokens, 2, N)``
        reaches this layout by one 2-D transpose (onnxruntime's 4-D transposes cost more
        than the matmul at these sizes, measured while writing this).
    carry_in : (N, 2, 2T)
        ``lam^(t+1)``: how the previous chunk's last state ``(rows, 2)`` enters token ``t``,
        columns ``(t, p)``.
    carry_step : (N, 1, 2, 2)
        ``lam^T`` as ``[n, 0, p, q]``: how the carry passes a whole chunk.
    groups : int
        G, the most chunks whose carries :attr:`carries` gives in closed form.
    carries : (N, G, 2, G, 2)
        ``[n, c', q, c, p]``: part ``p`` of ``lam^(T (c - 1 - c'))`` acting on part ``q`` for
        ``c' < c``, else 0, so that the carry into chunk ``c`` is
        ``sum_{c', q} ends[c', q] carries[n, c', q, c, p]`` from the chunks' zero-carry last
        states ``ends``: no loop over up to G chunks.
    """

    def __init__(self, w: LRUWeights, chunk: int) -> None:
        n, t = w.state_dim, int(chunk)
        lam = w.lam_re.astype(np.float64) + 1j * w.lam_im.astype(np.float64)  # (N,)
        powers = np.empty((t + 1, n), np.complex128)  # lam^k, k = 0 .. T
        powers[0] = 1.0
        for k in range(1, t + 1):
            powers[k] = powers[k - 1] * lam
        lag = np.arange(t)[:, None] - np.arange(t)[None, :]  # (T, T)  t - s
        toeplitz = np.where((lag >= 0)[..., None], powers[np.clip(lag, 0, None)], 0)  # (T, T, N)
        self.chunk, self.state_dim = t, n
        blocks = _rot(toeplitz)  # (T, T, N, 2, 2)  [t, s, n, p, q]
        self.decay = blocks.transpose(2, 1, 4, 0, 3).reshape(n, 2 * t, 2 * t).astype(
            np.float32)  # [n, (s, q), (t, p)]
        self.carry_in = _rot(powers[1:]).transpose(1, 3, 0, 2).reshape(n, 2, 2 * t).astype(
            np.float32)  # (T, N, 2, 2) [t, n, p, q] -> [n, q, (t, p)]
        self.carry_step = _rot(powers[t])[:, None].astype(np.float32)  # (N, 1, 2, 2)
        self.groups = g = min(MAX_GROUPS, max(2, int(np.sqrt(MAX_CARRY_FLOATS / (4 * n)))))
        hops = np.empty((g, n), np.complex128)  # lam^(T j), j = 0 .. G-1
        hops[0] = 1.0
        for j in range(1, g):
            hops[j] = hops[j - 1] * powers[t]
        lag = np.arange(g)[None, :] - 1 - np.arange(g)[:, None]  # (G, G)  c - 1 - c'
        between = np.where((lag >= 0)[..., None], hops[np.clip(lag, 0, None)], 0)  # (G, G, N)
        self.carries = _rot(between).transpose(2, 0, 4, 1, 3).astype(
            np.float32)  # [c', c, n, p, q] -> [n, c', q, c, p]
        self.b_cat = np.concatenate([w.b_re, w.b_im], axis=1)  # (H, 2N)
        self.c_cat = np.concatenate([w.c_re, w.c_im], axis=0)  # (2N, H)


def lru_chunk(w: LRUWeights, chunk: int) -> LRUChunk:
    """:class:`LRUChunk` of ``w`` for chunk length ``chunk`` (>= 1).

    Examples
    --------
    >>> w = LRUWeights(lam_re=np.array([0.5], np.float32), lam_im=np.array([0.0], np.float32),
    ...                b_re=np.ones((1, 1), np.float32), b_im=np.zeros((1, 1), np.float32),
    ...                c_re=np.ones((1, 1), np.float32), c_im=np.zeros((1, 1), np.float32))
    >>> lru_chunk(w, 3).decay[0, ::2, ::2]  # real part [s, t]: 0.5^(t-s) for s <= t
    array([[1.  , 0.5 , 0.25],
           [0.  , 1.  , 0.5 ],
           [0.  , 0.  , 1.  ]], dtype=float32)
    """
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk=}")
    return LRUChunk(w, int(chunk))
