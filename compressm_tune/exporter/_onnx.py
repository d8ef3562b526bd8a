"""Build an SSM network's ONNX graphs directly from its weights with ``onnx.helper``, and their
dynamic int8 variants.

Why not ``torch.onnx.export``: the layers run their recurrences through autograd Functions backed
by a C kernel no exporter can trace, and dynamo's ``scan`` lowering is a private API that takes
seconds per trace. Writing the graph from the weights (:mod:`._weights`) is exact, takes
milliseconds, works for every opset in :data:`SUPPORTED_OPSETS`, and uses a handful of
well-supported operators: ``MatMul``/``Add``/softplus for every input-dependent part over all
steps at once, BatchNorm folded to ``Mul`` + ``Add``, exact GELU via ``Erf``, ``ReduceMean``
pooling, and one ``Scan`` per block for the recurrence (so batch and length are dynamic).
``build_sequence_model(w, chunk=T)`` writes the chunked graph of :mod:`._onnx_blocks` instead.

A layer writer (:class:`_LRUWriter`, :class:`_SelectiveWriter`) says how to compute the layer's
drive, one recurrence step and its read-out; the sequence graph puts the step into a ``Scan``
body, the streaming graph applies it once. Streaming states are explicit inputs and outputs in
:meth:`SSMModel.allocate_state`'s layout: per block ``(batch, N_k, 2)`` (LRU), ``(batch, H, N_k)``
(selective) or ``(batch, E, K - 1 + N_k)`` (Mamba), then, with mean pooling, the running sum
``(batch, H)`` and the token count ``(1,)``.

Int8: ``quantize_dynamic`` stores MatMul weights as int8 and quantizes activations on the fly;
the ``Scan`` recurrence has no weights, and the chunked graphs' recurrence constants (MatMuls
named :data:`._onnx_blocks.RECURRENCE`) stay float32.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from compressm_tune.errors import ExportError, ExportOptionError, MissingDependencyError
from compressm_tune.exporter._names import sequence_io_names, step_io_names, step_states
from compressm_tune.exporter._onnx_blocks import (
    RECURRENCE,
    ChunkedLRU,
    ChunkedSelective,
    ChunkFrame,
    MambaParts,
)
from compressm_tune.exporter._onnx_blocks import Graph as _Graph
from compressm_tune.exporter._onnx_mamba2 import Mamba2Parts
from compressm_tune.exporter._weights import (
    CHUNK_KEY,
    BlockWeights,
    LRUWeights,
    Mamba2BlockWeights,
    MambaBlockWeights,
    ModelWeights,
    SelectiveWeights,
    check_chunk,
    chunk_label,
)

__all__ = [
    "DEFAULT_OPSET",
    "QUANTIZE_CHOICES",
    "SUPPORTED_OPSETS",
    "build_sequence_model",
    "build_step_model",
    "check_opset",
    "quantize_file",
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


class _LRUWriter:
    """The LRU layer (:class:`LRUWeights`) as graph pieces.

    The contract both writers keep: ``drive(g, hn)`` turns the normalized block input into the
    per-step inputs of the recurrence and ``readout(g, emitted)`` turns what the steps emitted
    into the layer's output ``(..., H)`` (without ``D``); both work on any leading dims (all
    steps at once or one token). ``update(g, states, drive)`` is one step on ``(batch, ...)``
    tensors, in a Scan body or the step graph, returning the new states and the values to
    emit. ``state_shapes``, ``drive_shapes``, ``emit_shapes`` give their shapes per sequence
    (no batch axis) for the Scan body's signature; ``stream(g, hn, state, out)`` is one token
    of the step graph on the streaming state (one tensor per block, in ``allocate_state``'s
    layout). Constants live in the outer graph, where a Scan body can see them.
    """

    def __init__(self, g: _Graph, w: LRUWeights, k: int, scan: bool = True) -> None:
        self.w = w
        if scan:  # the Scan body's constants (the step graph has its own, in stream())
            self.lam_re = g.const(f"lam_re{k}", w.lam_re)
            self.lam_im = g.const(f"lam_im{k}", w.lam_im)
        n = w.state_dim
        self.state_shapes = [(n,), (n,)]  # s_re, s_im, per sequence
        self.drive_shapes = [(n,), (n,)]  # v_re_t, v_im_t
        self.emit_shapes = [(n,), (n,)]  # per-step s_re, s_im (read out after the Scan)

    def drive(self, g: _Graph, hn: str) -> list[str]:
        """``B hn`` as (v_re, v_im), ``(..., N)`` each."""
        return [g.linear(hn, self.w.b_re, None, "b_re"), g.linear(hn, self.w.b_im, None, "b_im")]

    def update(self, g: _Graph, states: list[str], drive: list[str],
               outputs: list[str] | None = None) -> tuple[list[str], list[str]]:
        """``s' = lam * s + v`` in re/im arithmetic; emits the new states.

        ``outputs`` optionally names the new states, then the emitted values (a Scan body's
        output names); a value emitted as well as carried is copied by an ``Identity``.
        """
        (s_re, s_im), (v_re, v_im) = states, drive
        lam_re, lam_im = self.lam_re, self.lam_im
        re = g.op("Sub", [g.op("Mul", [lam_re, s_re]), g.op("Mul", [lam_im, s_im])])
        im = g.op("Add", [g.op("Mul", [lam_re, s_im]), g.op("Mul", [lam_im, s_re])])
        out_re, out_im, emit_re, emit_im = outputs or (None,) * 4
        new_re = g.op("Add", [re, v_re], "s_re", outputs=[out_re] if out_re else None)
        new_im = g.op("Add", [im, v_im], "s_im", outputs=[out_im] if out_im else None)
        if not outputs:
            return [new_re, new_im], [new_re, new_im]
        return [new_re, new_im], [g.op("Identity", [new_re], outputs=[emit_re]),
                                  g.op("Identity", [new_im], outputs=[emit_im])]

    def readout(self, g: _Graph, emitted: list[str]) -> str:
        """``Re(C s) = s_re @ c_re + s_im @ c_im``, ``(..., H)``."""
        s_re, s_im = emitted
        return g.op("Add", [g.linear(s_re, self.w.c_re, None, "c_re"),
                            g.linear(s_im, self.w.c_im, None, "c_im")])

    def stream(self, g: _Graph, hn: str, state: str, out: str) -> str:
        """One token of the step graph in the state's own layout ``(batch, N, 2)``: the
        complex product by lambda as a ``(N, 2, 2)`` rotation (``Mul`` + ``ReduceSum``), with
        interleaved ``(n, part)`` projections, so no unpacking or packing of re/im (8 nodes
        instead of 18). Writes the new state to ``out``; returns ``Re(C x)`` ``(batch, H)``.
        """
        w, n = self.w, self.w.state_dim
        lam = np.stack([np.stack([w.lam_re, -w.lam_im], -1),
                        np.stack([w.lam_im, w.lam_re], -1)], -2)  # (N, 2, 2)  [n, p, q]
        b_int = np.stack([w.b_re, w.b_im], -1).reshape(w.b_re.shape[0], 2 * n)  # (H, 2N)
        c_int = np.stack([w.c_re, w.c_im], 1).reshape(2 * n, -1)  # (2N, H)
        column = g.op("Unsqueeze", [state, g.const("axes", np.array([2], np.int64))])
        turned = g.op("ReduceSum", [g.op("Mul", [g.const("lam", lam), column]),  # (B, N, 2, 2)
                                    g.const("axes", np.array([3], np.int64))], keepdims=0)
        v = g.op("Reshape", [g.op("MatMul", [hn, g.const("b_int", b_int)]),
                             g.const("shape", np.array([0, n, 2], np.int64))])  # (B, N, 2)
        new = g.op("Add", [turned, v], outputs=[out])  # (B, N, 2)
        flat = g.op("Reshape", [new, g.const("shape", np.array([0, 2 * n], np.int64))])
        return g.op("MatMul", [flat, g.const("c_int", c_int)], "y")  # (B, H)


class _SelectiveWriter:
    """The selective layer (:class:`SelectiveWeights`) as graph pieces; see :class:`_LRUWriter`
    for the contract.

    The drive is shaped for broadcasting before the ``Scan`` (``delta``, ``delta u``, ``B_t``,
    ``C_t`` each gain an axis of 1), so one step is six nodes: ``Mul, Exp, Mul, Mul, Add,
    MatMul``. ORT's per-node cost inside a ``Scan`` dominates at these sizes. Measured on the
    ``(H, N)`` layout, before the one below (onnxruntime 1.31, 1 thread, a loaded 2-core
    machine; H 8-64, N 16-64, L 500-2000): at batch 1 this took 0.7-0.86x the time of
    unsqueezing inside the body (read-out by ``MatMul`` or by ``ReduceSum``) and of emitting the
    ``(batch, H, N)`` states to contract them after the ``Scan``; at batch 8 the variants were
    within noise. Precomputing ``exp(delta A)`` for all steps outside the ``Scan`` would hold
    two ``(batch, L, H, N)`` tensors, too much memory for an edge device.

    The sequence ``Scan`` (``scan=True``) holds the state with its longer axis innermost,
    ``(batch, N, H)`` when ``H >= N``: ORT's broadcasting ``Mul``/``Add`` loop over the innermost
    axis, so the loops are long, not N long once per channel. Measured
    (``benchmarks/bench_scan_layout.py``: onnxruntime 1.32, 1 thread, one layer's Scan, L=256,
    interleaved), channels last took the time of states last times: 0.50 at H=512, N=16; 0.30
    at 512, 4; 0.78 at 512, 64; 0.80 at 128, 32; 0.70 at 64, 4; 0.80 at 64, 16; 0.98 at 64,
    64; 1.05 at 8, 16; 1.35 at 8, 64; a whole 4-layer Mamba graph (H=512) got 1.22-1.63x
    faster. The step graph (``scan=False``) keeps ``(batch, H, N)``, the layout of
    ``allocate_state`` and of ``transformers``' cache, for its arithmetic too: at H=512, one
    token in channels-last arithmetic between two transposes took 0.70x the time at N=4, 0.88x
    at N=16 and 1.07x at N=64.
    """

    def __init__(self, g: _Graph, w: SelectiveWeights, k: int, scan: bool = True) -> None:
        self.w = w
        h, n = w.state_shape
        self.flip = scan and h >= n  # (N, H), channels last
        self.a = g.const(f"a{k}", np.ascontiguousarray(w.a.T) if self.flip else w.a)
        # delta, delta u, C_t gain a 1 on ``axis``, B_t on ``b_axis``; the read-out drops ``axis``
        self.axis = g.const("axis", np.array([-2 if self.flip else -1], np.int64))
        self.b_axis = g.const("b_axis", np.array([-1 if self.flip else -2], np.int64))
        if self.flip:
            self.state_shapes = [(n, h)]  # x, per sequence
            self.drive_shapes = [(1, h), (1, h), (n, 1), (1, n)]  # delta, delta u, B_t, C_t
            self.emit_shapes = [(1, h)]  # y_t, read out inside the Scan
        else:
            self.state_shapes = [(h, n)]
            self.drive_shapes = [(h, 1), (h, 1), (1, n), (n, 1)]
            self.emit_shapes = [(h, 1)]

    def drive(self, g: _Graph, hn: str) -> list[str]:
        """delta, delta * hn, B_t, C_t for every step at once, each with its axis of 1
        (:attr:`drive_shapes`)."""
        delta, delta_u, b_t, c_t = g.selective_drive(self.w, hn)
        return [g.op("Unsqueeze", [delta, self.axis]), g.op("Unsqueeze", [delta_u, self.axis]),
                g.op("Unsqueeze", [b_t, self.b_axis]), g.op("Unsqueeze", [c_t, self.axis])]

    def update(self, g: _Graph, states: list[str], drive: list[str],
               outputs: list[str] | None = None) -> tuple[list[str], list[str]]:
        """``x' = exp(delta A) x + (delta u) B_t`` on ``(batch, N, H)`` (else ``(batch, H, N)``);
        emits ``y_t = C_t x'`` ``(batch, 1, H)`` (else ``x' C_t``, ``(batch, H, 1)``)."""
        (x,), (delta, delta_u, b_t, c_t) = states, drive
        x_out, y_out = outputs or (None, None)
        decay = g.op("Exp", [g.op("Mul", [delta, self.a])])
        push = g.op("Mul", [delta_u, b_t])
        x = g.op("Add", [g.op("Mul", [decay, x]), push], "x",
                 outputs=[x_out] if x_out else None)
        y = g.op("MatMul", [c_t, x] if self.flip else [x, c_t], "y",
                 outputs=[y_out] if y_out else None)
        return [x], [y]

    def readout(self, g: _Graph, emitted: list[str]) -> str:
        return g.op("Squeeze", [emitted[0], self.axis])  # (..., H)

    def stream(self, g: _Graph, hn: str, state: str, out: str) -> str:
        """One token of the step graph: writes the new state to ``out``, returns ``y``."""
        states, emitted = self.update(g, [state], self.drive(g, hn))
        g.op("Identity", states, outputs=[out])
        return self.readout(g, emitted)


def _writer(g: _Graph, w: BlockWeights | MambaBlockWeights, k: int, scan: bool = True
            ) -> _LRUWriter | _SelectiveWriter:
    cls = _SelectiveWriter if isinstance(w.ssm, SelectiveWeights) else _LRUWriter
    return cls(g, w.ssm, k, scan)


def _final_norm(g: _Graph, h: str, w: ModelWeights) -> str:
    """Mamba's ``norm_f`` (no-op for the other architectures)."""
    return h if w.norm_f is None else g.rms_norm(h, w.norm_f, w.norm_eps, "norm_f")


