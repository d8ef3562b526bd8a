"""Forward + backward time of the selective (S6) layer: fused C kernel vs the torch path.

Two workloads at batch 64, L 40, H 64, for N in (128, 64, 32, 16, 8):

``layer``  one :class:`SelectiveLayer`, ``u (64, 40, 64) -> y``; loss ``sum(y * g)`` for a fixed
           random ``g``; time of forward + backward (gradients of every parameter and of ``u``);
``model``  a 2-block :class:`SSMModel` (``arch="selective"``, d_input 1, 10 classes, dropout as
           default, train mode), cross-entropy on random data; forward + backward.

Implementations, in the same process: ``kernel`` (the C kernel, CPU float32) and ``torch``
(``compressm_tune.models.selective._scan_kernel = None``: discretize + chunked scan +
contraction, the fallback without a compiler and the GPU path). Per configuration both are built
and warmed up, then the repeats alternate kernel, torch, kernel, ... so slow drifts in machine
load hit both alike. Reported per cell: median and interquartile range of the wall time, the
median CPU time of this process (with one thread, the part of the wall time the machine actually
gave us), and torch / kernel ratios of the medians. The machine's load from other processes is
measured over the run (from /proc/stat minus this process's CPU time) and written to the report.

    python benchmarks/bench_selective_throughput.py [--repeats 5] [--threads 1 2]
    python benchmarks/bench_selective_throughput.py --quick --out /tmp/sel   # smoke test
    python benchmarks/bench_selective_throughput.py --report-only RESULT.json   # md only

Writes ``bench_results/selective_throughput.{json,md}`` (``--out NAME`` for another name).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write  # noqa: E402

from compressm_tune.models import SelectiveLayer, SSMConfig, SSMModel, selective  # noqa: E402

BATCH, LENGTH, HIDDEN, BLOCKS, CLASSES = 64, 40, 64, 2, 10
GRID_N = (128, 64, 32, 16, 8)
IMPLS = ("kernel", "torch")
_KERNEL = selective._scan_kernel  # the module handle, restored after each torch-path call


def _cpu_busy_s() -> float:
    """CPU-seconds spent by all processes since boot (user + nice + system + irq + softirq)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return sum(int(fields[i]) for i in (0, 1, 2, 5, 6)) / os.sysconf("SC_CLK_TCK")


