"""Old per-token Scan graph vs the chunked sequence graph, onnxruntime, batch 1, 1 thread.

``old`` is today's graph exactly: ``build_sequence_model`` of the exporter as it was before
chunking (``--old-rev``, default :data:`OLD_REV`, loaded from git), so the ratio
is against what bundles held, not against the per-token graph as rebuilt by this change
(which shares the new block code, e.g. the fused GELU).

Models: 4 LRU blocks, d_input=1, 10 classes, mean pooling, every block at width N, residual
width H (random weights, BatchNorm statistics away from (0, 1), as bench_export_latency.py).
For each (H, N, L) the graph an export would write is chosen as ``export_bundle(chunk="auto")``
chooses it, by :func:`compressm_tune.exporter._chunk_choice.choose_chunk` at that length (its
own short timing, separate from the rounds below, so the comparison does not pick its own
winner); then ``scan`` (the graph every bundle held before, ``chunk=None``) and the chosen
graph are timed side by side in interleaved rounds: each round visits every (H, N, L, graph)
in a fresh random order, and a round of one graph is the median call in >= ``--min-time-s``
of calls (>= 3 calls) after 2 warm-up calls. Reported: median over rounds and half-IQR, the
ratio scan / chosen, each graph's parity against eager torch on the timed input, node count
(outer graph) and session-creation time, and per (H, L, graph) a least-squares line
``ms = fixed + slope * N`` with its knee ``N* = fixed / slope``.

    python benchmarks/bench_export_chunked.py                # ~10 minutes on 2 shared cores
    python benchmarks/bench_export_chunked.py --quick --out /tmp/ec   # smoke test

Writes ``bench_results/export_latency_chunked.{json,md,png}`` (or the ``--out`` prefix).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, int_list, loglog_panel, machine, write_prefix  # noqa: E402

from compressm_tune._table import markdown_table  # noqa: E402
from compressm_tune.exporter import (  # noqa: E402
    build_sequence_model,
    choose_chunk,
    extract_weights,
    ort_session,
)
from compressm_tune.models import SSMConfig, SSMModel  # noqa: E402

BLOCKS, CLASSES = 4, 10
OLD_REV = "36f5b93"  # the last commit before chunked graphs: its exporter built today's graph
GRAPHS = ("scan", "chosen")


def old_builder(rev: str):
    """``build_sequence_model`` of the exporter at git revision ``rev`` (today's graph)."""
    import types

    repo = Path(__file__).resolve().parent.parent
    if rev == "merge-base":
        rev = subprocess.run(["git", "merge-base", "HEAD", "main"], capture_output=True,
                             text=True, cwd=repo, check=True).stdout.strip()
    source = subprocess.run(["git", "show", f"{rev}:compressm_tune/exporter/_onnx_graph.py"],
                            capture_output=True, text=True, cwd=repo, check=True).stdout
    module = types.ModuleType("_old_onnx_graph")
    exec(compile(source, f"{rev}:compressm_tune/exporter/_onnx_graph.py", "exec"),
         module.__dict__)
    return rev, module.build_sequence_model


def build_model(h: int, n: int, arch: str = "lru", seed: int = 0) -> SSMModel:
    torch.manual_seed(seed)
    model = SSMModel(SSMConfig(arch=arch, d_input=1, d_output=CLASSES, d_model=h,
                               state_dims=[n] * BLOCKS))
    for block in model.blocks:
        block.norm.running_mean.normal_(0, 0.5)
        block.norm.running_var.uniform_(0.5, 2.0)
    return model.eval()


def prepare(h: int, n: int, length: int, x: np.ndarray, old, arch: str) -> dict:
    """Both graphs of one (H, N, L): sessions, choice, parity, size and load time."""
    model = build_model(h, n, arch)
    w = extract_weights(model)
    choice = choose_chunk(w, length)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    entry = {"choice": choice, "sessions": {}, "graphs": {}}
    for graph, chunk in (("scan", None), ("chosen", choice["chunk"])):
        proto = old(w) if graph == "scan" else build_sequence_model(w, chunk=chunk)
        raw = proto.SerializeToString()
        t0 = time.perf_counter()
        session = ort_session(raw, 1)
        load_ms = (time.perf_counter() - t0) * 1e3
        got = session.run(None, {"x": x})[0]
        entry["sessions"][graph] = session
        entry["graphs"][graph] = {
            "chunk": chunk, "nodes": len(proto.graph.node), "bytes": len(raw),
            "session_create_ms": load_ms, "parity_max_abs_error": float(np.abs(got - want).max())}
    return entry


def time_round(session, x: np.ndarray, min_time_s: float) -> tuple[float, float]:
    """Median wall and thread-CPU ms per call over >= ``min_time_s`` s (>= 3 calls) after 2
    warm-up calls. With one intra-op thread onnxruntime computes on the calling thread, so CPU
    time leaves out the time other processes held the core."""
    for _ in range(2):
        session.run(None, {"x": x})
    wall, cpu = [], []
    while sum(wall) < min_time_s or len(wall) < 3:
        t0, c0 = time.perf_counter(), time.thread_time()
        session.run(None, {"x": x})
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - t0)
    return float(np.median(wall)) * 1e3, float(np.median(cpu)) * 1e3


