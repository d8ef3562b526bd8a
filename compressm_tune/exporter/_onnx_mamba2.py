"""ONNX pieces of a Mamba-2 block (:class:`._weights.Mamba2BlockWeights`).

With ``C = E + 2GN`` conv channels, ``nh`` heads of ``P`` channels in ``G`` groups of ``hg``
heads, the SSM state of a sequence is held as ``(G, hg, P, N)``, so a group's ``B_t``/``C_t``
broadcast over its heads without copies. Three forms of the recurrence share the projections,
the causal convolution and the gated, grouped RMSNorm:

* per-token ``Scan`` (:class:`Mamba2Parts` as a layer writer of :mod:`._onnx`: five nodes a
  step, ``S = exp(delta a) S + (delta x) B_t``, ``y = S C_t``);
* chunked (:meth:`Mamba2Parts.chunked`), the SSD form: a ``Scan`` over chunks of T tokens whose
  body is matmuls: the decays inside a chunk are one ``(T, T)`` matrix per head,
  ``L[t, s] = exp(sum_{s < r <= t} delta_r a)`` (segment sums, never a difference of cumulative
  sums), and ``y = (L * (C B^T)) (delta x) + exp(cum_t a) C S_carry``; the state carried to the
  next chunk is ``exp(cum_T a) S + (L[T-1] * delta x)^T B``; memory O(T^2 nh + T E N / P);
* one token (:meth:`Mamba2Parts.step`) on the streaming state: flat ``(batch, C (K - 1) + E N)``
  as :meth:`SSMModel.allocate_state`, or the pair ``transformers``' cache holds,
  ``conv (batch, C, K)`` and ``ssm (batch, nh, P, N)``.
"""

from __future__ import annotations

import numpy as np
import onnx

from compressm_tune.exporter._onnx_blocks import (
    _BIG,
    ChunkFrame,
    Graph,
    _info,
    _subgraph,
)
from compressm_tune.exporter._weights import Mamba2BlockWeights, segment_masks

__all__ = ["Mamba2Parts"]


