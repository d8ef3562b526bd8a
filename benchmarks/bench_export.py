"""Inference latency of exported networks, batch 1, one thread, interleaved rounds.

``--mode engines`` (-> export_latency.*): torch eager vs TorchScript vs onnxruntime per state
width N, per sequence of L=40 tokens and per streamed token, plus the onnxruntime call floor
(Identity ops on the step graph's inputs). ``--mode chunked`` (-> export_latency_chunked.*):
the per-token Scan graph against the one ``export_bundle(chunk="auto")`` chooses, wall and
thread-CPU time. Models: 4 blocks at width N, residual width H, random weights. A round of a
candidate is its median call over ``--min-time-s``; cells are the median and half-IQR over
rounds; ``ms = fixed + slope * N`` gives the knee ``N* = fixed / slope``.

    python benchmarks/bench_export.py [--mode engines|chunked] [--quick] [--results-dir /tmp]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import int_list, loglog_panel, machine, machine_line, parser, run_for, spread, write  # noqa: E402,E501

from compressm_tune._table import markdown_table  # noqa: E402
from compressm_tune.exporter import (  # noqa: E402
    build_sequence_model,
    export_bundle,
    extract_weights,
    measure_latency,
)
from compressm_tune.models import SSMConfig, SSMModel  # noqa: E402
from compressm_tune.training import save_checkpoint  # noqa: E402

BLOCKS, CLASSES, SEQ_LEN, FULL_N = 4, 10, 40, 256
ENGINES, MODES, GRAPHS = ("torch", "torchscript", "onnxruntime"), ("sequence", "step"), \
    ("scan", "chosen")


def build(h: int, n: int, root: Path, arch: str = "lru", seq_len: int = SEQ_LEN,
          chunk: str | None = "auto"):
    """A random model at (H, N), its checkpoint exported to a bundle: (model, bundle, manifest)."""
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(arch=arch, d_input=1, d_output=CLASSES, d_model=h,
                               state_dims=[n] * BLOCKS))
    for block in model.blocks:
        block.norm.running_mean.normal_(0, 0.5)
        block.norm.running_var.uniform_(0.5, 2.0)
    model.eval()
    ckpt = root / f"h{h}-n{n}-l{seq_len}.pt"
    save_checkpoint(ckpt, model, dataset={
        "name": "synthetic", "task": "classification", "d_input": 1, "d_output": CLASSES,
        "seq_len": seq_len, "norm_mean": [0.0], "norm_std": [1.0], "info": {}})
    bundle = root / ckpt.stem
    return model, bundle, export_bundle(ckpt, bundle, threads=1, chunk=chunk)


def ort_session(proto_or_path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    data = str(proto_or_path) if isinstance(proto_or_path, Path) else \
        proto_or_path.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def ort_call_floor(bundle: Path, args) -> float:
    """Median ms of ``session.run`` on a graph that only copies the step graph's inputs."""
    import onnx
    from onnx import helper

    step = onnx.load(str(bundle / "model_step.onnx"))
    nodes = [helper.make_node("Identity", [i.name], [f"out_{i.name}"]) for i in step.graph.input]
    outputs = [helper.make_tensor_value_info(f"out_{i.name}", onnx.TensorProto.FLOAT, None)
               for i in step.graph.input]
    model = helper.make_model(helper.make_graph(nodes, "floor", list(step.graph.input), outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort_session(model)
    feeds = {i.name: np.zeros([1 if isinstance(d, str) else d for d in i.shape], np.float32)
             for i in session.get_inputs()}
    return run_for(lambda: session.run(None, feeds), args.min_time_s, args.warmup)


def torch_call(module, mode: str, x: torch.Tensor):
    """One call of eager torch or TorchScript: the whole sequence, or the next streamed token."""
    state, i = [module.allocate_state(1)], [0]

    def call():
        with torch.inference_mode():
            if mode == "sequence":
                return module(x)
            if i[0] % SEQ_LEN == 0:
                state[0] = module.allocate_state(1)
            state[0] = module.step(x[:, i[0] % SEQ_LEN], state[0])[1]
            i[0] += 1
    return call


def fit(widths: list[int], ms: list[float]) -> dict:
    slope, fixed = np.polyfit(widths, ms, 1)  # ms = fixed + slope * N
    return {"floor_ms": min(ms), "fit_fixed_ms": float(fixed), "fit_us_per_state": slope * 1e3,
            "knee_N": float(fixed / slope) if slope > 0 and fixed > 0 else None,
            "full_over_floor": ms[widths.index(FULL_N)] / min(ms) if FULL_N in widths else None}


def run_engines(args, root: Path) -> dict:
    x = torch.randn(1, SEQ_LEN, 1, generator=torch.Generator().manual_seed(0))
    cands, parity = {}, {}
    for h in args.hidden:
        for n in args.widths:
            model, bundle, manifest = build(h, n, root)
            parity[h, n] = manifest["parity"]["max_abs_error"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scripted = torch.jit.load(str(bundle / "model.ts"))
            for mode in MODES:
                cands[h, n, "torch", mode] = torch_call(model, mode, x)
                cands[h, n, "torchscript", mode] = torch_call(scripted, mode, x)
                cands[h, n, "onnxruntime", mode] = (
                    lambda b=bundle, m=mode: measure_latency(
                        b, m, threads=1, min_time_s=args.min_time_s, warmup=args.warmup)["p50_ms"])
    raw: dict = {k: [] for k in cands}
    floors, loads = [], []
    for r in range(args.rounds):
        for key, call in cands.items():
            raw[key].append(call() if key[2] == "onnxruntime"
                            else run_for(call, args.min_time_s, args.warmup))
        floors.append(ort_call_floor(bundle, args))
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} done (load {loads[-1]:.2f})", flush=True)
    results, floor_info = [], {}
    for h in args.hidden:
        for n in args.widths:
            row = {"H": h, "N": n, "parity_max_abs_error": parity[h, n]}
            row |= {f"{e}_{m}": spread(raw[h, n, e, m]) for e in ENGINES for m in MODES}
            for m in MODES:
                row[f"ort_{m}_speedup_vs_torch_{m}"] = (row[f"torch_{m}"]["median_ms"]
                                                        / row[f"onnxruntime_{m}"]["median_ms"])
            results.append(row)
        for e in ENGINES:
            for m in MODES:
                floor_info[f"H={h} {e} {m}"] = fit(args.widths, [
                    r[f"{e}_{m}"]["median_ms"] for r in results if r["H"] == h])
    return {"results": results, "floors": floor_info, "ort_call_floor": spread(floors),
            "load_avg_1m_per_round": loads}


def run_chunked(args, root: Path) -> dict:
    configs = [(h, n, length) for h in args.hidden for length in args.lengths
               for n in args.widths]
    prepared, cands = {}, {}
    for h, n, length in configs:
        model, bundle, manifest = build(h, n, root, args.arch, length)
        w = extract_weights(model)
        x = np.random.default_rng(0).standard_normal((1, length, 1)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        choice = manifest["sequence_graph"]
        graphs = {}
        for graph, chunk in (("scan", None), ("chosen", choice.get("chunk"))):
            proto = build_sequence_model(w, chunk=chunk)
            t0 = time.perf_counter()
            session = ort_session(proto)
            graphs[graph] = {"chunk": chunk, "nodes": len(proto.graph.node),
                             "bytes": len(proto.SerializeToString()),
                             "session_create_ms": (time.perf_counter() - t0) * 1e3,
                             "parity_max_abs_error": float(np.abs(
                                 session.run(None, {"x": x})[0] - want).max())}
            cands[h, n, length, graph] = lambda s=session, x=x: s.run(None, {"x": x})
        prepared[h, n, length] = {"choice": choice, "graphs": graphs}
        print(f"prepared H={h} N={n} L={length}: chosen {choice.get('chunk') or 'scan'}",
              flush=True)
    raw: dict = {k: ([], []) for k in cands}
    loads, rng = [], np.random.default_rng(1)
    keys = list(cands)
    for r in range(args.rounds):
        for i in rng.permutation(len(keys)):  # a fresh order each round
            call, wall, cpu = cands[keys[i]], [], []
            for _ in range(2):
                call()
            while sum(wall) < args.min_time_s * 1e3 or len(wall) < 3:
                t0, c0 = time.perf_counter(), time.thread_time()
                call()
                cpu.append((time.thread_time() - c0) * 1e3)
                wall.append((time.perf_counter() - t0) * 1e3)
            raw[keys[i]][0].append(float(np.median(wall)))
            raw[keys[i]][1].append(float(np.median(cpu)))
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} done (load {loads[-1]:.2f})", flush=True)
    results = []
    for h, n, length in configs:
        row = {"H": h, "N": n, "L": length, **prepared[h, n, length]}
        for g in GRAPHS:
            row[g], row[f"{g}_cpu"] = (spread(v) for v in raw[h, n, length, g])
        for suffix in ("", "_cpu"):
            row[f"scan_over_chosen{suffix}"] = (row[f"scan{suffix}"]["median_ms"]
                                                / row[f"chosen{suffix}"]["median_ms"])
        results.append(row)
    fits = {f"H={h} L={length} {g}": fit(args.widths, [r[g]["median_ms"] for r in results
                                                       if (r["H"], r["L"]) == (h, length)])
            for h in args.hidden for length in args.lengths
            for g in (*GRAPHS, *(f"{g}_cpu" for g in GRAPHS)) if len(args.widths) >= 2}
    return {"results": results, "fits": fits, "load_avg_1m_per_round": loads}


def cell(d: dict) -> str:
    return f"{d['median_ms']:.3f} ± {d['iqr_ms'] / 2:.3f}"


def fits_table(fits: dict) -> str:
    return markdown_table(
        ["H / series", "floor ms", "fit: fixed ms", "fit: µs per state", "knee N*",
         f"N={FULL_N} / floor"],
        [[k, f"{v['floor_ms']:.3f}", f"{v['fit_fixed_ms']:.3f}", f"{v['fit_us_per_state']:.2f}",
          "-" if v["knee_N"] is None else f"{v['knee_N']:.0f}",
          "-" if v["full_over_floor"] is None else f"{v['full_over_floor']:.2f}x"]
         for k, v in fits.items()])


def markdown(p: dict) -> str:
    s, lines = p["settings"], []
    head = (f"{BLOCKS} {s.get('arch', 'lru')} blocks at width N, residual width H; batch 1, "
            f"one thread. Cells: median ± half-IQR over {s['rounds']} interleaved rounds "
            f"(each: the median call in >= {s['min_time_s_per_round']} s of calls), "
            "`session.run` from Python included. " + machine_line(p["machine"]) +
            f" Load per round: {p['load_avg_1m_per_round']}. Wall time {p['wall_time_s']} s.")
    if p["benchmark"] == "export_latency":
        lines += ["# Export latency: torch eager vs TorchScript vs onnxruntime", "", head,
                  "`seq` = ms per sequence of 40 tokens; `step` = ms per streamed token.", ""]
        for h in s["hidden"]:
            lines += [f"### H = {h}", "", markdown_table(
                ["N", *(f"{e} {m}" for m in MODES for e in ENGINES), "ORT step vs torch step",
                 "parity err"],
                [[r["N"], *(cell(r[f"{e}_{m}"]) for m in MODES for e in ENGINES),
                  f"{r['ort_step_speedup_vs_torch_step']:.1f}x",
                  f"{r['parity_max_abs_error']:.1e}"]
                 for r in p["results"] if r["H"] == h]), ""]
        lines += ["Where latency stops falling with N:", "", fits_table(p["floors"]), "",
                  f"onnxruntime call floor: {p['ort_call_floor']['median_ms']:.3f} ms."]
        return "\n".join(lines)
    lines += ["# Sequence graphs: per-token Scan vs the chosen (chunked) graph, onnxruntime",
              "", head, "`chosen T`: the chunk `export_bundle(chunk=\"auto\")` picked (scan: "
              "the per-token Scan won); CPU columns: the calling thread's CPU time.", ""]
    for h in s["hidden"]:
        for length in s["lengths"]:
            rows = [[r["N"], cell(r["scan"]), cell(r["chosen"]), r["choice"].get("chunk") or
                     "scan", f"{r['scan_over_chosen']:.2f}x", cell(r["scan_cpu"]),
                     cell(r["chosen_cpu"]), f"{r['scan_over_chosen_cpu']:.2f}x",
                     f"{r['graphs']['scan']['nodes']} / {r['graphs']['chosen']['nodes']}",
                     f"{max(g['parity_max_abs_error'] for g in r['graphs'].values()):.1e}"]
                    for r in p["results"] if (r["H"], r["L"]) == (h, length)]
            lines += [f"### H = {h}, L = {length}", "", markdown_table(
                ["N", "scan ms", "chosen ms", "chosen T", "scan / chosen", "scan CPU ms",
                 "chosen CPU ms", "CPU: scan / chosen", "nodes scan / chosen", "parity err"],
                rows), ""]
    return "\n".join(lines + ["Latency against state width:", "", fits_table(p["fits"])])


def plot(p: dict):
    def draw(path: Path) -> None:
        import matplotlib.pyplot as plt

        s = p["settings"]
        cols = MODES if p["benchmark"] == "export_latency" else s["lengths"]
        fig, axes = plt.subplots(len(s["hidden"]), len(cols), squeeze=False,
                                 figsize=(5.5 * len(cols), 4 * len(s["hidden"])))
        for i, h in enumerate(s["hidden"]):
            for j, col in enumerate(cols):
                ax = axes[i][j]
                if p["benchmark"] == "export_latency":
                    rows, series = [r for r in p["results"] if r["H"] == h], \
                        [(e, f"{e}_{col}") for e in ENGINES]
                else:
                    rows = [r for r in p["results"] if (r["H"], r["L"]) == (h, col)]
                    series = [(g, g) for g in GRAPHS]
                for label, key in series:
                    ax.errorbar([r["N"] for r in rows], [r[key]["median_ms"] for r in rows],
                                yerr=[r[key]["iqr_ms"] / 2 for r in rows], marker="o",
                                capsize=3, label=label)
                loglog_panel(ax, "state width N per block", "ms", f"H={h}, {col}")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return draw


def main() -> None:
    ap = parser(__doc__, "", quick="H=16, two widths, 2 short rounds: a smoke test")
    ap.add_argument("--mode", choices=("engines", "chunked"), default="engines")
    ap.add_argument("--widths", type=int_list, default=None,
                    help="state widths (engines: 1024..4; chunked: 4..1024)")
    ap.add_argument("--hidden", type=int_list, default=[64, 256], help="residual widths H")
    ap.add_argument("--lengths", type=int_list, default=[40, 256, 2000], help="chunked: L")
    ap.add_argument("--arch", choices=("lru", "selective"), default="lru", help="chunked only")
    ap.add_argument("--rounds", type=int, default=None, help="default 5 (chunked: 3)")
    ap.add_argument("--min-time-s", type=float, default=None, help="default 0.3 (chunked: 0.1)")
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    engines = args.mode == "engines"
    args.name = args.name or ("export_latency" if engines else "export_latency_chunked")
    args.widths = args.widths or ([1024, 512, 256, 128, 64, 32, 16, 12, 8, 4] if engines
                                  else [4, 8, 16, 32, 64, 128, 256, 512, 1024])
    args.rounds = args.rounds or (5 if engines else 3)
    args.min_time_s = args.min_time_s or (0.3 if engines else 0.1)
    if args.quick:
        args.hidden, args.widths, args.lengths = [16], [256, 12], [40, 100]
        args.rounds, args.min_time_s, args.warmup = 2, 0.02, 3
    torch.set_num_threads(1)
    started, load = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-export-") as root:
        payload = (run_engines if engines else run_chunked)(args, Path(root))
    payload = {"benchmark": args.name, "settings": {
        "arch": args.arch, "hidden": args.hidden, "widths": args.widths, "blocks": BLOCKS,
        "lengths": None if engines else args.lengths, "seq_len": SEQ_LEN, "batch": 1,
        "threads": 1, "rounds": args.rounds, "min_time_s_per_round": args.min_time_s,
        "warmup": args.warmup}, "machine": machine(load), **payload,
        "wall_time_s": round(time.time() - started, 1)}
    payload["benchmark"] = "export_latency" if engines else "export_latency_chunked"
    write(args.results_dir / args.name, payload, markdown(payload), plot(payload))


if __name__ == "__main__":
    main()