def _x_info(name: str, w: ModelWeights, dims: list) -> onnx.ValueInfoProto:
    """The model input: float ``(*dims, d_input)``, or int64 token ids ``dims``."""
    if w.tokens:
        return helper.make_tensor_value_info(name, TensorProto.INT64, dims)
    return helper.make_tensor_value_info(name, _FLOAT, [*dims, w.d_input])


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
    return {"compressm.mode": mode, "compressm.arch": w.arch,
            "compressm.state_dims": ",".join(map(str, w.state_dims)),
            "compressm.pooling": w.pooling}


def _scan_body(layer: _LRUWriter | _SelectiveWriter, k: int) -> onnx.GraphProto:
    """Scan body: states, then one step of each drive -> new states, then the emitted values."""
    g = _Graph(prefix=f"scan{k}_")

    def infos(kind: str, shapes) -> list[onnx.ValueInfoProto]:
        return [helper.make_tensor_value_info(f"{kind}{i}", _FLOAT, ["batch", *shape])
                for i, shape in enumerate(shapes)]

    states_in = infos("state_in", layer.state_shapes)
    drive_in = infos("drive_t", layer.drive_shapes)
    states_out = infos("state_out", layer.state_shapes)
    emit_out = infos("emit_t", layer.emit_shapes)
    layer.update(g, [v.name for v in states_in], [v.name for v in drive_in],
                 outputs=[v.name for v in states_out + emit_out])
    return helper.make_graph(g.nodes, f"scan_body{k}", states_in + drive_in,
                             states_out + emit_out)


