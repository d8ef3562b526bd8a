"""Per-sample inference latency of exported LRU networks: torch eager vs TorchScript vs onnxruntime.

Models: 4 LRU blocks, d_input=1, 10 classes, mean pooling, at residual width H=64 (the DESIGN.md
default) and H=256 (``--hidden``), each at every state width N in ``--widths`` (256 = the full
model; 32 and 12 = reduced; 1024 .. 4 to show the trend), random weights with BatchNorm
statistics away from (0, 1). Each width is exported with ``export_bundle`` (default
parity checks, recorded) and timed, batch 1, one intra-op thread everywhere:

``sequence``  one call on a whole sequence of L=40 tokens (MNIST-1D's length), ms per sequence;
``step``      one streaming call (one token, states fed back), ms per token.

Engines: ``torch`` = ``SSMModel`` eager (``forward`` with the C scan kernel, ``step``) under
``inference_mode``; ``torchscript`` = the bundle's ``model.ts``; ``onnxruntime`` = the bundle's
graphs through ``compressm_tune.exporter.measure_latency`` (the function the budget job calls).
All three use the same rule: ``--warmup`` untimed calls, then calls timed one by one with
``time.perf_counter`` until ``--min-time-s`` of work and at least 20 calls; the statistic of
one such round is its median. ``--rounds`` rounds are interleaved over widths and engines so
drifts in machine load hit all alike; reported are the median over rounds and the IQR over
rounds. ``ort-call-floor`` is an onnxruntime graph of Identity ops with the step graph's
inputs: the fixed cost of one ``session.run`` from Python, below which no width can go.

    python benchmarks/bench_export_latency.py                 # ~3 minutes on 2 cores
    python benchmarks/bench_export_latency.py --quick --out /tmp/el   # smoke test

Writes ``bench_results/export_latency.{json,md,png}`` (or the ``--out`` prefix).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine  # noqa: E402

from compressm_tune._table import markdown_table  # noqa: E402
from compressm_tune.exporter import export_bundle, measure_latency, time_calls  # noqa: E402
from compressm_tune.models import SSMConfig, SSMModel  # noqa: E402
from compressm_tune.training import save_checkpoint  # noqa: E402

ENGINES = ("torch", "torchscript", "onnxruntime")
MODES = ("sequence", "step")
SEQ_LEN, BLOCKS, CLASSES = 40, 4, 10
FULL_N, REDUCED_N = 256, (32, 12)
FLOOR_TOLERANCE = 1.10  # a width is "on the floor" within 10% of the fastest width


def build_bundle(h: int, n: int, root: Path, seed: int = 0):
    torch.manual_seed(seed)
    model = SSMModel(SSMConfig(d_input=1, d_output=CLASSES, d_model=h, state_dims=[n] * BLOCKS))
    for block in model.blocks:
        block.norm.running_mean.normal_(0, 0.5)
        block.norm.running_var.uniform_(0.5, 2.0)
    model.eval()
    ckpt = root / f"h{h}-n{n}.pt"
    save_checkpoint(ckpt, model, dataset={
        "name": "synthetic", "task": "classification", "d_input": 1, "d_output": CLASSES,
        "seq_len": SEQ_LEN, "norm_mean": [0.0], "norm_std": [1.0], "info": {}})
    bundle = root / f"bundle-h{h}-n{n}"
    manifest = export_bundle(ckpt, bundle, threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(bundle / "model.ts"))
    return model, scripted, bundle, manifest


def torch_round(module, mode: str, x: torch.Tensor, min_time_s: float, warmup: int) -> float:
    """Median ms of one round for eager torch or TorchScript (``module`` has forward/step)."""
    state = [module.allocate_state(1)]
    if mode == "sequence":
        def call(i):
            module(x)
    else:
        def call(i):
            if i % SEQ_LEN == 0:
                state[0] = module.allocate_state(1)
            state[0] = module.step(x[:, i % SEQ_LEN], state[0])[1]
    with torch.inference_mode():
        return float(np.median(time_calls(call, min_time_s, warmup))) * 1e3


def ort_call_floor(bundle: Path, min_time_s: float, warmup: int) -> float:
    """Median ms of ``session.run`` on a graph that only copies the step graph's inputs."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    step = onnx.load(str(bundle / "model_step.onnx"))
    nodes = [helper.make_node("Identity", [i.name], [f"out_{i.name}"]) for i in step.graph.input]
    outputs = [helper.make_tensor_value_info(f"out_{i.name}", onnx.TensorProto.FLOAT, None)
               for i in step.graph.input]
    graph = helper.make_graph(nodes, "floor", list(step.graph.input), outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros([1 if isinstance(d, str) else d for d in i.shape], np.float32)
             for i in session.get_inputs()}
    return float(np.median(time_calls(lambda i: session.run(None, feeds), min_time_s,
                                      warmup))) * 1e3


def summarize(values: list[float]) -> dict:
    q25, med, q75 = np.percentile(values, [25, 50, 75])
    return {"median_ms": float(med), "iqr_ms": float(q75 - q25), "rounds_ms": values}


