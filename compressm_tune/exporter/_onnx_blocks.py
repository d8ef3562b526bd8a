"""ONNX building blocks shared by the graph builders of :mod:`._onnx`.

* :class:`Graph`: writes nodes by hand (unique names, constants) and the block arithmetic every
  graph shares (BatchNorm fold, GELU, GLU, residual, RMSNorm).
* :class:`MambaParts`: what surrounds a Mamba block's S6 core (the selective writer on its
  ``E`` inner channels): RMSNorm, ``in_proj``, the causal depthwise ``Conv`` (the streaming
  graph keeps the last ``K - 1`` conv inputs in the block state), the SiLU gate, ``out_proj``.
* Chunked sequence graphs (:class:`ChunkFrame`, :class:`ChunkedLRU`, :class:`ChunkedSelective`):
  the per-token ``Scan`` pays onnxruntime's per-iteration cost L times per block, which at small
  widths dwarfs the arithmetic. Here the sequence is padded at the end to ``C * T`` tokens
  (causal: outputs are cut back to ``L`` before pooling). LRU: every chunk's states in one
  batched ``MatMul`` by :class:`._weights.LRUChunk`'s decay matrix, then (only with more than one
  chunk, an ``If``) the carries, in closed form for up to G chunks and from a ``Scan`` over the
  chunks beyond; memory O(L N). Selective (also a Mamba block's S6 core, on its E channels): a
  ``Scan`` over chunks whose body uses segment sums of the step sizes (Mamba-2's SSD form, with a
  decay per channel and state); memory per iteration O(T^2 H N), bounded by T. Mamba-2's
  scalar decay per head makes its chunks matmuls (:mod:`._onnx_mamba2`).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compressm_tune.exporter._weights import (
    BlockWeights,
    LRUWeights,
    MambaBlockWeights,
    ModelWeights,
    SelectiveWeights,
    lru_chunk,
    segment_masks,
)

__all__ = ["RECURRENCE", "ChunkFrame", "ChunkedLRU", "ChunkedSelective", "Graph", "MambaParts"]


class Graph:
    """Accumulates nodes and initializers with unique names (``prefix`` keeps a Scan body's
    names apart from the outer graph's, which the body can see)."""

    def __init__(self, prefix: str = "") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.prefix = prefix
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, n_out: int = 1,
           outputs: list[str] | None = None, **attrs) -> str | list[str]:
        outs = outputs or [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs[0] if len(outs) == 1 else outs

    # -- composite layers ----------------------------------------------------------------------
    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray | None, hint: str) -> str:
        y = self.op("MatMul", [x, self.const(f"{hint}_w", weight)], f"{hint}_mm")
        return y if bias is None else self.op("Add", [y, self.const(f"{hint}_b", bias)], hint)

    def affine(self, x: str, scale: np.ndarray, shift: np.ndarray, hint: str) -> str:
        y = self.op("Mul", [x, self.const(f"{hint}_scale", scale)])
        return self.op("Add", [y, self.const(f"{hint}_shift", shift)], hint)

    def gelu(self, x: str) -> str:
        """Exact GELU, ``0.5 * x * (1 + erf(x / sqrt(2)))``, written in the order onnxruntime
        fuses into one ``Gelu`` kernel (with ``Mul`` by ``1/sqrt(2)`` it does not)."""
        sqrt2 = self.const("sqrt2", np.array(math.sqrt(2.0), np.float32))
        half = self.const("half", np.array(0.5, np.float32))
        one = self.const("one", np.array(1.0, np.float32))
        erf = self.op("Erf", [self.op("Div", [x, sqrt2])])
        return self.op("Mul", [self.op("Mul", [x, self.op("Add", [erf, one])]), half], "gelu")

    def softplus(self, x: str, hint: str = "softplus") -> str:
        """``log(1 + exp(x))`` as ``relu(x) + log(1 + exp(-|x|))``: no overflow, and
        onnxruntime's elementwise kernels run it about 5x faster than its own ``Softplus``
        (measured: 0.32 vs 1.52 ms on 256 x 512 floats, one thread, onnxruntime 1.31)."""
        tail = self.op("Exp", [self.op("Neg", [self.op("Abs", [x])])])
        tail = self.op("Log", [self.op("Add", [tail, self.const("one", np.float32(1.0))])])
        return self.op("Add", [self.op("Relu", [x]), tail], hint)

    def silu(self, x: str) -> str:
        """``x * sigmoid(x)``."""
        return self.op("Mul", [x, self.op("Sigmoid", [x])], "silu")

    def rms_norm(self, x: str, weight: np.ndarray, eps: float, hint: str) -> str:
        """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis (any leading dims). The
        mean is a ``MatMul`` with a ``(H, 1)`` column of ``1/H``: no opset-dependent
        ``ReduceMean`` signature."""
        h = len(weight)
        mean = self.op("MatMul", [self.op("Mul", [x, x]),
                                  self.const("inv_h", np.full((h, 1), 1.0 / h, np.float32))])
        root = self.op("Sqrt", [self.op("Add", [mean, self.const("eps", np.float32(eps))])])
        return self.op("Mul", [self.op("Div", [x, root]), self.const(f"{hint}_w", weight)], hint)

    def encode(self, x: str, w: ModelWeights) -> str:
        """The encoder: ``Gather`` from the embedding table for token ids, else a linear map."""
        if w.tokens:
            return self.op("Gather", [self.const("embedding", w.encoder), x], "encoder", axis=0)
        return self.linear(x, w.encoder, w.encoder_bias, "encoder")

    def zeros(self, batch: str, shape: tuple[int, ...]) -> str:
        """A float32 zero tensor ``(batch, *shape)``; ``batch`` is a ``(1,)`` int64 tensor."""
        full = self.op("Concat", [batch, self.const("shape", np.array(shape, np.int64))], axis=0)
        return self.op("ConstantOfShape", [full], "zeros",
                       value=numpy_helper.from_array(np.zeros(1, np.float32)))

    def selective_drive(self, w: SelectiveWeights, hn: str) -> list[str]:
        """A selective layer's inputs for every token: delta, delta * hn ``(..., H)``, B_t and
        C_t ``(..., N)``."""
        low = self.linear(hn, w.dt_down, None, "dt_down")  # (..., R)
        delta = self.softplus(self.linear(low, w.dt_up, w.dt_bias, "dt_up"), "delta")
        delta_u = self.op("Mul", [delta, hn], "delta_u")  # (..., H)
        b_t = self.linear(hn, w.b_proj, None, "b_t")  # (..., N)
        c_t = self.linear(hn, w.c_proj, None, "c_t")  # (..., N)
        return [delta, delta_u, b_t, c_t]

    def block_tail(self, x: str, hn: str | None, y: str, w: BlockWeights) -> str:
        """``x + GLU(GELU(y + D hn))`` given the layer's read-out ``y`` (any leading dims);
        ``hn=None``: ``y`` already holds ``D hn``."""
        if hn is not None:
            y = self.op("Add", [y, self.op("Mul", [hn, self.const("d", w.d)])], "ssm_out")
        g = self.gelu(y)
        a = self.linear(g, w.glu_a, w.glu_a_bias, "glu_a")
        gate = self.op("Sigmoid", [self.linear(g, w.glu_b, w.glu_b_bias, "glu_b")])
        return self.op("Add", [x, self.op("Mul", [a, gate])], "block_out")