def _workload(kind: str, n: int, length: int):
    """A closure running one forward + backward of ``kind`` ("layer" or "model") at width n."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "layer":
        layer = SelectiveLayer(d_model=HIDDEN, state_dim=n)
        u = torch.randn(BATCH, length, HIDDEN, generator=g).requires_grad_()  # (B, L, H)
        grad_y = torch.randn(BATCH, length, HIDDEN, generator=g)  # (B, L, H)

        def run() -> torch.Tensor:
            layer.zero_grad(set_to_none=True)
            u.grad = None
            y = layer(u)  # (B, L, H)
            (y * grad_y).sum().backward()
            return y.detach()

        return run
    model = SSMModel(SSMConfig(arch="selective", d_input=1, d_output=CLASSES,
                               d_model=HIDDEN, state_dims=[n] * BLOCKS))
    model.train()
    x = torch.randn(BATCH, length, 1, generator=g)  # (B, L, 1)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=g)

    def run() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)  # the same dropout masks for both implementations
        logits = model(x)  # (B, classes)
        F.cross_entropy(logits, labels).backward()
        return logits.detach()

    return run


def _call(impl: str, run) -> tuple[float, float, torch.Tensor]:
    """One timed call: (wall s, this process's CPU s, output)."""
    selective._scan_kernel = _KERNEL if impl == "kernel" else None
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        out = run()
        return time.perf_counter() - wall, time.process_time() - cpu, out
    finally:
        selective._scan_kernel = _KERNEL


def _stats(values: list[float]) -> dict[str, Any]:
    ms = np.asarray(values) * 1e3
    q25, q50, q75 = np.percentile(ms, [25, 50, 75])
    return {"median_ms": float(q50), "iqr_ms": float(q75 - q25), "min_ms": float(ms.min()),
            "max_ms": float(ms.max()), "all_ms": [round(float(v), 2) for v in ms]}


def measure(kind: str, n: int, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(threads)
    run = _workload(kind, n, args.length)
    impls = IMPLS if _KERNEL is not None else ("torch",)
    outs = {}
    for impl in impls:  # warm-up: allocator, thread pool, first-call costs
        for _ in range(args.warmup):
            outs[impl] = _call(impl, run)[2]
    wall: dict[str, list[float]] = {impl: [] for impl in impls}
    cpu: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(args.repeats):
        for impl in impls:  # interleaved, so load drifts hit both alike
            w, c, _ = _call(impl, run)
            wall[impl].append(w)
            cpu[impl].append(c)
    row: dict[str, Any] = {"kind": kind, "N": n, "threads": threads}
    for impl in impls:
        row[impl] = {**_stats(wall[impl]), "cpu_median_ms": float(np.median(cpu[impl]) * 1e3)}
    if "kernel" in row:
        row["torch_over_kernel"] = row["torch"]["median_ms"] / row["kernel"]["median_ms"]
        row["torch_over_kernel_cpu"] = (row["torch"]["cpu_median_ms"]
                                        / row["kernel"]["cpu_median_ms"])
        ref = outs["torch"]
        row["max_rel_diff"] = float((outs["kernel"] - ref).abs().max() / ref.abs().max())
    print(f"{kind:5s} N={n:3d} threads={threads}: " + ", ".join(
        f"{impl} {row[impl]['median_ms']:.1f} ms" for impl in impls), file=sys.stderr)
    return row


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Selective (S6) layer: fused C kernel vs torch path",
        "",
        f"Forward + backward at batch {report['batch']}, L {report['length']}, "
        f"H {report['hidden']}; `layer` = one SelectiveLayer, `model` = a {BLOCKS}-block "
        "SSMModel (arch=selective) with cross-entropy. Wall time: median (IQR) over "
        f"{report['repeats']} interleaved repeats after {report['warmup']} warm-up; CPU = median "
        "CPU time of the process; ratio = torch / kernel of the medians.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit "
        f"{m['git_commit']} (plus the uncommitted kernel). Load from other processes during "
        f"the run: {report['other_load_cores']:.2f} cores on average (load average "
        f"{report['load_avg_start']:.2f} at the start, {report['load_avg_end']:.2f} at the end).",
    ]
    if not report["kernel_built"]:
        lines += ["", "**The C kernel is not built here: torch path only.**"]
    if report["other_load_cores"] > 0.25 * m["cores"]:
        lines += [
            "",
            f"**The machine was shared and loaded** (other processes used "
            f"{report['other_load_cores']:.1f} of {m['cores']} cores): wall times are inflated "
            "and noisy. Kernel and torch repeats were interleaved, so their ratio is the "
            "number to read; the CPU-time ratio (one thread) is the less load-sensitive one.",
        ]
        if len(report["threads"]) > 1:
            lines += [
                "",
                "With more threads than free cores, the OpenMP threads (torch's and the "
                "kernel's share one libgomp pool) wait on each other at every parallel region: "
                "the CPU columns grow with the thread count although the work does not, so on "
                "this machine the multi-thread tables measure contention rather than the kernel.",
            ]
    for threads in report["threads"]:
        lines += ["", f"## {threads} thread{'s' if threads > 1 else ''}", "",
                  "| workload | N | kernel ms | torch ms | torch / kernel | CPU: kernel ms | "
                  "CPU: torch ms | CPU ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["results"]:
            if r["threads"] != threads:
                continue
            cells = []
            for impl in IMPLS:
                s = r.get(impl)
                cells.append(f"{s['median_ms']:.1f} ({s['iqr_ms']:.1f})" if s else "-")
            ratio = f"{r['torch_over_kernel']:.1f}x" if "torch_over_kernel" in r else "-"
            cpu = [f"{r[i]['cpu_median_ms']:.1f}" if i in r else "-" for i in IMPLS]
            cpu_ratio = (f"{r['torch_over_kernel_cpu']:.1f}x" if "torch_over_kernel_cpu" in r
                         else "-")
            lines.append(f"| {r['kind']} | {r['N']} | {cells[0]} | {cells[1]} | {ratio} | "
                         f"{cpu[0]} | {cpu[1]} | {cpu_ratio} |")
    lines += ["", "## Reading it", ""]
    for threads in report["threads"]:
        for kind in ("layer", "model"):
            rows = {r["N"]: r for r in report["results"]
                    if r["threads"] == threads and r["kind"] == kind}
            if not rows or "kernel" not in rows[max(rows)]:
                continue
            hi, lo = rows[max(rows)], rows[min(rows)]
            ratios = [r["torch_over_kernel"] for r in rows.values()]
            lines.append(
                f"- {kind}, {threads} thread(s): the kernel is {min(ratios):.1f}-"
                f"{max(ratios):.1f}x faster than the torch path (wall medians); at N={hi['N']} "
                f"{hi['kernel']['median_ms']:.0f} vs {hi['torch']['median_ms']:.0f} ms. With the "
                f"kernel, N={hi['N']} -> N={lo['N']} cuts the time "
                f"{hi['kernel']['median_ms'] / lo['kernel']['median_ms']:.1f}x (torch path: "
                f"{hi['torch']['median_ms'] / lo['torch']['median_ms']:.1f}x).")
    diffs = [r["max_rel_diff"] for r in report["results"] if "max_rel_diff" in r]
    if diffs:
        lines.append(f"- Outputs of the two paths agree to {max(diffs):.1e} (max |diff| / "
                     "max |output|, float32).")
    lines += ["", "Per-repeat times are in the `.json`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per implementation (5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first (1)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1],
                    help="torch / kernel thread counts to run (default: 1, as the training "
                         "benchmarks' workers)")
    ap.add_argument("--n", type=int, nargs="+", default=list(GRID_N), help="state widths")
    ap.add_argument("--quick", action="store_true", help="L=8, N in (16, 8), 2 repeats: smoke")
    ap.add_argument("--out", default="selective_throughput",
                    help="result name under bench_results/ (default selective_throughput)")
    ap.add_argument("--report-only", type=Path, metavar="JSON",
                    help="no measuring: rewrite the .md from a saved .json")
    args = ap.parse_args()
    if args.report_only:
        report = json.loads(args.report_only.read_text())
        args.report_only.with_suffix(".md").write_text(markdown(report))
        print(markdown(report))
        return
    args.length = LENGTH
    if args.quick:
        args.length, args.n, args.repeats = 8, [16, 8], 2
    load_start = os.getloadavg()[0]
    busy0, own0, wall0 = _cpu_busy_s(), time.process_time(), time.perf_counter()
    results = [measure(kind, n, threads, args)
               for threads in args.threads for kind in ("layer", "model") for n in args.n]
    elapsed = time.perf_counter() - wall0
    other = max(0.0, (_cpu_busy_s() - busy0) - (time.process_time() - own0)) / elapsed
    report = {
        "batch": BATCH, "length": args.length, "hidden": HIDDEN, "blocks": BLOCKS,
        "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads,
        "kernel_built": _KERNEL is not None, "machine": machine(),
        "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0],
        "other_load_cores": other, "elapsed_s": elapsed, "results": results,
    }
    write(args.out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