def floor_width(widths: list[int], medians: list[float]) -> int:
    """The largest width whose latency is within FLOOR_TOLERANCE of the fastest width."""
    best = min(medians)
    return max(n for n, m in zip(widths, medians, strict=True) if m <= FLOOR_TOLERANCE * best)


def run(args) -> dict:
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    started = time.time()
    root = Path(tempfile.mkdtemp(prefix="bench-export-"))
    configs = [(h, n) for h in args.hidden for n in args.widths]
    built = {}
    for h, n in configs:
        model, scripted, bundle, manifest = build_bundle(h, n, root)
        built[h, n] = (model, scripted, bundle, manifest["parity"]["max_abs_error"])
        print(f"exported H={h} N={n}: parity max abs error {built[h, n][3]:.2e}", flush=True)
    x = torch.randn(1, SEQ_LEN, 1, generator=torch.Generator().manual_seed(0))
    raw: dict[tuple, list[float]] = {}
    floors: list[float] = []
    loads = []
    for r in range(args.rounds):
        for h, n in configs:
            model, scripted, bundle, _ = built[h, n]
            for mode in MODES:
                for engine in ENGINES:
                    if engine == "onnxruntime":
                        ms = measure_latency(bundle, mode, threads=1, min_time_s=args.min_time_s,
                                             warmup=args.warmup)["p50_ms"]
                    else:
                        module = model if engine == "torch" else scripted
                        ms = torch_round(module, mode, x, args.min_time_s, args.warmup)
                    raw.setdefault((engine, mode, h, n), []).append(ms)
        floors.append(ort_call_floor(built[configs[-1]][2], args.min_time_s, args.warmup))
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} done (load {loads[-1]:.2f})", flush=True)
    results, floor_info = [], {}
    for h in args.hidden:
        for n in args.widths:
            row = {"H": h, "N": n, "parity_max_abs_error": built[h, n][3]}
            for engine in ENGINES:
                for mode in MODES:
                    row[f"{engine}_{mode}"] = summarize(raw[(engine, mode, h, n)])
            for mode in MODES:
                row[f"ort_{mode}_speedup_vs_torch_{mode}"] = (
                    row[f"torch_{mode}"]["median_ms"] / row[f"onnxruntime_{mode}"]["median_ms"])
            results.append(row)
        for engine in ENGINES:
            for mode in MODES:
                med = [r[f"{engine}_{mode}"]["median_ms"] for r in results if r["H"] == h]
                slope, fixed = np.polyfit(args.widths, med, 1)  # ms = fixed + slope * N
                floor_info[f"H={h} {engine} {mode}"] = {
                    "floor_ms": min(med), "flat_from_N": floor_width(args.widths, med),
                    "fit_fixed_ms": float(fixed), "fit_us_per_state": float(slope) * 1e3,
                    "knee_N": float(fixed / slope) if slope > 0 and fixed > 0 else None,
                    "full_over_floor": med[args.widths.index(FULL_N)] / min(med)
                    if FULL_N in args.widths else None}
    return {
        "benchmark": "export_latency",
        "settings": {"hidden": args.hidden, "widths": args.widths, "blocks": BLOCKS,
                     "seq_len": SEQ_LEN, "batch": 1, "threads": 1, "rounds": args.rounds,
                     "min_time_s_per_round": args.min_time_s, "warmup": args.warmup,
                     "statistic": "median over rounds of each round's median call time; IQR "
                                  "over rounds"},
        "machine": {**machine(), "load_avg_1m_before": load_before[0],
                    "load_avg_1m_per_round": loads, "load_avg_1m_after": os.getloadavg()[0]},
        "results": results,
        "floors": floor_info,
        "ort_call_floor": summarize(floors),
        "wall_time_s": round(time.time() - started, 1),
        "_root": root,
    }


