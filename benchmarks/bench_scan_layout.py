"""The selective Scan's state layout in ONNX: ``(H, N)`` against channels last ``(N, H)``.

Why ``exporter._onnx._SelectiveWriter`` holds a sequence Scan's state as ``(batch, N, H)`` when
``H >= N`` (onnxruntime's broadcasting ``Mul``/``Add`` loop over the innermost axis), and why the
step graph keeps ``(batch, H, N)``. Three parts, each timed interleaved, one thread, thread CPU
time:

* ``layer``: one ``Scan`` of the six-node step alone (``Mul, Exp, Mul, Mul, Add, MatMul``), H
  channels, N states, L steps, in either layout, over a grid of (H, N);
* ``network``: a whole Mamba network's sequence graph (``transformers``' random weights, 4
  layers, d_model 256, so H = 512 channels, vocab 256), full and cut, built by the exporter as
  it is and with the old ``(H, N)`` Scan (the step graph's writer in its place), the same
  weights; the logit difference between the two is reported;
* ``step``: one token of 8 layers' steps, in ``(H, N)`` as the step graph holds it, against
  channels-last arithmetic between two transposes (the cache layout kept).

    python benchmarks/bench_scan_layout.py [--quick] [--results-dir /tmp]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, ValueInfoProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleave, machine, machine_line, parser, spread, write  # noqa: E402
from bench_hf_cpu_peer import cut_model, hf_model  # noqa: E402

from compressm_tune._table import markdown_table  # noqa: E402
from compressm_tune.exporter import (  # noqa: E402
    DEFAULT_OPSET,
    _onnx,
    build_sequence_model,
    extract_weights,
    ort_session,
)

GRID = [(512, 16), (512, 4), (512, 64), (128, 32), (64, 4), (64, 16), (64, 64), (8, 16), (8, 64)]
NETWORKS = [(16, 16), (16, 4), (64, 64), (64, 16)]  # (d_state, states kept)
STEP_LAYERS = 8


def _session(model) -> ort.InferenceSession:
    return ort_session(model.SerializeToString(), 1)


def _info(name: str, shape) -> ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _node(op: str, inputs: list[str], output: str, **kw) -> helper.NodeProto:
    return helper.make_node(op, inputs, [output], **kw)


def _step_nodes(x: str, d: str, du: str, b: str, c: str, a: str, out: str, y: str,
                flip: bool, p: str = "") -> list:
    """``out = exp(d a) x + du b``, ``y = C out`` (flip: ``c @ out``, else ``out @ c``)."""
    return [_node("Mul", [d, a], p + "m"), _node("Exp", [p + "m"], p + "e"),
            _node("Mul", [p + "e", x], p + "ex"), _node("Mul", [du, b], p + "push"),
            _node("Add", [p + "ex", p + "push"], out),
            _node("MatMul", [c, out] if flip else [out, c], y)]


def layer_model(h: int, n: int, length: int, flip: bool, a: np.ndarray):
    """One Scan over ``length`` steps; ``flip``: state ``(N, H)``, else ``(H, N)``."""
    state = [1, n, h] if flip else [1, h, n]
    drive = ([[1, 1, h], [1, 1, h], [1, n, 1], [1, 1, n]] if flip else
             [[1, h, 1], [1, h, 1], [1, 1, n], [1, n, 1]])
    names = ["d", "du", "b", "c"]
    body = helper.make_graph(
        _step_nodes("x", *names, "A", "x_out", "y", flip),
        "step", [_info("x", state)] + [_info(k, s) for k, s in zip(names, drive, strict=True)],
        [_info("x_out", state), _info("y", None)])
    scan = helper.make_node("Scan", ["x0", *names], ["x_end", "ys"], num_scan_inputs=4,
                            scan_input_axes=[1] * 4, scan_output_axes=[1], body=body)
    graph = helper.make_graph(
        [scan], "layer", [_info(k, [1, length, *s[1:]]) for k, s in zip(names, drive,
                                                                         strict=True)],
        [_info("ys", None)],
        [numpy_helper.from_array(a.T.copy() if flip else a, "A"),
         numpy_helper.from_array(np.zeros(state, np.float32), "x0")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])


def bench_layer(h: int, n: int, length: int, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    a = -np.exp(rng.normal(size=(h, n))).astype(np.float32)
    d = rng.uniform(0, 0.1, (1, length, h)).astype(np.float32)
    du = rng.normal(size=(1, length, h)).astype(np.float32)
    b, c = (rng.normal(size=(1, length, n)).astype(np.float32) for _ in range(2))
    feeds = {False: {"d": d[..., None], "du": du[..., None], "b": b[:, :, None],
                     "c": c[..., None]},
             True: {"d": d[:, :, None], "du": du[:, :, None], "b": b[..., None],
                    "c": c[:, :, None]}}
    sess = {flip: _session(layer_model(h, n, length, flip, a)) for flip in (False, True)}
    out = {flip: s.run(None, feeds[flip])[0].reshape(length, h) for flip, s in sess.items()}
    t = interleave({"states_last": lambda: sess[False].run(None, feeds[False]),
                    "channels_last": lambda: sess[True].run(None, feeds[True])},
                   rounds, warmup=2, clocks=(time.thread_time,))
    ms = {k: spread(v[0]) for k, v in t.items()}
    return {"h": h, "n": n, "length": length, "ms": ms,
            "ratio": ms["channels_last"]["median_ms"] / ms["states_last"]["median_ms"],
            "max_abs_diff": float(np.abs(out[True] - out[False]).max())}


class _StatesLast(_onnx._SelectiveWriter):
    """The old sequence Scan: the state ``(H, N)`` as the step graph's writer holds it."""

    def __init__(self, g, w, k, scan=True) -> None:
        super().__init__(g, w, k, scan=False)