def summarize(values: list[float]) -> dict:
    q25, med, q75 = np.percentile(values, [25, 50, 75])
    return {"median_ms": float(med), "iqr_ms": float(q75 - q25), "rounds_ms": values}


def line_fit(widths: list[int], ms: list[float]) -> dict:
    slope, fixed = np.polyfit(widths, ms, 1)  # ms = fixed + slope * N
    return {"fixed_ms": float(fixed), "us_per_state": float(slope) * 1e3,
            "knee_N": float(fixed / slope) if slope > 0 and fixed > 0 else None}


def run(args) -> dict:
    torch.set_num_threads(1)
    started, load_before = time.time(), os.getloadavg()[0]
    configs = [(h, n, length) for h in args.hidden for length in args.lengths
               for n in args.widths if (h, n, length) not in args.skip]
    inputs = {length: np.random.default_rng(0).standard_normal((1, length, 1)).astype(np.float32)
              for length in args.lengths}
    old_rev, old = old_builder(args.old_rev)
    prepared = {}
    for cfg in configs:
        prepared[cfg] = prepare(*cfg, inputs[cfg[2]], old, args.arch)
        print(f"prepared H={cfg[0]} N={cfg[1]} L={cfg[2]}: chosen "
              f"{prepared[cfg]['choice']['chunk'] or 'scan'}", flush=True)
    raw: dict[tuple, list[float]] = {}
    loads, rng = [], np.random.default_rng(1)
    for r in range(args.rounds):
        jobs = [(cfg, graph) for cfg in configs for graph in GRAPHS]
        for i in rng.permutation(len(jobs)):
            cfg, graph = jobs[i]
            session, x = prepared[cfg]["sessions"][graph], inputs[cfg[2]]
            wall, cpu = time_round(session, x, args.min_time_s)
            raw.setdefault((*cfg, graph), []).append(wall)
            raw.setdefault((*cfg, f"{graph}_cpu"), []).append(cpu)
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} done (load {loads[-1]:.2f})", flush=True)
    results = []
    for cfg in configs:
        row = {"H": cfg[0], "N": cfg[1], "L": cfg[2], "choice": prepared[cfg]["choice"],
               "graphs": prepared[cfg]["graphs"]}
        for graph in GRAPHS:
            row[graph] = summarize(raw[(*cfg, graph)])
            row[f"{graph}_cpu"] = summarize(raw[(*cfg, f"{graph}_cpu")])
        row["scan_over_chosen"] = row["scan"]["median_ms"] / row["chosen"]["median_ms"]
        row["scan_over_chosen_cpu"] = (row["scan_cpu"]["median_ms"]
                                       / row["chosen_cpu"]["median_ms"])
        results.append(row)
    fits = {}
    for h in args.hidden:
        for length in args.lengths:
            rows = [r for r in results if r["H"] == h and r["L"] == length]
            if len(rows) >= 2:
                for graph in (*GRAPHS, *(f"{g}_cpu" for g in GRAPHS)):
                    fits[f"H={h} L={length} {graph}"] = line_fit(
                        [r["N"] for r in rows], [r[graph]["median_ms"] for r in rows])
    return {
        "benchmark": "export_latency_chunked",
        "settings": {"arch": args.arch, "hidden": args.hidden, "widths": args.widths,
                     "lengths": args.lengths,
                     "blocks": BLOCKS, "batch": 1, "threads": 1, "rounds": args.rounds,
                     "min_time_s_per_round": args.min_time_s,
                     "skipped": [list(s) for s in sorted(args.skip)], "old_rev": old_rev,
                     "statistic": "median over rounds of each round's median call; IQR over "
                                  "rounds"},
        "machine": {**machine(), "load_avg_1m_before": load_before,
                    "load_avg_1m_per_round": loads, "load_avg_1m_after": os.getloadavg()[0]},
        "results": results, "fits": fits, "wall_time_s": round(time.time() - started, 1),
    }


