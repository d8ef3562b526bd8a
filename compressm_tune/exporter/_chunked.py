"""The chunked (matmul) form of an LRU layer: constants shared by the ONNX and TorchScript writers.

Inside a chunk of ``T`` tokens the diagonal recurrence ``x_t = lam * x_{t-1} + v_t`` unrolls to

    x_t = sum_{s <= t} lam^(t - s) v_s  +  lam^(t + 1) x_carry          (t = 0 .. T-1)

where ``x_carry`` is the last state of the previous chunk, which itself follows
``x_end = lam^T x_carry + x_{T-1}|zero carry``. So a chunk's states are one batched matmul with a
constant lower-triangular Toeplitz matrix per state, and only the carry walks the chunks. A
complex number ``z`` acts on ``(re, im)`` as the real 2x2 matrix ``[[re, -im], [im, re]]``, so
every matrix below is real and each complex product is one real ``MatMul``.

Powers of lambda are formed in float64 by repeated products of the float32 lambda that eager
torch uses (never ``exp(k log lam)``), so a pole at 0 stays exact and the only rounding is the
final cast to float32.
"""

from __future__ import annotations

import numpy as np

from compressm_tune.errors import ExportOptionError
from compressm_tune.exporter import _edge
from compressm_tune.exporter._weights import LRUWeights, SelectiveWeights

__all__ = ["CHUNK_ARCHS", "CHUNK_CHOICES", "CHUNK_KEY", "LRUChunk", "check_chunk",
           "chunk_label", "lru_chunk", "max_chunk", "segment_sums"]

CHUNK_KEY = _edge.CHUNK_KEY  # ONNX metadata: "scan" or the chunk length T
CHUNK_ARCHS = ("lru", "selective")  # layers with a chunked sequence graph

CHUNK_CHOICES = (8, 16, 32, 64)  # chunk lengths the export measures (see _chunk_choice)
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
                                f"not {arch!r}; use chunk=None (--chunk scan)")
    return int(chunk)


def max_chunk(layer: LRUWeights | SelectiveWeights) -> int:
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
    if isinstance(layer, SelectiveWeights):
        size = layer.a.size  # H * N
        fits = [t for t in CHUNK_CHOICES if t * t * size <= MAX_SEGMENT_FLOATS]
    else:
        fits = [t for t in CHUNK_CHOICES if layer.state_dim * 4 * t * t <= MAX_DECAY_FLOATS]
    return max(fits) if fits else min(CHUNK_CHOICES)


def segment_sums(chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Constants of a selective chunk: ``sums (T*T, T)`` and ``keep (T, T, 1, 1)``.

    ``(sums @ delta)[(t, s)] = sum_{s < r <= t} delta_r``, the step sizes from token ``s`` to
    token ``t``, added term by term rather than as a difference of cumulative sums, whose
    cancellation would cost precision in ``exp(A * sum)``; ``keep`` is 1 where ``s <= t``.

    Examples
    --------
    >>> sums, keep = segment_sums(3)
    >>> (sums @ np.array([1.0, 2.0, 4.0])).reshape(3, 3)  # [t, s]
    array([[0., 0., 0.],
           [2., 0., 0.],
           [6., 4., 0.]])
    """
    t = np.arange(chunk)
    r = t[None, None, :]
    sums = (t[None, :, None] < r) & (r <= t[:, None, None])  # (T, T, T)  [t, s, r]
    keep = (t[None, :] <= t[:, None]).astype(np.float32)[:, :, None, None]  # (T, T, 1, 1)
    return sums.reshape(chunk * chunk, chunk).astype(np.float32), keep


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