_BIG = np.iinfo(np.int64).max  # Slice end meaning "to the end"


class MambaParts:
    """Graph pieces of one Mamba block ``k``; ``w`` its weights."""

    def __init__(self, g: Graph, w: MambaBlockWeights, k: int) -> None:
        self.w, self.k = w, k

    def _in(self, g: Graph, h: str) -> tuple[str, str]:
        """RMSNorm, then ``in_proj``'s halves: ``x``, ``z`` ``(..., E)``."""
        w = self.w
        hn = g.rms_norm(h, w.norm, w.eps, f"norm{self.k}")
        return g.linear(hn, w.in_x, w.in_x_bias, "in_x"), g.linear(hn, w.in_z, w.in_z_bias, "in_z")

    def sequence_input(self, g: Graph, h: str) -> tuple[str, str]:
        """``h (B, L, H)`` -> the S6 core's input ``xc (B, L, E)`` and the gate ``z``."""
        w = self.w
        x, z = self._in(g, h)
        e, kernel = w.conv.shape
        xt = g.op("Transpose", [x], perm=[0, 2, 1])  # (B, E, L)
        inputs = [xt, g.const(f"conv{self.k}", w.conv.reshape(e, 1, kernel))]
        if w.conv_bias is not None:
            inputs.append(g.const(f"conv_b{self.k}", w.conv_bias))
        conv = g.op("Conv", inputs, "conv", group=e, kernel_shape=[kernel],
                    pads=[kernel - 1, 0])  # (B, E, L): causal
        return g.silu(g.op("Transpose", [conv], perm=[0, 2, 1])), z

    def step_input(self, g: Graph, h: str, state: str | tuple[str, str]
                   ) -> tuple[str, str, str, str]:
        """One token ``h (B, H)`` and the block state -> ``xc (B, E)``, ``z``, the new conv
        window and the S6 state ``(B, E, N)``.

        ``state``: one tensor ``(B, E, K - 1 + N)`` (the last ``K - 1`` conv inputs, then the
        S6 state; the new window is then ``(B, E, K - 1)``), or, as ``transformers``' cache
        holds it, the pair ``(conv (B, E, K), ssm (B, E, N))`` with the last ``K`` conv inputs
        (the oldest is dropped; the new window ``(B, E, K)`` ends with this token's input).
        """
        w = self.w
        x, z = self._in(g, h)
        keep = w.d_conv - 1

        def ints(*v: int) -> str:
            return g.const("idx", np.array(v, np.int64))

        axis = ints(2)
        if isinstance(state, tuple):
            conv_state, s6 = state
            conv_in = g.op("Slice", [conv_state, ints(1), ints(_BIG), axis])  # (B, E, K - 1)
        else:
            conv_in = g.op("Slice", [state, ints(0), ints(keep), axis])  # (B, E, K - 1)
            s6 = g.op("Slice", [state, ints(keep), ints(_BIG), axis])  # (B, E, N)
        window = g.op("Concat", [conv_in, g.op("Unsqueeze", [x, ints(-1)])], axis=2)  # (B,E,K)
        xc = g.op("ReduceSum", [g.op("Mul", [window, g.const(f"conv{self.k}", w.conv)]),
                                ints(-1)], keepdims=0)  # (B, E)
        if w.conv_bias is not None:
            xc = g.op("Add", [xc, g.const(f"conv_b{self.k}", w.conv_bias)])
        if isinstance(state, tuple):
            return g.silu(xc), z, window, s6
        rest = g.op("Slice", [window, ints(1), ints(_BIG), axis])  # (B, E, K - 1)
        return g.silu(xc), z, rest, s6

    def output(self, g: Graph, h: str, y: str, xc: str, z: str) -> str:
        """``h + out_proj((y + D xc) * silu(z))`` for the core's read-out ``y``."""
        w = self.w
        y = g.op("Add", [y, g.op("Mul", [xc, g.const("d", w.d)])], "ssm_out")
        y = g.op("Mul", [y, g.silu(z)], "gated")
        return g.op("Add", [h, g.linear(y, w.out_w, w.out_bias, "out_proj")], "block_out")