def _targets(payload: dict) -> str:
    res = payload["results"]
    if payload["settings"].get("arch", "lru") != "lru":
        return "- (issue 12's targets are for LRU networks; see the LRU run)"

    def pick(h, length, n):
        return next((r for r in res if (r["H"], r["L"], r["N"]) == (h, length, n)), None)

    lines = []
    for suffix, clock in (("", "wall clock"), ("_cpu", "thread CPU time")):
        small = [r for r in res if r["H"] == 64 and r["L"] == 40 and r["N"] <= 32]
        if small:
            ratios = [r[f"scan_over_chosen{suffix}"] for r in small]
            lines.append(f"- ({clock}) H=64, L=40, N <= 32: scan / chosen = {min(ratios):.2f}x "
                         f".. {max(ratios):.2f}x (target >= 4x: "
                         f"{'met' if min(ratios) >= 4 else 'NOT met'}).")
        r16, r256 = pick(64, 40, 16), pick(64, 40, 256)
        if r16 and r256:
            q = {g: r256[g + suffix]["median_ms"] / r16[g + suffix]["median_ms"] for g in GRAPHS}
            lines.append(f"- ({clock}) H=64, L=40, latency(N=256) / latency(N=16): chosen "
                         f"{q['chosen']:.2f} (target >= 2: "
                         f"{'met' if q['chosen'] >= 2 else 'NOT met'}), scan {q['scan']:.2f}.")
        for h in payload["settings"]["hidden"]:
            long = [r for r in res if r["H"] == h and r["L"] == 2000]
            if long:
                ratios = [r[f"scan_over_chosen{suffix}"] for r in long]
                lines.append(f"- ({clock}) H={h}, L=2000: scan / chosen = {min(ratios):.2f}x .. "
                             f"{max(ratios):.2f}x over N = {[r['N'] for r in long]} (target: "
                             "chosen not slower).")
    return "\n".join(lines)


