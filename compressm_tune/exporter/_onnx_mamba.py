"""The ONNX pieces of a Mamba block around its S6 core (:class:`MambaBlockWeights`).

The S6 core is the selective layer's writer (``_SelectiveWriter`` in :mod:`._onnx_graph`) on
the ``E`` inner channels; this module writes what surrounds it: RMSNorm, the two halves of
``in_proj``, the causal depthwise convolution, the ``D`` skip, the SiLU gate, ``out_proj``
and the residual.

* Sequence graph: the convolution is one ``Conv`` (``group = E``, ``pads = [K - 1, 0]``:
  causal) on the ``(batch, E, L)`` transpose.
* Streaming graph: the block's state ``(batch, E, K - 1 + N)`` is sliced into the last
  ``K - 1`` conv inputs and the S6 state; the conv is ``ReduceSum`` over the window
  ``[conv inputs, x_t]``, and the new state is ``Concat([window[1:], s6 state])``.
"""

from __future__ import annotations

import numpy as np

from compressm_tune.exporter._onnx_ops import Graph
from compressm_tune.exporter._weights import MambaBlockWeights

__all__ = ["MambaParts"]

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

    def step_input(self, g: Graph, h: str, state: str) -> tuple[str, str, str, str]:
        """One token ``h (B, H)`` and the block state -> ``xc (B, E)``, ``z``, the new conv
        inputs ``(B, E, K - 1)`` and the S6 state ``(B, E, N)``."""
        w = self.w
        x, z = self._in(g, h)
        keep = w.d_conv - 1

        def ints(*v: int) -> str:
            return g.const("idx", np.array(v, np.int64))

        axis = ints(2)
        conv_in = g.op("Slice", [state, ints(0), ints(keep), axis])  # (B, E, K - 1)
        s6 = g.op("Slice", [state, ints(keep), ints(_BIG), axis])  # (B, E, N)
        window = g.op("Concat", [conv_in, g.op("Unsqueeze", [x, ints(-1)])], axis=2)  # (B,E,K)
        xc = g.op("ReduceSum", [g.op("Mul", [window, g.const(f"conv{self.k}", w.conv)]),
                                ints(-1)], keepdims=0)  # (B, E)
        if w.conv_bias is not None:
            xc = g.op("Add", [xc, g.const(f"conv_b{self.k}", w.conv_bias)])
        rest = g.op("Slice", [window, ints(1), ints(_BIG), axis])  # (B, E, K - 1)
        return g.silu(xc), z, rest, s6

    def output(self, g: Graph, h: str, y: str, xc: str, z: str) -> str:
        """``h + out_proj((y + D xc) * silu(z))`` for the core's read-out ``y``."""
        w = self.w
        y = g.op("Add", [y, g.op("Mul", [xc, g.const("d", w.d)])], "ssm_out")
        y = g.op("Mul", [y, g.silu(z)], "gated")
        return g.op("Add", [h, g.linear(y, w.out_w, w.out_bias, "out_proj")], "block_out")
