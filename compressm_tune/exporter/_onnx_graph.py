"""Build the ONNX graphs of an LRU network directly from its weights with ``onnx.helper``.

Why not ``torch.onnx.export``: ``LRULayer.forward`` runs its recurrence through an autograd
Function backed by a C kernel, which no exporter can see through, so an export needs a second,
export-only forward anyway. Torch 2.13's dynamo exporter does lower
``torch._higher_order_ops.scan`` to an ONNX ``Scan`` (checked while writing this module), but
that is a private API, a trace takes ~10 s even for a toy module, and the result depends on the
exporter's decompositions and optimizer passes. Writing the graph by hand from the weights
(:mod:`._weights`) is exact, takes milliseconds, works for every opset in
:data:`SUPPORTED_OPSETS`, and every node is one of a handful of well-supported operators:

* encoder, B, C, GLU and head projections: ``MatMul`` + ``Add`` over all time steps at once;
* BatchNorm folded to ``Mul`` + ``Add`` with the running statistics;
* exact GELU as ``0.5 * y * (1 + Erf(y / sqrt 2))`` (torch's default GELU);
* the diagonal complex recurrence in real arithmetic (re/im as two tensors) inside one ``Scan``
  per block, whose body is eight element-wise ops, so the graph's size does not depend on the
  sequence length, and batch and length are both dynamic;
* mean pooling as ``ReduceMean`` over time.

The streaming graph is the same arithmetic for one token, with the states as explicit inputs
and outputs in :meth:`SSMModel.allocate_state`'s layout: ``(batch, N_k, 2)`` per block, then,
with mean pooling, the running sum ``(batch, H)`` and the token count ``(1,)``.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compressm_tune.errors import ExportError
from compressm_tune.exporter._errors import ExportOptionError
from compressm_tune.exporter._weights import BlockWeights, ModelWeights

__all__ = [
    "DEFAULT_OPSET",
    "SUPPORTED_OPSETS",
    "build_sequence_model",
    "build_step_model",
    "check_opset",
    "step_io_names",
]

# Scan with scan_*_axes, Unsqueeze with axes as an input and Erf all exist from opset 13;
# the top is the newest opset this builder and onnxruntime 1.31 were tested with.
SUPPORTED_OPSETS = range(13, 25)
DEFAULT_OPSET = 17  # onnxruntime >= 1.14 reads it: most edge installs

_FLOAT = TensorProto.FLOAT


def check_opset(opset: int) -> int:
    """Return ``opset`` if the builder supports it, else raise :class:`ExportOptionError`.

    Examples
    --------
    >>> check_opset(17)
    17
    """
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or (
            opset not in SUPPORTED_OPSETS):
        lo, hi = SUPPORTED_OPSETS[0], SUPPORTED_OPSETS[-1]
        raise ExportOptionError(f"opset must be an integer in [{lo}, {hi}], got {opset=}")
    return int(opset)


def step_io_names(n_blocks: int, pooling: str) -> tuple[list[str], list[str]]:
    """Input and output names of the streaming graph, in order.

    Examples
    --------
    >>> step_io_names(2, "mean")
    (['x_t', 'state_0', 'state_1', 'pool_sum', 'pool_count'], ['y_t', 'next_state_0', \
'next_state_1', 'next_pool_sum', 'next_pool_count'])
    """
    states = [f"state_{k}" for k in range(n_blocks)]
    if pooling == "mean":
        states += ["pool_sum", "pool_count"]
    return ["x_t", *states], ["y_t", *[f"next_{s}" for s in states]]


class _Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

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
        """Exact GELU, ``0.5 * x * (1 + erf(x / sqrt(2)))``."""
        inv_sqrt2 = self.const("inv_sqrt2", np.array(1.0 / math.sqrt(2.0), np.float32))
        half = self.const("half", np.array(0.5, np.float32))
        one = self.const("one", np.array(1.0, np.float32))
        erf = self.op("Erf", [self.op("Mul", [x, inv_sqrt2])])
        return self.op("Mul", [self.op("Mul", [x, half]), self.op("Add", [erf, one])], "gelu")

    def block_tail(self, x: str, hn: str, s_re: str, s_im: str, w: BlockWeights) -> str:
        """``x + GLU(GELU(Re(C s) + D hn))`` given the block's states (any leading dims)."""
        y = self.op("Add", [self.linear(s_re, w.c_re, None, "c_re"),
                            self.linear(s_im, w.c_im, None, "c_im")])
        y = self.op("Add", [y, self.op("Mul", [hn, self.const("d", w.d)])], "lru_out")
        g = self.gelu(y)
        a = self.linear(g, w.glu_a, w.glu_a_bias, "glu_a")
        gate = self.op("Sigmoid", [self.linear(g, w.glu_b, w.glu_b_bias, "glu_b")])
        return self.op("Add", [x, self.op("Mul", [a, gate])], "block_out")

    def recurrence(self, s_re: str, s_im: str, v_re: str, v_im: str, lam_re: str, lam_im: str,
                   outputs: list[str] | None = None) -> tuple[str, str]:
        """``s' = lam * s + v`` in re/im arithmetic (element-wise, any leading dims)."""
        re = self.op("Sub", [self.op("Mul", [lam_re, s_re]), self.op("Mul", [lam_im, s_im])])
        im = self.op("Add", [self.op("Mul", [lam_re, s_im]), self.op("Mul", [lam_im, s_re])])
        out_re, out_im = outputs or (None, None)
        new_re = self.op("Add", [re, v_re], "s_re", outputs=[out_re] if out_re else None)
        new_im = self.op("Add", [im, v_im], "s_im", outputs=[out_im] if out_im else None)
        return new_re, new_im


