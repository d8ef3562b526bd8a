"""A small helper for writing ONNX graphs by hand: unique names, constants, composite layers.

Shared by the per-token graphs (:mod:`._onnx_graph`) and the chunked ones (:mod:`._onnx_chunked`),
so both write the same block arithmetic (BatchNorm fold, GELU, GLU, residual).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compressm_tune.exporter._weights import BlockWeights, ModelWeights, SelectiveWeights

__all__ = ["Graph"]


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
        delta = self.op("Softplus", [self.linear(low, w.dt_up, w.dt_bias, "dt_up")], "delta")
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
