"""Chunked sequence graphs: a layer's states from a few large ops per chunk of ``T`` tokens.

The per-token ``Scan`` of :mod:`._onnx_graph` pays onnxruntime's per-iteration cost L times per
block, which at small widths dwarfs the O(N H) arithmetic (bench_results/export_latency.md), so
a smaller state bought almost no latency. Here the sequence is padded at the end to ``C * T``
tokens (padding is causal: it never reaches an earlier token, and the outputs are cut back to
``L`` before pooling) and each block computes

* LRU (:class:`ChunkedLRU`): the states of every chunk at once with one batched ``MatMul`` by
  the constant decay matrix of :class:`._chunked.LRUChunk`; then, only when there is more than
  one chunk (an ``If``), the carry into each chunk from the chunks' last states, in closed form
  (one ``MatMul`` by a corner of a constant chunk-to-chunk matrix) for up to G chunks and from
  a ``Scan`` over the chunks (three nodes per iteration) beyond, and its effect on every token
  in one more ``MatMul``. A sequence of at most ``T`` tokens runs no loop at all; memory is
  O(L N), as for the per-token Scan.
* selective (:class:`ChunkedSelective`): a ``Scan`` over the C chunks whose body computes a
  chunk's outputs and last state from segment sums of the step sizes (Mamba-2's SSD form);
  memory per iteration O(T^2 H N), bounded by the choice of T.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from compressm_tune.exporter._chunked import lru_chunk, segment_sums
from compressm_tune.exporter._onnx_ops import Graph
from compressm_tune.exporter._weights import BlockWeights, LRUWeights, SelectiveWeights

__all__ = ["RECURRENCE", "ChunkFrame", "ChunkedLRU", "ChunkedSelective"]

_FLOAT = TensorProto.FLOAT
# Name prefix of MatMuls whose constant is part of the recurrence (powers of lambda), not a
# projection: int8 quantization must leave them float32 (``_quantize``).
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

    Inside a chunk, with ``seg[t, s] = sum_{s < r <= t} delta_r`` (:func:`segment_sums`) and
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
        sums, keep = segment_sums(frame.chunk)
        self.a = g.const(f"a{k}", w.a)  # (H, N)
        self.sums, self.keep = g.const(f"sums{k}", sums), g.const(f"keep{k}", keep)

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

        seg = sub.op("Reshape", [sub.op("MatMul", [self.sums, delta]), sub.const(
            "shape", np.array([-1, t, t, h, 1], np.int64))])  # (B, T, T, H, 1)
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