def _finish(g: _Graph, name: str, inputs, outputs, opset: int, doc: str,
            metadata: dict[str, str]) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.initializers)
    opset_id = helper.make_opsetid("", opset)
    model = helper.make_model(graph, opset_imports=[opset_id], producer_name="compressm-tune",
                              doc_string=doc)
    model.ir_version = helper.find_min_ir_version_for([opset_id])
    helper.set_model_props(model, metadata)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # the builder's own bug, not the user's: say so
        raise ExportError(f"built an invalid ONNX graph ({name}, opset {opset}): {exc}") from exc
    return model


def _metadata(w: ModelWeights, mode: str) -> dict[str, str]:
    return {"compressm.mode": mode, "compressm.state_dims": ",".join(map(str, w.state_dims)),
            "compressm.pooling": w.pooling}


def _scan_body(w: BlockWeights, lam_re: str, lam_im: str) -> onnx.GraphProto:
    """Scan body: states (s_re, s_im), scanned (v_re_t, v_im_t) -> states, per-step copies."""
    g = _Graph()
    s_re, s_im = g.recurrence("s_re_in", "s_im_in", "v_re_t", "v_im_t", lam_re, lam_im,
                              outputs=["s_re_out", "s_im_out"])
    g.op("Identity", [s_re], outputs=["x_re_t"])
    g.op("Identity", [s_im], outputs=["x_im_t"])
    n = w.state_dim

    def vi(name):
        return helper.make_tensor_value_info(name, _FLOAT, ["batch", n])

    inputs = [vi("s_re_in"), vi("s_im_in"), vi("v_re_t"), vi("v_im_t")]
    outputs = [vi("s_re_out"), vi("s_im_out"), vi("x_re_t"), vi("x_im_t")]
    return helper.make_graph(g.nodes, "lru_scan_body", inputs, outputs)