_FLOAT = TensorProto.FLOAT
# Name prefix of MatMuls whose constant is part of the recurrence (powers of lambda), not a
# projection: int8 quantization must leave them float32 (:func:`._onnx.quantize_file`).
RECURRENCE = "recurrence_"


class ChunkFrame:
    """The padded sequence every chunked block shares: ``x (B, L, d)`` -> ``(B*C*T, d)``
    (token ids ``(B, L)`` -> ``(B*C*T,)``, padded with id 0, cut off again by :meth:`cut`).

    Tokens stay flattened to 2-D between the blocks, so onnxruntime fuses each projection's
    ``MatMul + Add`` into one ``Gemm`` (it does not for 3-D inputs). Holds the int64 ``(1,)``
    tensors ``batch``, ``length`` and ``chunks`` (C) and the bool ``multi`` (C > 1), so each
    block reads them instead of recomputing them.
    """

    def __init__(self, g: Graph, x: str, chunk: int, d_input: int, tokens: bool = False
                 ) -> None:
        self.chunk = chunk
        shape = g.op("Shape", [x])
        zero, one, two = (g.const("int", np.array([i], np.int64)) for i in (0, 1, 2))
        self.batch = g.op("Slice", [shape, zero, one], "batch")  # (1,)
        self.length = g.op("Slice", [shape, one, two], "length")  # (1,)
        up = g.op("Add", [self.length, g.const("t_minus_1", np.array([chunk - 1], np.int64))])
        self.chunks = g.op("Div", [up, g.const("t", np.array([chunk], np.int64))], "chunks")
        padded = g.op("Mul", [self.chunks, g.const("t", np.array([chunk], np.int64))])
        pad = g.op("Sub", [padded, self.length], "pad")  # (1,)  0 .. T-1 tokens
        # Pad's [begins..., ends...]: only the time axis' end, (B, C*T[, d]) zeros at the end
        ends = [pad] if tokens else [pad, zero]
        pads = g.op("Concat", [g.const("pads_head", np.zeros(3 if tokens else 4, np.int64)),
                               *ends], axis=0)
        padded = g.op("Pad", [x, pads], "x_padded")
        flat = [-1] if tokens else [-1, d_input]
        self.x = g.op("Reshape", [padded, g.const("shape", np.array(flat, np.int64))])
        self.multi = g.op("Greater", [self.chunks, one], "multi_chunk")  # (1,) bool
        # shapes of the closed-form carries, shared by every block ("0" keeps N)
        self.rows_shape = g.op("Concat", [zero, self.batch, g.const("int", np.array(
            [-1], np.int64))], axis=0)  # [0, B, -1]
        self.corner_end = g.op("Concat", [self.chunks, self.chunks], axis=0)  # [C, C]
        square = g.op("Mul", [self.chunks, two])
        self.corner_shape = g.op("Concat", [zero, square, square], axis=0)  # [0, 2C, 2C]

    def cut(self, g: Graph, h: str, width: int) -> str:
        """``(B*C*T, width)`` -> the real tokens ``(B, L, width)``."""
        shape = g.op("Concat", [self.batch, g.const("shape", np.array([-1, width], np.int64))],
                     axis=0)
        h = g.op("Reshape", [h, shape])  # (B, C*T, width)
        return g.op("Slice", [h, g.const("zero_i", np.array([0], np.int64)), self.length,
                              g.const("time_axis", np.array([1], np.int64))], "unpadded")