def markdown(payload: dict) -> str:
    s, m = payload["settings"], payload["machine"]

    def cell(d):
        return f"{d['median_ms']:.3f} ± {d['iqr_ms'] / 2:.3f}"

    tables = []
    for h in s["hidden"]:
        for length in s["lengths"]:
            rows = [[r["N"], cell(r["scan"]), cell(r["chosen"]),
                     r["choice"]["chunk"] or "scan", f"{r['scan_over_chosen']:.2f}x",
                     cell(r["scan_cpu"]), cell(r["chosen_cpu"]),
                     f"{r['scan_over_chosen_cpu']:.2f}x",
                     f"{r['graphs']['scan']['nodes']} / {r['graphs']['chosen']['nodes']}",
                     f"{r['graphs']['scan']['session_create_ms']:.0f} / "
                     f"{r['graphs']['chosen']['session_create_ms']:.0f}",
                     f"{r['graphs']['chosen']['bytes'] / 1e6:.2f}",
                     f"{max(g['parity_max_abs_error'] for g in r['graphs'].values()):.1e}"]
                    for r in payload["results"] if r["H"] == h and r["L"] == length]
            if rows:
                tables.append(f"### H = {h}, L = {length}\n\n" + markdown_table(
                    ["N", "scan ms", "chosen ms", "chosen T", "scan / chosen",
                     "scan CPU ms", "chosen CPU ms", "CPU: scan / chosen",
                     "nodes scan / chosen", "session ms scan / chosen", "chosen MB",
                     "parity err"], rows))
    choice_rows = [[r["H"], r["N"], r["L"], ", ".join(
        f"{k}: {v:.3f}" for k, v in r["choice"]["median_ms"].items())]
        for r in payload["results"]]
    fit_rows = [[k, f"{v['fixed_ms']:.3f}", f"{v['us_per_state']:.2f}",
                 "-" if v["knee_N"] is None else f"{v['knee_N']:.0f}"]
                for k, v in payload["fits"].items()]
    loads = ", ".join(f"{x:.2f}" for x in m["load_avg_1m_per_round"])
    skipped = f" Skipped (too slow for the time box): {s['skipped']}." if s["skipped"] else ""
    tables_md = "\n\n".join(tables)
    fits_md = markdown_table(["H / L / graph", "fixed ms", "µs per state", "knee N*"], fit_rows)
    choices_md = markdown_table(["H", "N", "L", "candidate: median ms"], choice_rows)
    return f"""# Sequence graphs: per-token Scan vs chunked (onnxruntime, batch 1, 1 thread)

Models: {s['blocks']} {s['arch']} blocks, 10 classes, mean pooling, every block at width N, residual
width H. `scan` = today's graph: the per-token Scan graph built by the exporter at git
revision {s['old_rev'][:10]} (before chunking), what every bundle held; `chosen` = the graph
`export_bundle(chunk="auto")` picks for this length (`choose_chunk`, timed separately before
the rounds; `chosen T` = scan when the per-token Scan won, then as rebuilt by this change,
with the fused GELU). Cells: ms per sequence, median ± half-IQR
over {s['rounds']} interleaved rounds (each: median call in >= {s['min_time_s_per_round']} s,
>= 3 calls, after 2 warm-ups), `session.run` from Python included; `CPU` columns: the
calling thread's CPU time of the same calls (onnxruntime with one intra-op thread computes on
the calling thread, so this leaves out the time other processes held the core: the robust
figure on a shared machine, while wall clock is what a user waits). `nodes`: outer-graph node
count; `session ms`: `InferenceSession` creation; `parity err`: max abs error against eager
torch on the timed input.{skipped}

Machine: {m['cpu']}, {m['cores']} cores, **shared with other jobs**; torch {m['torch']};
1-minute load average {m['load_avg_1m_before']:.2f} before, per round [{loads}],
{m['load_avg_1m_after']:.2f} after. Wall time {payload['wall_time_s']} s.

**Targets**

{_targets(payload)}

{tables_md}

**Latency against state width**: least-squares `ms = fixed + slope * N` over the widths
measured; knee `N* = fixed / slope`, the width at which state work equals the fixed cost.

{fits_md}

**The choice** (`choose_chunk`, before the rounds: every candidate graph of this change, `scan`
= its per-token Scan; {payload['results'][0]['choice']['method'] if payload['results'] else ''}):

{choices_md}
"""


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = payload["settings"]
    fig, axes = plt.subplots(len(s["hidden"]), len(s["lengths"]),
                             figsize=(5 * len(s["lengths"]), 4 * len(s["hidden"])), squeeze=False)
    for i, h in enumerate(s["hidden"]):
        for j, length in enumerate(s["lengths"]):
            ax = axes[i][j]
            rows = [r for r in payload["results"] if r["H"] == h and r["L"] == length]
            for graph, marker in zip(GRAPHS, "os", strict=True):
                ax.errorbar([r["N"] for r in rows], [r[graph]["median_ms"] for r in rows],
                            yerr=[r[graph]["iqr_ms"] / 2 for r in rows], marker=marker,
                            capsize=3, label=graph)
            loglog_panel(ax, "state width N per block", f"ms per sequence (L={length})",
                         f"H={h}, L={length}, batch 1, 1 thread")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int_list, default=[4, 8, 16, 32, 64, 128, 256, 512, 1024])
    p.add_argument("--hidden", type=int_list, default=[64, 256])
    p.add_argument("--arch", choices=("lru", "selective"), default="lru")
    p.add_argument("--lengths", type=int_list, default=[40, 256, 2000])
    p.add_argument("--skip", default="", help="H:N:L triples to leave out, comma-separated")
    p.add_argument("--old-rev", default=OLD_REV,
                   help="git revision whose exporter builds the old graph (default: the last "
                        f"commit before chunked graphs, {OLD_REV}; 'merge-base': with main)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-time-s", type=float, default=0.1)
    p.add_argument("--quick", action="store_true", help="H=16, N 4,64, L 40,100; 2 rounds")
    p.add_argument("--out", type=Path, default=RESULTS / "export_latency_chunked")
    args = p.parse_args()
    args.skip = {tuple(int(v) for v in t.split(":")) for t in args.skip.split(",") if t}
    if args.quick:
        args.hidden, args.widths, args.lengths = [16], [4, 64], [40, 100]
        args.rounds, args.min_time_s = 2, 0.02
    write_prefix(args.out, run(args), markdown, plot)


if __name__ == "__main__":
    main()