def build_sequence_model(w: ModelWeights, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The whole-sequence graph: ``x (batch, length, d_input)`` -> ``y``.

    ``y`` is ``(batch, d_output)`` with mean pooling, ``(batch, length, d_output)`` without.
    Batch and length are dynamic; the graph holds one ``Scan`` per block.
    """
    opset = check_opset(opset)
    g = _Graph()
    h = g.linear("x", w.encoder, w.encoder_bias, "encoder")  # (B, L, H)
    batch = g.op("Slice", [g.op("Shape", ["x"]),
                           g.const("zero", np.array([0], np.int64)),
                           g.const("one_i", np.array([1], np.int64))], "batch")  # (1,) int64
    for k, bw in enumerate(w.blocks):
        hn = g.affine(h, bw.bn_scale, bw.bn_shift, f"bn{k}")  # (B, L, H)
        v_re = g.linear(hn, bw.b_re, None, f"b_re{k}")  # (B, L, N)
        v_im = g.linear(hn, bw.b_im, None, f"b_im{k}")  # (B, L, N)
        zeros_shape = g.op("Concat", [batch, g.const("n", np.array([bw.state_dim], np.int64))],
                           axis=0)
        zeros = g.op("ConstantOfShape", [zeros_shape], "zeros",
                     value=numpy_helper.from_array(np.zeros(1, np.float32)))  # (B, N)
        lam_re, lam_im = g.const(f"lam_re{k}", bw.lam_re), g.const(f"lam_im{k}", bw.lam_im)
        _, _, s_re, s_im = g.op(
            "Scan", [zeros, zeros, v_re, v_im], f"scan{k}", n_out=4,
            body=_scan_body(bw, lam_re, lam_im), num_scan_inputs=2,
            scan_input_axes=[1, 1], scan_output_axes=[1, 1],
        )  # states (B, N) x2, then per-step states (B, L, N) x2
        h = g.block_tail(h, hn, s_re, s_im, bw)  # (B, L, H)
    if w.pooling == "mean":
        if opset >= 18:
            h = g.op("ReduceMean", [h, g.const("time_axis", np.array([1], np.int64))], "pool",
                     keepdims=0)
        else:
            h = g.op("ReduceMean", [h], "pool", axes=[1], keepdims=0)  # (B, H)
    g.op("Add", [g.linear(h, w.head, None, "head"), g.const("head_b", w.head_bias)],
         outputs=["y"])
    x_info = helper.make_tensor_value_info("x", _FLOAT, ["batch", "length", w.d_input])
    y_shape = ["batch", w.d_output] if w.pooling == "mean" else ["batch", "length", w.d_output]
    y_info = helper.make_tensor_value_info("y", _FLOAT, y_shape)
    doc = ("LRU network, sequence mode: x (batch, length, d_input), normalized as in "
           "manifest.json -> y")
    return _finish(g, "compressm_sequence", [x_info], [y_info], opset, doc,
                   _metadata(w, "sequence"))


def build_step_model(w: ModelWeights, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The streaming graph: one token and the states in, the output so far and new states out.

    Inputs ``x_t (batch, d_input)``, ``state_k (batch, N_k, 2)`` per block and, with mean
    pooling, ``pool_sum (batch, H)`` and ``pool_count (1,)``; outputs ``y_t (batch, d_output)``
    and ``next_<state>`` for each state (see :func:`step_io_names`). Zero states start a
    sequence; after the last token ``y_t`` equals the sequence graph's output.
    """
    opset = check_opset(opset)
    in_names, out_names = step_io_names(len(w.blocks), w.pooling)
    g = _Graph()
    h = g.linear("x_t", w.encoder, w.encoder_bias, "encoder")  # (B, H)
    idx_re = g.const("idx_re", np.array(0, np.int64))
    idx_im = g.const("idx_im", np.array(1, np.int64))
    last_axis = g.const("last_axis", np.array([2], np.int64))
    for k, bw in enumerate(w.blocks):
        state = f"state_{k}"  # (B, N, 2)
        hn = g.affine(h, bw.bn_scale, bw.bn_shift, f"bn{k}")  # (B, H)
        v_re = g.linear(hn, bw.b_re, None, f"b_re{k}")  # (B, N)
        v_im = g.linear(hn, bw.b_im, None, f"b_im{k}")  # (B, N)
        s_re = g.op("Gather", [state, idx_re], "s_re", axis=2)  # (B, N)
        s_im = g.op("Gather", [state, idx_im], "s_im", axis=2)  # (B, N)
        lam_re, lam_im = g.const(f"lam_re{k}", bw.lam_re), g.const(f"lam_im{k}", bw.lam_im)
        s_re, s_im = g.recurrence(s_re, s_im, v_re, v_im, lam_re, lam_im)  # (B, N) x2
        g.op("Concat", [g.op("Unsqueeze", [s_re, last_axis]),
                        g.op("Unsqueeze", [s_im, last_axis])], outputs=[f"next_{state}"],
             axis=2)  # (B, N, 2)
        h = g.block_tail(h, hn, s_re, s_im, bw)  # (B, H)
    if w.pooling == "mean":
        total = g.op("Add", ["pool_sum", h], outputs=["next_pool_sum"])  # (B, H)
        count = g.op("Add", ["pool_count", g.const("one", np.array([1.0], np.float32))],
                     outputs=["next_pool_count"])  # (1,)
        h = g.op("Div", [total, count], "pool")  # (B, H)
    g.op("Add", [g.linear(h, w.head, None, "head"), g.const("head_b", w.head_bias)],
         outputs=["y_t"])
    shapes = {"x_t": ["batch", w.d_input], "y_t": ["batch", w.d_output],
              "pool_sum": ["batch", w.d_model], "pool_count": [1]}
    for k, n in enumerate(w.state_dims):
        shapes[f"state_{k}"] = ["batch", n, 2]
    for name in list(shapes):
        shapes[f"next_{name}"] = shapes[name]
    inputs = [helper.make_tensor_value_info(n, _FLOAT, shapes[n]) for n in in_names]
    outputs = [helper.make_tensor_value_info(n, _FLOAT, shapes[n]) for n in out_names]
    doc = "LRU network, streaming mode: one token + states -> output so far + new states"
    return _finish(g, "compressm_step", inputs, outputs, opset, doc, _metadata(w, "step"))
