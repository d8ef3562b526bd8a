"""Shared pieces of the benchmarks: machine description and result writing."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent.parent / "bench_results"


def machine() -> dict[str, Any]:
    """CPU model, cores, load and library versions: what a reader needs to weigh the numbers."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numpy
    import scipy

    try:  # a copied tree (a lent GPU machine) has no .git, or no git at all
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=RESULTS.parent).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        "numpy": numpy.__version__, "scipy": scipy.__version__,
        "load_avg_1m": os.getloadavg()[0],
        "git_commit": commit,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def write(name: str, payload: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")


def int_list(text: str) -> list[int]:
    """argparse type for comma-separated integers: ``"4,8,16"`` -> ``[4, 8, 16]``."""
    return [int(v) for v in text.split(",")]


def loglog_panel(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Log-log axes (base 2 in x) with labels, grid and legend, as the latency plots use."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def write_prefix(out: Path, payload: dict[str, Any], markdown, plot) -> None:
    """Write ``out.json``, ``out.md`` (``markdown(payload)``) and ``out.png`` (``plot``), and
    print the Markdown: the outputs of a benchmark with an ``--out`` prefix."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    text = markdown(payload)
    out.with_suffix(".md").write_text(text)
    plot(payload, out.with_suffix(".png"))
    print(text)