def markdown(payload: dict) -> str:
    s, m = payload["settings"], payload["machine"]

    def cell(d):
        return f"{d['median_ms']:.3f} ± {d['iqr_ms'] / 2:.3f}"

    def label(n):
        return f"{n} (full)" if n == FULL_N else f"{n} (reduced)" if n in REDUCED_N else str(n)

    tables = []
    for h in s["hidden"]:
        rows = [[label(r["N"]), *(cell(r[f"{e}_sequence"]) for e in ENGINES),
                 *(cell(r[f"{e}_step"]) for e in ENGINES),
                 f"{r['ort_step_speedup_vs_torch_step']:.1f}x",
                 f"{r['parity_max_abs_error']:.1e}"]
                for r in payload["results"] if r["H"] == h]
        tables.append(f"### H = {h}\n\n" + markdown_table(
            ["N", "torch seq", "TorchScript seq", "onnxruntime seq", "torch step",
             "TorchScript step", "onnxruntime step", "ORT step vs torch step", "parity err"],
            rows))
    floor_rows = [[k, f"{v['floor_ms']:.3f}", v["flat_from_N"],
                   "-" if v["full_over_floor"] is None else f"{v['full_over_floor']:.2f}x",
                   f"{v['fit_fixed_ms']:.3f}", f"{v['fit_us_per_state']:.2f}",
                   "-" if v["knee_N"] is None else f"{v['knee_N']:.0f}"]
                  for k, v in payload["floors"].items()]
    loads = ", ".join(f"{x:.2f}" for x in m["load_avg_1m_per_round"])
    speedups = [r["ort_step_speedup_vs_torch_step"] for r in payload["results"]]
    tables_md = "\n\n".join(tables)
    floors_md = markdown_table(["H / engine / mode", "floor ms", "flat from N",
                                f"N={FULL_N} / floor", "fit: fixed ms", "fit: µs per state",
                                "knee N* = fixed / slope"], floor_rows)
    return f"""# Export latency: torch eager vs TorchScript vs onnxruntime (batch 1, 1 thread)

Models: {s['blocks']} LRU blocks, 10 classes, mean pooling, every block at width N, residual
width H in {s['hidden']}. `seq` = ms per sequence of L={s['seq_len']} tokens; `step` = ms per
streamed token (states fed back). Cells: median ± half-IQR over {s['rounds']} interleaved
rounds (each round: the median call in >= {s['min_time_s_per_round']} s of calls after
{s['warmup']} warm-up calls). onnxruntime is timed with
`compressm_tune.exporter.measure_latency` (Python `session.run` overhead included); torch and
TorchScript with the same rule. `parity err`: the export's own max abs error against eager torch
(batch 1 and 3, lengths 1, 40 and 2000, every engine and mode).

Machine: {m['cpu']}, {m['cores']} cores, **shared with other jobs**; torch {m['torch']};
1-minute load average {m['load_avg_1m_before']:.2f} before, per round [{loads}],
{m['load_avg_1m_after']:.2f} after (a load above 1 means other processes competed for the
cores, so absolute numbers are pessimistic and noisy). Wall time {payload['wall_time_s']} s.

{tables_md}

**Target (onnxruntime streaming step >= 2x faster than torch eager step):**
{'met' if min(speedups) >= 2 else 'NOT met'} at every H and N (speed-up
{min(speedups):.1f}x .. {max(speedups):.1f}x).

**Where latency stops falling with N.** Floor = the fastest width's latency; "flat from N" =
the largest width within {int(round((FLOOR_TOLERANCE - 1) * 100))}% of the floor; below it a
smaller state buys nothing, because fixed costs dominate: the per-call and per-operator
overhead (Python -> runtime, one kernel launch per op) and, in sequence mode, the per-iteration
cost of the time loop (onnxruntime `Scan`, TorchScript's interpreted loop), not the O(N·H)
arithmetic. `N=256 / floor`: how much slower the full model is than that floor. Because
single points are noisy on a shared machine, a straight line `ms = fixed + slope * N` is also
fitted through all widths: the knee `N* = fixed / slope` is the width at which the state work
equals the fixed cost; well below N* shrinking the state cannot lower latency by much.

{floors_md}

onnxruntime call floor (a graph of Identity ops with the step graph's inputs, i.e. the cost of
one `session.run` from Python): {payload['ort_call_floor']['median_ms']:.3f} ms.
"""


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hidden = payload["settings"]["hidden"]
    fig, axes = plt.subplots(len(hidden), 2, figsize=(11, 4 * len(hidden)), squeeze=False)
    for row, h in enumerate(hidden):
        rows = [r for r in payload["results"] if r["H"] == h]
        widths = [r["N"] for r in rows]
        for ax, mode in zip(axes[row], MODES, strict=True):
            for engine, marker in zip(ENGINES, "osd", strict=True):
                med = [r[f"{engine}_{mode}"]["median_ms"] for r in rows]
                iqr = [r[f"{engine}_{mode}"]["iqr_ms"] / 2 for r in rows]
                ax.errorbar(widths, med, yerr=iqr, marker=marker, capsize=3, label=engine)
            if mode == "step":
                ax.axhline(payload["ort_call_floor"]["median_ms"], color="gray", ls="--",
                           label="onnxruntime call floor")
            for n in (FULL_N, *REDUCED_N):
                ax.axvline(n, color="lightgray", lw=0.8, zorder=0)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("state width N per block (grey: full 256, reduced 32 and 12)")
            unit = f"ms per sequence (L={SEQ_LEN})" if mode == "sequence" else "ms per token"
            ax.set_ylabel(unit)
            ax.set_title(f"H={h}, {mode} mode, batch 1, 1 thread")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    p.add_argument("--widths", type=ints, default=[1024, 512, 256, 128, 64, 32, 16, 12, 8, 4])
    p.add_argument("--hidden", type=ints, default=[64, 256], help="residual widths H")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-time-s", type=float, default=0.3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="H=16, widths 256,12; 2 short rounds")
    p.add_argument("--out", type=Path, default=RESULTS / "export_latency",
                   help="output prefix (default: bench_results/export_latency)")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.widths = [16], [256, 12]
        args.rounds, args.min_time_s, args.warmup = 2, 0.05, 3
    args.widths = sorted(set(args.widths), reverse=True)
    payload = run(args)
    shutil.rmtree(payload.pop("_root"), ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(payload))
    plot(payload, args.out.with_suffix(".png"))
    print(markdown(payload))


if __name__ == "__main__":
    main()