class Mamba2Parts:
    """Graph pieces of Mamba-2 block ``k``; also the per-token ``Scan`` writer (``state_shapes``,
    ``drive_shapes``, ``emit_shapes``, ``drive``, ``update``, ``readout``) of :mod:`._onnx`."""

    def __init__(self, g: Graph, w: Mamba2BlockWeights, k: int) -> None:
        self.w, self.k = w, k
        self.e, self.nh, self.p, self.n = w.d_inner, w.n_heads, w.head_dim, w.state_dim
        self.groups = w.n_groups
        self.hg = self.nh // self.groups
        self.channels = int(w.conv.shape[0])
        self.a = g.const(f"a{k}", w.a)  # (nh,)
        gsz, n, hg, p = self.groups, self.n, self.hg, self.p
        self.state_shapes = [(gsz, hg, p, n)]
        self.drive_shapes = [(gsz, hg, 1, 1), (gsz, hg, p, 1), (gsz, 1, 1, n), (gsz, 1, n, 1)]
        self.emit_shapes = [(gsz, hg, p, 1)]

    def _ints(self, g: Graph, *values: int) -> str:
        return g.const("idx", np.array(values, np.int64))

    def _project(self, g: Graph, h: str) -> tuple[str, str, str]:
        """RMSNorm, then ``z (.., E)``, ``xBC (.., C)`` before the conv and ``dt (.., nh)``."""
        w = self.w
        hn = g.rms_norm(h, w.norm, w.eps, f"norm{self.k}")
        return (g.linear(hn, w.in_z, w.in_z_bias, "in_z"),
                g.linear(hn, w.in_xbc, w.in_xbc_bias, "in_xbc"),
                g.linear(hn, w.in_dt, w.in_dt_bias, "in_dt"))

    def _split(self, g: Graph, xbc: str, dt: str) -> tuple[str, str, str, str]:
        """Convolved, activated ``xBC`` -> ``x (.., E)``, ``B``, ``C`` ``(.., G N)`` and
        ``delta (.., nh)``."""
        e, gn, w = self.e, self.groups * self.n, self.w
        last = self._ints(g, -1)
        x, b, c = (g.op("Slice", [xbc, self._ints(g, lo), self._ints(g, hi), last])
                   for lo, hi in ((0, e), (e, e + gn), (e + gn, e + 2 * gn)))
        delta = g.softplus(g.op("Add", [dt, g.const(f"dt_bias{self.k}", w.dt_bias)]), "delta")
        if w.dt_limit is not None:
            lo, hi = (g.const("dt_limit", np.array(v, np.float32)) for v in w.dt_limit)
            delta = g.op("Clip", [delta, lo, hi], "delta")
        return x, b, c, delta

    def sequence_input(self, g: Graph, h: str) -> tuple[str, list[str]]:
        """``h (B, L, H)`` -> the gate ``z (B, L, E)`` and ``[x, B, C, delta]``."""
        z, xbc, dt = self._project(g, h)
        w, ch = self.w, self.channels
        kernel = w.d_conv
        inputs = [g.op("Transpose", [xbc], perm=[0, 2, 1]),  # (B, C, L)
                  g.const(f"conv{self.k}", w.conv.reshape(ch, 1, kernel))]
        if w.conv_bias is not None:
            inputs.append(g.const(f"conv_b{self.k}", w.conv_bias))
        conv = g.op("Conv", inputs, "conv", group=ch, kernel_shape=[kernel],
                    pads=[kernel - 1, 0])  # (B, C, L): causal
        xbc = g.silu(g.op("Transpose", [conv], perm=[0, 2, 1]))  # (B, L, C)
        return z, list(self._split(g, xbc, dt))

    # -- the per-token Scan writer -------------------------------------------------------------
    def drive(self, g: Graph, inputs: list[str], lead: int = 2) -> list[str]:
        """``[x, B, C, delta]`` with ``lead`` leading axes -> the decay ``(.., G, hg, 1, 1)``,
        ``delta x (.., G, hg, P, 1)``, ``B_t (.., G, 1, 1, N)``, ``C_t (.., G, 1, N, 1)``."""
        x, b, c, delta = inputs
        gsz, hg, p, n = self.groups, self.hg, self.p, self.n

        def shape(*dims: int) -> str:
            return self._ints(g, *([0] * lead), *dims)

        decay = g.op("Reshape", [g.op("Exp", [g.op("Mul", [delta, self.a])]),
                                 shape(gsz, hg, 1, 1)], "decay")
        heads = g.op("Reshape", [x, shape(self.nh, p)])  # (.., nh, P)
        dx = g.op("Mul", [heads, g.op("Unsqueeze", [delta, self._ints(g, -1)])])
        return [decay, g.op("Reshape", [dx, shape(gsz, hg, p, 1)], "dx"),
                g.op("Reshape", [b, shape(gsz, 1, 1, n)], "b_t"),
                g.op("Reshape", [c, shape(gsz, 1, n, 1)], "c_t")]

    def update(self, g: Graph, states: list[str], drive: list[str],
               outputs: list[str] | None = None) -> tuple[list[str], list[str]]:
        """``S' = decay S + (delta x) B_t`` on ``(batch, G, hg, P, N)``; emits ``S' C_t``."""
        (s,), (decay, dx, b_t, c_t) = states, drive
        s_out, y_out = outputs or (None, None)
        s = g.op("Add", [g.op("Mul", [decay, s]), g.op("Mul", [dx, b_t])], "s",
                 outputs=[s_out] if s_out else None)
        y = g.op("MatMul", [s, c_t], "y", outputs=[y_out] if y_out else None)
        return [s], [y]

    def readout(self, g: Graph, emitted: list[str], lead: int = 2) -> str:
        """``(.., G, hg, P, 1)`` -> ``(.., E)``."""
        return g.op("Reshape", [emitted[0], self._ints(g, *([0] * lead), self.e)])

    # -- chunked (SSD) ---------------------------------------------------------------------------
    def chunked(self, g: Graph, frame: ChunkFrame, inputs: list[str]) -> str:
        """``[x, B, C, delta]`` over the padded ``(B, C*T, ..)`` -> ``y (B, C*T, E)``."""
        x, b, c, delta = inputs
        t, nh, p, gsz, n = frame.chunk, self.nh, self.p, self.groups, self.n
        later, keep = segment_masks(t)
        self.later, self.keep = g.const(f"later{self.k}", later), g.const(f"keep{self.k}", keep)

        def chunks(value: str, *dims: int) -> str:  # (B, C*T, ..) -> (B, C, T, ..)
            shape = g.op("Concat", [frame.batch, self._ints(g, -1, t, *dims)], axis=0)
            return g.op("Reshape", [value, shape])

        heads = g.op("Reshape", [x, self._ints(g, 0, 0, nh, p)])  # (B, L, nh, P)
        dx = g.op("Mul", [heads, g.op("Unsqueeze", [delta, self._ints(g, -1)])])
        scanned = [chunks(g.op("Mul", [delta, self.a]), nh), chunks(dx, nh, p),
                   chunks(b, gsz, n), chunks(c, gsz, n)]
        zeros = g.op("ConstantOfShape", [g.op("Concat", [frame.batch, self._ints(
            g, gsz, self.hg, p, n)], axis=0)], "zeros",
            value=onnx.numpy_helper.from_array(np.zeros(1, np.float32)))
        _, y = g.op("Scan", [zeros, *scanned], f"ssd{self.k}", n_out=2, body=self._body(t),
                    num_scan_inputs=4, scan_input_axes=[1] * 4, scan_output_axes=[1])
        return g.op("Reshape", [y, self._ints(g, 0, -1, self.e)], "y")  # (B, C*T, E)

    def _body(self, t: int):
        """S (B, G, hg, P, N) and one chunk's ``delta a (B, T, nh)``, ``delta x (B, T, nh,
        P)``, ``B, C (B, T, G, N)`` -> the new S and the chunk's ``y (B, T, E)``."""
        k, gsz, hg, p, n, nh = self.k, self.groups, self.hg, self.p, self.n, self.nh
        sub = Graph(prefix=f"ssd{k}_")
        s, la, dx, b, c = (f"ssd{k}_{v}" for v in ("s", "la", "dx", "b", "c"))

        def ints(*values: int) -> str:
            return sub.const("idx", np.array(values, np.int64))

        la_t = sub.op("Transpose", [la], perm=[0, 2, 1])  # (B, nh, T)
        steps = sub.op("Mul", [sub.op("Unsqueeze", [la_t, ints(-1)]), self.later])  # [r, s]
        seg = sub.op("Reshape", [sub.op("CumSum", [steps, sub.const("axis", np.array(
            2, np.int64))]), ints(0, gsz, hg, t, t)])  # (B, G, hg, T, T)  [t, s]
        decay = sub.op("Mul", [sub.op("Exp", [seg]), self.keep], "decay")  # 0 for s > t
        cum = sub.op("Reshape", [sub.op("CumSum", [la_t, sub.const("axis", np.array(
            2, np.int64))]), ints(0, gsz, hg, t, 1)])  # (B, G, hg, T, 1)
        c_g = sub.op("Unsqueeze", [sub.op("Transpose", [c], perm=[0, 2, 1, 3]), ints(2)])
        b_g = sub.op("Unsqueeze", [sub.op("Transpose", [b], perm=[0, 2, 1, 3]), ints(2)])
        cb = sub.op("MatMul", [c_g, sub.op("Transpose", [b_g], perm=[0, 1, 2, 4, 3])])
        dx_g = sub.op("Reshape", [sub.op("Transpose", [dx], perm=[0, 2, 1, 3]),
                                  ints(0, gsz, hg, t, p)])  # (B, G, hg, T, P)
        y_in = sub.op("MatMul", [sub.op("Mul", [decay, cb]), dx_g])  # (B, G, hg, T, P)
        s_t = sub.op("Transpose", [s], perm=[0, 1, 2, 4, 3])  # (B, G, hg, N, P)
        y_carry = sub.op("Mul", [sub.op("Exp", [cum]), sub.op("MatMul", [c_g, s_t])])
        y = sub.op("Add", [y_in, y_carry])  # (B, G, hg, T, P)
        y = sub.op("Reshape", [sub.op("Transpose", [y], perm=[0, 3, 1, 2, 4]),
                               ints(0, 0, nh * p)], "y")  # (B, T, E)
        last = sub.const("last", np.array(t - 1, np.int64))
        to_end = sub.op("Unsqueeze", [sub.op("Gather", [decay, last], axis=3), ints(-1)])
        pushed = sub.op("MatMul", [sub.op("Transpose", [sub.op("Mul", [dx_g, to_end])],
                                          perm=[0, 1, 2, 4, 3]), b_g])  # (B, G, hg, P, N)
        kept = sub.op("Exp", [sub.op("Unsqueeze", [sub.op("Gather", [cum, last], axis=3),
                                                   ints(-1)])])  # (B, G, hg, 1, 1)
        new_s = sub.op("Add", [sub.op("Mul", [kept, s]), pushed], "s")
        ins = [_info(s, ["batch", gsz, hg, p, n]), _info(la, ["batch", t, nh]),
               _info(dx, ["batch", t, nh, p]), _info(b, ["batch", t, gsz, n]),
               _info(c, ["batch", t, gsz, n])]
        return _subgraph(sub, f"ssd{k}", ins, [_info(new_s, ["batch", gsz, hg, p, n]),
                                              _info(y, ["batch", t, nh * p])])

    # -- one token ---------------------------------------------------------------------------
    def step(self, g: Graph, h: str, state: str | tuple[str, str],
             outputs: list[str]) -> str:
        """One token ``h (B, H)`` -> the block output ``(B, H)``; the new state goes to
        ``outputs`` (one flat tensor, or ``[conv (B, C, K), ssm (B, nh, P, N)]`` for the
        pair ``state`` of ``transformers``' cache)."""
        w, ch, keep = self.w, self.channels, self.w.d_conv - 1
        z, xbc, dt = self._project(g, h)  # (B, E), (B, C), (B, nh)
        axis = self._ints(g, -1)
        if isinstance(state, tuple):
            conv_in = g.op("Slice", [state[0], self._ints(g, 1), self._ints(g, _BIG), axis])
            ssm = state[1]
        else:
            conv_in = g.op("Reshape", [g.op("Slice", [state, self._ints(g, 0), self._ints(
                g, ch * keep), axis]), self._ints(g, 0, ch, keep)])  # (B, C, K - 1)
            ssm = g.op("Slice", [state, self._ints(g, ch * keep), self._ints(g, _BIG), axis])
        window = g.op("Concat", [conv_in, g.op("Unsqueeze", [xbc, axis])], axis=2)  # (B, C, K)
        xbc = g.op("ReduceSum", [g.op("Mul", [window, g.const(f"conv{self.k}", w.conv)]),
                                 axis], keepdims=0)  # (B, C)
        if w.conv_bias is not None:
            xbc = g.op("Add", [xbc, g.const(f"conv_b{self.k}", w.conv_bias)])
        x, b, c, delta = self._split(g, g.silu(xbc), dt)
        s = g.op("Reshape", [ssm, self._ints(g, 0, self.groups, self.hg, self.p, self.n)])
        (s,), emitted = self.update(g, [s], self.drive(g, [x, b, c, delta], lead=1))
        if isinstance(state, tuple):
            g.op("Identity", [window], outputs=[outputs[0]])
            g.op("Reshape", [s, self._ints(g, 0, self.nh, self.p, self.n)],
                 outputs=[outputs[1]])
        else:
            rest = g.op("Slice", [window, self._ints(g, 1), self._ints(g, _BIG), axis])
            g.op("Concat", [g.op("Reshape", [rest, self._ints(g, 0, -1)]),
                            g.op("Reshape", [s, self._ints(g, 0, -1)])], axis=1,
                 outputs=[outputs[0]])
        return self.output(g, h, self.readout(g, emitted, lead=1), x, z)

    def output(self, g: Graph, h: str, y: str, x: str, z: str) -> str:
        """``h + out_proj(rmsnorm_G((y + D x) * silu(z)) * norm_weight)`` for any leading
        axes: the group means and their broadcast back are ``MatMul``s by ``(E, G)`` and
        ``(G, E)`` constants, so no reshapes."""
        w, e, gsz = self.w, self.e, self.groups
        y = g.op("Add", [y, g.op("Mul", [x, g.const("d", np.repeat(w.d, self.p))])], "ssm_out")
        gated = g.op("Mul", [y, g.silu(z)], "gated")  # (.., E)
        member = np.repeat(np.eye(gsz, dtype=np.float32), e // gsz, axis=0)  # (E, G)
        mean = g.op("MatMul", [g.op("Mul", [gated, gated]),
                               g.const("group_mean", member / (e // gsz))])  # (.., G)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean, g.const(
            "eps", np.float32(w.norm_eps))])])])
        scale = g.op("MatMul", [inv, g.const("group_spread", np.ascontiguousarray(member.T))])
        normed = g.op("Mul", [g.op("Mul", [gated, scale]), g.const(
            f"norm_w{self.k}", w.norm_weight)], "normed")
        return g.op("Add", [h, g.linear(normed, w.out_w, w.out_bias, "out_proj")], "block_out")