def bench_network(d_state: int, keep: int, length: int, rounds: int) -> dict:
    _, model = hf_model("mamba", d_state)  # bench_hf_cpu_peer's shape and weights
    w = extract_weights(model if keep == d_state else cut_model(model, keep))
    new = _session(build_sequence_model(w, DEFAULT_OPSET, None))
    with mock.patch.object(_onnx, "_SelectiveWriter", _StatesLast):
        old = _session(build_sequence_model(w, DEFAULT_OPSET, None))
    ids = {"input_ids": np.random.default_rng(0).integers(256, size=(1, length))}
    diff = float(np.abs(new.run(None, ids)[0] - old.run(None, ids)[0]).max())
    t = interleave({"states_last": lambda: old.run(None, ids),
                    "channels_last": lambda: new.run(None, ids)},
                   rounds, warmup=2, clocks=(time.thread_time,))
    ms = {k: spread(v[0]) for k, v in t.items()}
    return {"d_state": d_state, "states": keep, "length": length, "ms": ms,
            "speedup": ms["states_last"]["median_ms"] / ms["channels_last"]["median_ms"],
            "max_abs_logit_diff": diff}


def step_model(h: int, n: int, flip: bool, a: np.ndarray):
    """``STEP_LAYERS`` one-token steps on ``(1, H, N)``; ``flip``: each in channels-last
    arithmetic between two transposes."""
    ints = [numpy_helper.from_array(np.array([v], np.int64), f"ax{v}") for v in (-1, -2)]
    inits = [numpy_helper.from_array(a.T.copy() if flip else a, "A"), *ints]
    at, bt = ("ax-2", "ax-1") if flip else ("ax-1", "ax-2")  # delta/du/c axis, b axis
    nodes, x = [], "x"
    for i in range(STEP_LAYERS):
        p = f"l{i}_"
        nodes += [_node("Unsqueeze", ["d", at], p + "d"), _node("Unsqueeze", ["du", at], p + "du"),
                  _node("Unsqueeze", ["b", bt], p + "b"), _node("Unsqueeze", ["c", at], p + "c")]
        if flip:
            nodes.append(_node("Transpose", [x], p + "xt", perm=[0, 2, 1]))
            x = p + "xt"
        nodes += _step_nodes(x, p + "d", p + "du", p + "b", p + "c", "A", p + "new", p + "y",
                             flip, p)
        x = p + "new"
        if flip:
            nodes.append(_node("Transpose", [x], p + "back", perm=[0, 2, 1]))
            x = p + "back"
    nodes.append(_node("Identity", [x], "out"))
    graph = helper.make_graph(nodes, "steps", [_info("x", [1, h, n]), _info("d", [1, h]),
                                               _info("du", [1, h]), _info("b", [1, n]),
                                               _info("c", [1, n])], [_info("out", None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])


def bench_step(h: int, n: int, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    a = -np.exp(rng.normal(size=(h, n))).astype(np.float32)
    feeds = {"x": rng.normal(size=(1, h, n)).astype(np.float32),
             "d": rng.uniform(0, 0.1, (1, h)).astype(np.float32),
             "du": rng.normal(size=(1, h)).astype(np.float32),
             "b": rng.normal(size=(1, n)).astype(np.float32),
             "c": rng.normal(size=(1, n)).astype(np.float32)}
    sess = {flip: _session(step_model(h, n, flip, a)) for flip in (False, True)}
    diff = float(np.abs(sess[True].run(None, feeds)[0] - sess[False].run(None, feeds)[0]).max())
    t = interleave({"states_last": lambda: sess[False].run(None, feeds),
                    "channels_last": lambda: sess[True].run(None, feeds)},
                   rounds, warmup=5, clocks=(time.thread_time,))
    ms = {k: spread(v[0]) for k, v in t.items()}
    return {"h": h, "n": n, "layers": STEP_LAYERS, "ms": ms,
            "ratio": ms["channels_last"]["median_ms"] / ms["states_last"]["median_ms"],
            "max_abs_diff": diff}


def _cell(s: dict) -> str:
    return f"{s['median_ms']:.3f} ± {s['iqr_ms'] / 2:.3f}"


def main() -> None:
    ap = parser(__doc__, "scan_layout", quick="two small layers, one small network, L=32")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    grid, networks, steps = GRID, NETWORKS, [(512, 4), (512, 16), (512, 64)]
    if args.quick:
        grid, networks, steps, args.seq_len, args.rounds = ([(64, 4), (8, 16)], [(16, 4)],
                                                            [(64, 4)], 32, 2)
    torch.set_num_threads(1)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    load = os.getloadavg()[0]
    start = time.perf_counter()
    layers = [bench_layer(h, n, args.seq_len, args.rounds) for h, n in grid]
    nets = [bench_network(d, k, args.seq_len, args.rounds) for d, k in networks]
    step = [bench_step(h, n, 20 * args.rounds) for h, n in steps]
    m = machine(load)
    md = ["# The selective Scan's state layout in ONNX: (H, N) vs channels last (N, H)\n",
          "Thread CPU ms, median ± half-IQR over interleaved rounds, one thread; "
          f"L={args.seq_len}. Ratios below 1 favour channels last.\n",
          f"## One layer's Scan alone ({args.rounds} rounds)\n",
          markdown_table(["H", "N", "(H, N) ms", "(N, H) ms", "(N, H) / (H, N)", "max diff"],
                         [[r["h"], r["n"], _cell(r["ms"]["states_last"]),
                           _cell(r["ms"]["channels_last"]), f"{r['ratio']:.2f}",
                           f"{r['max_abs_diff']:.1e}"] for r in layers]),
          f"\n## A Mamba network's sequence graph, as exported vs with the old (H, N) Scan "
          f"(4 layers, d_model 256, H = 512; {args.rounds} rounds)\n",
          markdown_table(["d_state", "states", "(H, N) ms", "exported ms", "speed-up",
                          "logit diff"],
                         [[r["d_state"], r["states"], _cell(r["ms"]["states_last"]),
                           _cell(r["ms"]["channels_last"]), f"{r['speedup']:.2f}x",
                           f"{r['max_abs_logit_diff']:.1e}"] for r in nets]),
          f"\n## One token, {STEP_LAYERS} layers' steps ({20 * args.rounds} rounds): the step "
          "graph's (H, N) vs channels-last arithmetic between two transposes\n",
          markdown_table(["H", "N", "(H, N) ms", "transposed ms", "transposed / (H, N)"],
                         [[r["h"], r["n"], _cell(r["ms"]["states_last"]),
                           _cell(r["ms"]["channels_last"]), f"{r['ratio']:.2f}"]
                          for r in step]),
          f"\n{machine_line(m)} onnxruntime {ort.__version__}. "
          f"Run took {time.perf_counter() - start:.0f} s.\n"]
    write(args.results_dir / args.name,
          {"machine": m, "args": vars(args), "onnxruntime": ort.__version__, "layer": layers,
           "network": nets, "step": step}, "\n".join(md))


if __name__ == "__main__":
    main()