def build_sequence_model(w: ModelWeights, opset: int = DEFAULT_OPSET,
                         chunk: int | None = None) -> onnx.ModelProto:
    """The whole-sequence graph: ``x (batch, length, d_input)`` -> ``y``.

    ``y`` is ``(batch, d_output)`` with mean pooling, ``(batch, length, d_output)`` without.
    Batch and length are dynamic. ``chunk=None``: one per-token ``Scan`` per block;
    ``chunk=T``: the chunked graph of :mod:`._onnx_blocks`.
    The graph records its variant in the metadata ``compressm.chunk``.
    """
    opset = check_opset(opset)
    chunk = check_chunk(chunk, w.arch)
    x_name, y_name = sequence_io_names(w)
    g = _Graph()
    frame = None if chunk is None else ChunkFrame(g, x_name, chunk, w.d_input, w.tokens)
    h = g.encode(x_name if frame is None else frame.x, w)  # (B, L, H), or padded, flat (B*C*T, H)
    batch = None
    if frame is not None and w.arch in ("mamba", "mamba2"):  # the conv needs time: (B, C*T, H)
        h = g.op("Reshape", [h, g.op("Concat", [frame.batch, g.const("shape", np.array(
            [-1, w.d_model], np.int64))], axis=0)])
    for k, bw in enumerate(w.blocks):
        if isinstance(bw, Mamba2BlockWeights):
            parts2 = Mamba2Parts(g, bw, k)
            z, inputs = parts2.sequence_input(g, h)  # (B, L, E), [x, B, C, delta]
            if frame is None:
                batch = batch or _batch(g, x_name)
                y = _scan_layer(g, parts2, inputs, batch, k)  # (B, L, E)
            else:
                y = parts2.chunked(g, frame, inputs)  # (B, C*T, E)
            h = parts2.output(g, h, y, inputs[0], z)  # (B, L, H)
            continue
        if isinstance(bw, MambaBlockWeights):
            parts = MambaParts(g, bw, k)
            xc, z = parts.sequence_input(g, h)  # (B, L, E) each (chunked: L = C*T)
            if frame is None:
                batch = batch or _batch(g, x_name)
                y = _scan_layer(g, _writer(g, bw, k), xc, batch, k)  # (B, L, E)
            else:
                y = ChunkedSelective(g, bw.ssm, k, frame).apply(g, xc)  # (B*C*T, E)
                y = g.op("Reshape", [y, g.op("Shape", [xc])])  # (B, C*T, E)
            h = parts.output(g, h, y, xc, z)  # (B, L, H)
            continue
        if frame is not None and isinstance(bw.ssm, LRUWeights):  # BatchNorm folded in
            h = g.block_tail(h, None, ChunkedLRU(g, bw.ssm, k, frame).block(g, h, bw), bw)
            continue
        hn = g.affine(h, bw.bn_scale, bw.bn_shift, f"bn{k}")  # (B, L, H)
        if frame is not None:
            y = ChunkedSelective(g, bw.ssm, k, frame).apply(g, hn)
        else:
            batch = batch or _batch(g, x_name)
            y = _scan_layer(g, _writer(g, bw, k), hn, batch, k)
        h = g.block_tail(h, hn, y, bw)  # (B, L, H)
    if frame is not None:
        h = frame.cut(g, h, w.d_model)  # (B, L, H): padding never enters pool or output
    h = _final_norm(g, h, w)
    if w.pooling == "mean":
        if opset >= 18:
            h = g.op("ReduceMean", [h, g.const("time_axis", np.array([1], np.int64))], "pool",
                     keepdims=0)
        else:
            h = g.op("ReduceMean", [h], "pool", axes=[1], keepdims=0)  # (B, H)
    g.op("Add", [g.linear(h, w.head, None, "head"), g.const("head_b", w.head_bias)],
         outputs=[y_name])
    x_info = _x_info(x_name, w, ["batch", "length"])
    y_shape = ["batch", w.d_output] if w.pooling == "mean" else ["batch", "length", w.d_output]
    y_info = helper.make_tensor_value_info(y_name, _FLOAT, y_shape)
    variant = "scan" if chunk is None else f"chunked T={chunk}"
    doc = (f"{w.arch} SSM network, sequence mode ({variant}): {x_name} (batch, length"
           f"{'' if w.tokens else ', d_input), normalized as in manifest.json'}) -> {y_name}")
    meta = {**_metadata(w, "sequence"), CHUNK_KEY: chunk_label(chunk)}
    return _finish(g, "compressm_sequence", [x_info], [y_info], opset, doc, meta)


