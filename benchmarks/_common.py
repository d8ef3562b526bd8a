"""The benchmarks' harness: machine notes, interleaved timing, one output writer, argparse pieces.

Every benchmark writes ``NAME.json``, ``NAME.md`` and optionally ``NAME.png`` into
``--results-dir``. The machine is often shared, so candidates are timed round-robin and reported
as median and spread, with the 1-minute load before and after.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent.parent / "bench_results"


def machine(load_before: float | None = None) -> dict[str, Any]:
    """CPU, cores, library versions, git commit and 1-minute load (before and now)."""
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import scipy
    import torch

    try:  # a copied tree (a lent GPU machine) has no .git, or no git at all
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=RESULTS.parent).stdout.strip() or None
    except OSError:
        commit = None
    notes = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
             "python": platform.python_version(), "torch": torch.__version__,
             "numpy": np.__version__, "scipy": scipy.__version__,
             "load_avg_1m": os.getloadavg()[0], "git_commit": commit}
    if load_before is not None:
        notes |= {"load_avg_1m_before": load_before, "load_avg_1m_after": notes["load_avg_1m"]}
    return notes


def machine_line(m: dict[str, Any]) -> str:
    """One Markdown sentence of machine notes."""
    load = (f"1-min load {m['load_avg_1m_before']:.2f} before, {m['load_avg_1m_after']:.2f} after"
            if "load_avg_1m_before" in m else f"1-min load {m['load_avg_1m']:.2f} at the end")
    return (f"Machine: {m['cpu']}, {m['cores']} cores (shared with other jobs), torch "
            f"{m['torch']}; {load}; commit {m.get('git_commit')}.")


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    arr = np.asarray(list(values), dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def spread(ms: list[float], samples: str = "rounds_ms") -> dict[str, Any]:
    """Median, interquartile range, min and max of times in ms, plus the samples."""
    q25, q50, q75 = np.percentile(ms, [25, 50, 75])
    return {"median_ms": float(q50), "iqr_ms": float(q75 - q25), "min_ms": float(min(ms)),
            "max_ms": float(max(ms)), samples: [float(v) for v in ms]}


def interleave(candidates: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
               clocks: tuple[Callable[[], float], ...] = (time.perf_counter,)
               ) -> dict[str, list[list[float]]]:
    """Time each candidate ``repeats`` times, round-robin, after ``warmup`` untimed calls each.

    Returns ms per call, per candidate and per clock (``out[name][clock_index]``), so a
    change of machine load hits every candidate alike."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    out = {name: [[] for _ in clocks] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            starts = [c() for c in clocks]
            fn()
            for i, (c, t0) in enumerate(zip(clocks, starts, strict=True)):
                out[name][i].append((c() - t0) * 1e3)
    return out


def run_for(call: Callable[[], Any], min_time_s: float, warmup: int, min_calls: int = 20
            ) -> float:
    """Median ms of ``call()`` over at least ``min_time_s`` s and ``min_calls`` calls."""
    for _ in range(warmup):
        call()
    samples: list[float] = []
    while sum(samples) < min_time_s * 1e3 or len(samples) < min_calls:
        t0 = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(samples))


def write(out: Path, payload: dict[str, Any], markdown: str,
          plot: Callable[[Path], None] | None = None) -> None:
    """Write ``out.json``, ``out.md`` and (``plot``) ``out.png``; print the Markdown."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown.rstrip() + "\n")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        plot(out.with_suffix(".png"))
    print(markdown)


class _Parser(argparse.ArgumentParser):
    def parse_args(self, *args, **kwargs):  # a smoke test leaves bench_results alone
        ns = super().parse_args(*args, **kwargs)
        if ns.results_dir is None:
            ns.results_dir = Path(tempfile.gettempdir()) / "bench_quick" if ns.quick else RESULTS
        return ns


def parser(doc: str, name: str, seeds: int | None = None, workers: bool = False,
           quick: str = "a few steps: a smoke test") -> argparse.ArgumentParser:
    """An ArgumentParser with the common options: --results-dir, --name, --quick, and where
    given --seeds and --workers."""
    ap = _Parser(description=doc.splitlines()[0])
    ap.add_argument("--results-dir", type=Path, default=None,
                    help="where NAME.* go (default bench_results; with --quick a temp dir)")
    ap.add_argument("--name", default=name, help=f"output name (default {name})")
    ap.add_argument("--quick", action="store_true", help=quick)
    if seeds is not None:
        ap.add_argument("--seeds", type=int, default=seeds)
    if workers:
        ap.add_argument("--workers", type=int, default=2, help="runs in parallel, 1 thread each")
    return ap


def int_list(text: str) -> list[int]:
    """argparse type for comma-separated integers: ``"4,8,16"`` -> ``[4, 8, 16]``."""
    return [int(v) for v in text.split(",") if v]


def float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def pool_map(fn: Callable[[dict], dict], jobs: list[dict], workers: int,
             follow_up: Callable[[dict], dict | None] = lambda r: None,
             line: Callable[[dict], str] = str) -> list[dict]:
    """Run ``fn(job)`` in ``workers`` spawned processes; a result's ``follow_up`` job, if any,
    is queued at once. Prints ``line(result)`` as each finishes."""
    import queue

    done: queue.Queue = queue.Queue()
    results: list[dict] = []
    with mp.get_context("spawn").Pool(workers) as pool:
        def submit(job):
            pool.apply_async(fn, (job,), callback=done.put, error_callback=done.put)

        for job in jobs:
            submit(job)
        pending = len(jobs)
        while pending:
            r = done.get()
            pending -= 1
            if isinstance(r, BaseException):
                raise r
            results.append(r)
            print(f"[{len(results)}] {line(r)}", flush=True)
            if (extra := follow_up(r)) is not None:
                submit(extra)
                pending += 1
    return results


def loglog_panel(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Log-log axes (base 2 in x) with labels, grid and legend."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def states_vs_test(results: list[dict], methods: list[str], path: Path,
                   regression: Callable[[str], bool]) -> None:
    """One panel per dataset: each run's total states against its test metric, per method
    (log y for the datasets ``regression(name)`` marks, whose metric is the MSE)."""
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.8 * len(datasets), 4.0),
                             squeeze=False)
    for ax, d in zip(axes[0], datasets, strict=True):
        for i, method in enumerate(methods):
            sel = [r for r in results if r["dataset"] == d and r["method"] == method]
            if sel:
                ax.scatter([sum(r["final_dims"]) for r in sel], [r["test"] for r in sel],
                           label=method, s=26, marker="os^Dv<>"[i % 7], color=f"C{i % 10}")
        ax.set(xscale="log", xlabel="total states (sum over layers)", title=d,
               ylabel="test MSE" if regression(d) else "test accuracy")
        if regression(d):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