def _subgraph(g: Graph, name: str, inputs: list[onnx.ValueInfoProto],
              outputs: list[onnx.ValueInfoProto]) -> onnx.GraphProto:
    return helper.make_graph(g.nodes, name, inputs, outputs, g.initializers)


def _info(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, _FLOAT, shape)


class ChunkedLRU:
    """One LRU layer over the padded, flattened sequence.

    Layout: the drive ``(B*C*T, 2N)`` is regrouped to ``(N, B*C, 2T)`` (one matrix per
    state, columns ``(t, part)``) by one 2-D transpose, so a chunk's states are
    ``v[n] @ decay[n]``, one batched ``MatMul`` for every chunk at once.
    """

    def __init__(self, g: Graph, w: LRUWeights, k: int, frame: ChunkFrame) -> None:
        c = lru_chunk(w, frame.chunk)
        self.n, self.t, self.k, self.frame = c.state_dim, c.chunk, k, frame
        self.b_cat, self.c_cat = c.b_cat, c.c_cat  # (H, 2N), (2N, H): folded in block()
        self.decay = g.const(f"decay{k}", c.decay)  # (N, 2T, 2T)
        self.carry_in = g.const(f"carry_in{k}", c.carry_in)  # (N, 2, 2T)
        self.carry_step = g.const(f"carry_step{k}", c.carry_step)  # (N, 1, 2, 2)
        self.groups = c.groups
        self.carries = g.const(f"carries{k}", c.carries)  # (N, G, 2, G, 2)
        self.few = g.op("LessOrEqual", [frame.chunks, g.const(
            "groups", np.array([c.groups], np.int64))], "few_chunks")  # (1,) bool: C <= G

    def block(self, g: Graph, h: str, bw: BlockWeights) -> str:
        """The block input ``h (B*C*T, H)`` -> ``Re(C x) + D hn`` ``(B*C*T, H)``, with the
        BatchNorm folded into the projections: ``hn @ b_cat = h @ (scale b_cat) + shift @
        b_cat`` and ``D hn = (D scale) h + D shift`` (two nodes fewer per block than
        normalizing first; measured 2-7 % faster at N = 16, 32, L = 40)."""
        n, t = self.n, self.t
        scale, shift = bw.bn_scale, bw.bn_shift
        v = g.linear(h, scale[:, None] * self.b_cat, shift @ self.b_cat,
                     "v")  # (B*C*T, 2N), columns (part, n)
        v = g.op("Reshape", [v, g.const("shape", np.array([-1, n], np.int64))])
        v = g.op("Transpose", [v], perm=[1, 0])  # (N, B*C*T*2)
        v = g.op("Reshape", [v, g.const("shape", np.array([n, -1, 2 * t], np.int64))])
        x = g.op("MatMul", [v, self.decay], "x_local",
                 name=f"{RECURRENCE}decay{self.k}")  # (N, B*C, 2T), zero carry
        x = g.op("If", [self.frame.multi], f"x{self.k}",
                 then_branch=self._carried(x), else_branch=self._alone(x))
        x = g.op("Reshape", [x, g.const("shape", np.array([n, -1], np.int64))])
        x = g.op("Transpose", [x], perm=[1, 0])  # (B*C*T*2, N)
        x = g.op("Reshape", [x, g.const("shape", np.array([-1, 2 * n], np.int64))])
        y = g.linear(x, self.c_cat, bw.d * shift, "y")  # (B*C*T, H): Re(C x) + D shift
        return g.op("Add", [y, g.op("Mul", [h, g.const("d_scale", bw.d * scale)])], "ssm_out")

    def _alone(self, x: str) -> onnx.GraphProto:
        """One chunk: nothing carries in."""
        sub = Graph(prefix=f"alone{self.k}_")
        out = sub.op("Identity", [x], "x")
        return _subgraph(sub, f"alone{self.k}", [], [_info(out, [self.n, "bc", 2 * self.t])])

    def _carried(self, x: str) -> onnx.GraphProto:
        """Several chunks: each token gains ``lam^(t+1)`` times the carry into its chunk, which
        depends on the chunks' zero-carry last states ``ends``: in closed form for up to G
        chunks (:attr:`LRUChunk.carries`), else from a Scan over the chunks."""
        n, t, k = self.n, self.t, self.k
        sub = Graph(prefix=f"carry{k}_")
        x4 = sub.op("Reshape", [x, sub.const("shape", np.array([n, -1, t, 2], np.int64))])
        ends = sub.op("Gather", [x4, sub.const("last", np.array(t - 1, np.int64))],
                      axis=2)  # (N, B*C, 2)
        carries = sub.op("If", [self.few], "carries", then_branch=self._closed(ends),
                         else_branch=self._scanned(ends))  # (N, B*C, 2): carry into each chunk
        effect = sub.op("MatMul", [carries, self.carry_in], "effect",
                        name=f"{RECURRENCE}carry_in{k}")  # (N, B*C, 2T)
        out = sub.op("Add", [x, effect], "x")
        return _subgraph(sub, f"carried{k}", [], [_info(out, [n, "bc", 2 * t])])

    def _closed(self, ends: str) -> onnx.GraphProto:
        """Carries of up to G chunks: one ``MatMul`` by the top-left ``(2C, 2C)`` corner of
        the chunk-to-chunk matrix."""
        n, k, frame = self.n, self.k, self.frame
        sub = Graph(prefix=f"closed{k}_")
        rows = sub.op("Reshape", [ends, frame.rows_shape], "ends")  # (N, B, 2C), (c, q)
        corner = sub.op("Slice", [self.carries, sub.const("zeros", np.array([0, 0], np.int64)),
                                  frame.corner_end, sub.const("axes", np.array([1, 3], np.int64))])
        corner = sub.op("Reshape", [corner, frame.corner_shape])  # (N, 2C, 2C)
        carried = sub.op("MatMul", [rows, corner], "carried")  # (N, B, 2C), ordered (c, p)
        out = sub.op("Reshape", [carried, sub.const("shape", np.array([n, -1, 2], np.int64))])
        return _subgraph(sub, f"closed{k}", [], [_info(out, [n, "bc", 2])])

    def _scanned(self, ends: str) -> onnx.GraphProto:
        """Carries of more than G chunks: a Scan over the chunks."""
        n, k, frame = self.n, self.k, self.frame
        sub = Graph(prefix=f"scanned{k}_")
        ends_shape = sub.op("Concat", [sub.const("n", np.array([n], np.int64)), frame.batch,
                                       sub.const("shape", np.array([-1, 2], np.int64))], axis=0)
        ends = sub.op("Reshape", [ends, ends_shape], "ends")  # (N, B, C, 2)
        zeros_shape = sub.op("Concat", [sub.const("n", np.array([n], np.int64)), frame.batch,
                                        sub.const("two", np.array([2], np.int64))], axis=0)
        zeros = sub.op("ConstantOfShape", [zeros_shape], "zeros",
                       value=onnx.numpy_helper.from_array(np.zeros(1, np.float32)))
        _, carries = sub.op("Scan", [zeros, ends], "carries", n_out=2, body=self._body(),
                            num_scan_inputs=1, scan_input_axes=[2], scan_output_axes=[2])
        out = sub.op("Reshape", [carries, sub.const("shape", np.array([n, -1, 2], np.int64))])
        return _subgraph(sub, f"scanned{k}", [], [_info(out, [n, "bc", 2])])

    def _body(self) -> onnx.GraphProto:
        """carry, chunk end ``(N, B, 2)`` -> ``lam^T carry + end``, and the old carry."""
        sub = Graph(prefix=f"chunkscan{self.k}_")
        carry, end = f"chunkscan{self.k}_carry", f"chunkscan{self.k}_end"
        column = sub.op("Unsqueeze", [carry, sub.const("axes", np.array([2], np.int64))])
        turned = sub.op("ReduceSum", [sub.op("Mul", [self.carry_step, column]),  # (N,B,2,2)
                                      sub.const("axes", np.array([3], np.int64))], keepdims=0)
        new = sub.op("Add", [turned, end], "new")  # (N, B, 2)
        emit = sub.op("Identity", [carry], "emit")
        dims = [self.n, "batch", 2]
        return _subgraph(sub, f"chunkscan{self.k}", [_info(carry, dims), _info(end, dims)],
                         [_info(new, dims), _info(emit, dims)])