def _batch(g: _Graph, x: str) -> str:
    """The batch size of input ``x`` as a ``(1,)`` int64 tensor."""
    return g.op("Slice", [g.op("Shape", [x]), g.const("zero", np.array([0], np.int64)),
                          g.const("one_i", np.array([1], np.int64))], "batch")


def _scan_layer(g: _Graph, layer: _LRUWriter | _SelectiveWriter | Mamba2Parts,
                hn: str | list[str], batch: str, k: int) -> str:
    """The layer's read-out ``(B, L, H)`` from one per-token ``Scan`` (``hn``: what the
    writer's ``drive`` takes, the normalized input or Mamba-2's ``[x, B, C, delta]``)."""
    drive = layer.drive(g, hn)  # each (B, L, ...)
    zeros = [g.zeros(batch, shape) for shape in layer.state_shapes]
    outs = g.op("Scan", [*zeros, *drive], f"scan{k}",
                n_out=len(zeros) + len(layer.emit_shapes), body=_scan_body(layer, k),
                num_scan_inputs=len(drive), scan_input_axes=[1] * len(drive),
                scan_output_axes=[1] * len(layer.emit_shapes))
    return layer.readout(g, outs[len(zeros):])  # per-step values, (B, L, ...) each


def build_step_model(w: ModelWeights, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The streaming graph: one token and the states in, the output so far and new states out.

    Inputs ``x_t (batch, d_input)`` (token models: ``input_ids (batch,)``), then the states
    of :func:`step_states` (feature models: ``state_k`` per block in
    :attr:`ModelWeights.state_shapes`' layout and, with mean pooling, ``pool_sum (batch, H)``
    and ``pool_count (1,)``; token models: ``transformers``' cache tensors); outputs
    ``y_t (batch, d_output)`` (``logits``) and the new states (see :func:`step_io_names`).
    Zero states start a sequence; after the last token ``y_t`` equals the sequence graph's
    output.
    """
    opset = check_opset(opset)
    in_names, out_names = step_io_names(w)
    states = step_states(w)
    g = _Graph()
    h = g.encode(in_names[0], w)  # (B, H)
    i = 0  # next state tensor
    for k, bw in enumerate(w.blocks):
        if isinstance(bw, Mamba2BlockWeights):
            split = w.tokens  # transformers' cache: conv window and SSM state apart
            state = (states[i][0], states[i + 1][0]) if split else states[i][0]
            outs = [states[i][1], states[i + 1][1]] if split else [states[i][1]]
            h = Mamba2Parts(g, bw, k).step(g, h, state, outs)  # (B, H)
            i += len(outs)
            continue
        layer = _writer(g, bw, k, scan=False)
        if isinstance(bw, MambaBlockWeights):
            parts = MambaParts(g, bw, k)
            split = w.tokens  # transformers' cache: conv window and S6 state apart
            state = (states[i][0], states[i + 1][0]) if split else states[i][0]
            xc, z, conv_in, s6 = parts.step_input(g, h, state)  # (B, E) x2, ...
            new, emitted = layer.update(g, [s6], layer.drive(g, xc))
            if split:
                g.op("Identity", [conv_in], outputs=[states[i][1]])
                g.op("Identity", new, outputs=[states[i + 1][1]])
                i += 2
            else:
                g.op("Concat", [conv_in, new[0]], axis=2, outputs=[states[i][1]])
                i += 1
            h = parts.output(g, h, layer.readout(g, emitted), xc, z)  # (B, H)
            continue
        hn = g.affine(h, bw.bn_scale, bw.bn_shift, f"bn{k}")  # (B, H)
        y = layer.stream(g, hn, states[i][0], states[i][1])  # (B, H)
        i += 1
        h = g.block_tail(h, hn, y, bw)  # (B, H)
    h = _final_norm(g, h, w)
    if w.pooling == "mean":
        (sum_in, sum_out, _), (count_in, count_out, _) = states[i:]
        total = g.op("Add", [sum_in, h], outputs=[sum_out])  # (B, H)
        count = g.op("Add", [count_in, g.const("one", np.array([1.0], np.float32))],
                     outputs=[count_out])  # (1,)
        h = g.op("Div", [total, count], "pool")  # (B, H)
    g.op("Add", [g.linear(h, w.head, None, "head"), g.const("head_b", w.head_bias)],
         outputs=[out_names[0]])
    inputs = [_x_info(in_names[0], w, ["batch"])]
    inputs += [helper.make_tensor_value_info(n, _FLOAT, shape) for n, _, shape in states]
    outputs = [helper.make_tensor_value_info(out_names[0], _FLOAT, ["batch", w.d_output])]
    outputs += [helper.make_tensor_value_info(n, _FLOAT, shape) for _, n, shape in states]
    doc = f"{w.arch} SSM network, streaming mode: one token + states -> output so far + states"
    return _finish(g, "compressm_step", inputs, outputs, opset, doc, _metadata(w, "step"))


QUANTIZE_CHOICES = ("int8",)


def _recurrence_nodes(path: Path) -> list[str]:
    """Names of the chunked graphs' recurrence MatMuls (their constants are powers of lambda,
    which int8 would round to a few digits), in the graph and its subgraphs."""
    names, graphs = [], [onnx.load(str(path)).graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            if node.name.startswith(RECURRENCE):
                names.append(node.name)
            graphs += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    return names


def quantize_file(src: Path, dst: Path) -> None:
    """Write the dynamically int8-quantized version of ONNX file ``src`` to ``dst``."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise MissingDependencyError(
            "int8 quantization needs onnxruntime's quantization tools "
            f"(`pip install onnxruntime`): {exc}") from exc
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # it logs a pre-processing hint at WARNING
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                         nodes_to_exclude=_recurrence_nodes(src))
    except Exception as exc:  # onnxruntime raises bare exceptions for unsupported graphs
        raise ExportError(f"int8 quantization of {src.name} failed: {exc}") from exc
    finally:
        logging.getLogger().setLevel(level)