class ChunkedSelective:
    """One selective layer over the padded, flattened sequence: a ``Scan`` over the C chunks
    (not the L tokens) with the state ``x (B, H, N)`` as carry.

    Inside a chunk, with ``seg[t, s] = sum_{s < r <= t} delta_r`` (:func:`segment_masks`) and
    ``cum[t] = sum_{r <= t} delta_r`` (per channel h)::

        y_t = sum_{s <= t} du_s sum_n C_t[n] B_s[n] exp(A seg[t, s])     within the chunk
            + sum_n C_t[n] exp(A cum[t]) x_carry                            from the carry
        x_end = exp(A cum[T-1]) x_carry + sum_s exp(A seg[T-1, s]) du_s B_s

    (the Mamba-2 "SSD" form with a decay per channel and state). Memory per iteration is the
    ``(B, T, T, H, N)`` decays of one chunk, bounded by the choice of T (:func:`max_chunk`).
    """

    def __init__(self, g: Graph, w: SelectiveWeights, k: int, frame: ChunkFrame) -> None:
        self.w, self.k, self.frame, self.t = w, k, frame, frame.chunk
        self.h, self.n = w.state_shape
        later, keep = segment_masks(frame.chunk)
        self.a = g.const(f"a{k}", w.a)  # (H, N)
        self.later = g.const(f"later{k}", later[:, :, None])  # (T, T, 1)  [r, s]
        self.keep = g.const(f"keep{k}", keep[:, :, None, None])  # (T, T, 1, 1)  [t, s]

    def apply(self, g: Graph, hn: str) -> str:
        """``hn (B*C*T, H)`` -> the read-out ``(B*C*T, H)`` (without ``D``)."""
        h, n, t, frame = self.h, self.n, self.t, self.frame
        chunked = []
        for value, width in zip(g.selective_drive(self.w, hn), (h, h, n, n), strict=True):
            shape = g.op("Concat", [frame.batch, g.const("shape", np.array(
                [-1, t, width], np.int64))], axis=0)
            chunked.append(g.op("Reshape", [value, shape]))  # (B, C, T, width)
        zeros = g.op("ConstantOfShape", [g.op("Concat", [frame.batch, g.const(
            "shape", np.array([h, n], np.int64))], axis=0)], "zeros",
            value=onnx.numpy_helper.from_array(np.zeros(1, np.float32)))  # (B, H, N)
        _, y = g.op("Scan", [zeros, *chunked], f"chunks{self.k}", n_out=2, body=self._body(),
                    num_scan_inputs=4, scan_input_axes=[1] * 4, scan_output_axes=[1])
        return g.op("Reshape", [y, g.const("shape", np.array([-1, h], np.int64))], "y")

    def _body(self) -> onnx.GraphProto:
        """x (B, H, N) and one chunk's delta, du (B, T, H), B_t, C_t (B, T, N) -> new x and
        the chunk's read-out (B, T, H)."""
        h, n, t, k = self.h, self.n, self.t, self.k
        sub = Graph(prefix=f"chunk{k}_")
        names = [f"chunk{k}_{v}" for v in ("x", "delta", "du", "b", "c")]
        x, delta, du, b, c = names

        def axes(*values):
            return sub.const("axes", np.array(values, np.int64))

        steps = sub.op("Mul", [sub.op("Unsqueeze", [delta, axes(2)]), self.later])  # [r, s]
        seg = sub.op("Unsqueeze", [sub.op("CumSum", [steps, sub.const(
            "axis", np.array(1, np.int64))]), axes(4)])  # (B, T, T, H, 1)  [t, s]
        decay = sub.op("Mul", [sub.op("Exp", [sub.op("Mul", [seg, self.a])]),
                               self.keep], "decay")  # (B, T, T, H, N), 0 for s > t
        c_t = sub.op("Unsqueeze", [c, axes(2, 3)])  # (B, T, 1, 1, N)
        b_s = sub.op("Unsqueeze", [b, axes(1, 3)])  # (B, 1, T, 1, N)
        mix = sub.op("ReduceSum", [sub.op("Mul", [decay, sub.op("Mul", [c_t, b_s])]), axes(4)],
                     keepdims=0)  # (B, T, T, H)
        y_in = sub.op("ReduceSum", [sub.op("Mul", [mix, sub.op("Unsqueeze", [du, axes(1)])]),
                                    axes(2)], keepdims=0)  # (B, T, H)
        cum = sub.op("CumSum", [delta, sub.const("axis", np.array(1, np.int64))])  # (B, T, H)
        into = sub.op("Exp", [sub.op("Mul", [sub.op("Unsqueeze", [cum, axes(3)]),
                                             self.a])])  # (B, T, H, N)
        seen = sub.op("Mul", [into, sub.op("Unsqueeze", [x, axes(1)])])  # (B, T, H, N)
        y_carry = sub.op("ReduceSum", [sub.op("Mul", [seen, sub.op("Unsqueeze", [
            c, axes(2)])]), axes(3)], keepdims=0)  # (B, T, H)
        y = sub.op("Add", [y_in, y_carry], "y")
        last = sub.const("last", np.array(t - 1, np.int64))
        pushed = sub.op("Mul", [sub.op("Gather", [decay, last], axis=1),  # (B, T, H, N)
                                sub.op("Mul", [sub.op("Unsqueeze", [du, axes(3)]),
                                               sub.op("Unsqueeze", [b, axes(2)])])])
        new_x = sub.op("Add", [sub.op("Gather", [seen, last], axis=1),
                               sub.op("ReduceSum", [pushed, axes(1)], keepdims=0)], "x")
        ins = [_info(x, ["batch", h, n]), _info(delta, ["batch", t, h]),
               _info(du, ["batch", t, h]), _info(b, ["batch", t, n]), _info(c, ["batch", t, n])]
        return _subgraph(sub, f"chunk{k}", ins, [_info(new_x, ["batch", h, n]),
                                                _info(y, ["batch", t, h])])
