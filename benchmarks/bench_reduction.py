"""Time one reduction step: closed-form Gramians vs scipy's Lyapunov solver.

A reduction step is, for every layer of a model: the Hankel singular values (to plan the
rank), square-root balanced truncation to that rank, and re-diagonalization. "ours" is the
public API exactly as the trainer calls it (``hankel_singular_values`` then
``balanced_truncation``, each of which forms the closed-form Gramians). "scipy" obtains the
Gramians once per layer from ``scipy.linalg.solve_discrete_lyapunov`` on the dense
``A = diag(lam)`` and then runs the same factorization, SVD, projection and
re-diagonalization code. Systems use the LRU init of DESIGN.md; target ranks are the final
widths the paper reports (sCIFAR tau=0.10: ~93; sMNIST tau=0.01: ~47).

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_reduction.py [--repeats 7] [--out bench_results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import scipy
import scipy.linalg
import torch

from compressm_tune.reduction import balanced_truncation, hankel_singular_values
from compressm_tune.reduction._gramians import _Balancing, _sqrt_factor, _validate
from compressm_tune.reduction._truncation import _project, _rediagonalize

# (name, layers, N, H, rank kept)
CONFIGS = [("sCIFAR-like", 6, 384, 512, 93), ("sMNIST-like", 1, 256, 8, 47)]


def lru_layers(rng: np.random.Generator, layers: int, N: int, H: int) -> list[tuple]:
    """``layers`` random LRU systems (lam, B incl. gamma, C) as in the paper's init."""
    out = []
    for _ in range(layers):
        r = rng.uniform(0.9, 0.999, N)  # (N,)
        lam = r * np.exp(1j * rng.uniform(0, 2 * np.pi, N))  # (N,)
        B = rng.normal(size=(N, H)) + 1j * rng.normal(size=(N, H))  # (N, H)
        B *= np.sqrt(1 - r**2)[:, None] / np.sqrt(2 * H)  # (N, H)
        C = (rng.normal(size=(H, N)) + 1j * rng.normal(size=(H, N))) / np.sqrt(N)  # (H, N)
        out.append((lam, B, C))
    return out


def step_ours(layers: list[tuple], rank: int) -> list[np.ndarray]:
    """One reduction step through the public API; returns each layer's HSVs."""
    hsvs = []
    for lam, B, C in layers:
        hsvs.append(hankel_singular_values(lam, B, C))  # (N,)
        balanced_truncation(lam, B, C, rank)
    return hsvs


def step_scipy(layers: list[tuple], rank: int) -> list[np.ndarray]:
    """The same step with Lyapunov-solver Gramians; returns each layer's HSVs."""
    hsvs = []
    for lam, B, C in layers:
        sys_ = _validate(lam, B, C)
        A = np.diag(sys_.lam)  # (N, N)
        P = scipy.linalg.solve_discrete_lyapunov(A, B @ B.conj().T)  # (N, N)
        Q = scipy.linalg.solve_discrete_lyapunov(A.conj().T, C.conj().T @ C)  # (N, N)
        Lc, Lo = _sqrt_factor(0.5 * (P + P.conj().T)), _sqrt_factor(0.5 * (Q + Q.conj().T))
        U, s, Vh = np.linalg.svd(Lo.conj().T @ Lc)  # (N, N), (N,), (N, N)
        _rediagonalize(*_project(sys_, _Balancing(Lc, Lo, U, s, Vh), np.arange(rank)))
        hsvs.append(s)  # (N,)
    return hsvs


def timed(fn, repeats: int) -> tuple[list[float], object]:
    """Per-call wall times in ms over ``repeats`` calls after one warm-up; and its result."""
    result = fn()  # warm-up (also the value returned)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times, result


def summarize(times: list[float]) -> dict:
    """Median and interquartile range (75th - 25th percentile) in ms."""
    q25, q50, q75 = np.percentile(times, [25, 50, 75])
    return {"median_ms": q50, "iqr_ms": q75 - q25, "times_ms": times}


def machine() -> dict:
    """What the numbers were measured on."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1_5_15min": list(os.getloadavg()),  # other work sharing the CPUs
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("bench_results"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for name, n_layers, N, H, rank in CONFIGS:
        layers = lru_layers(rng, n_layers, N, H)
        t_ours, g_ours = timed(partial(step_ours, layers, rank), args.repeats)
        t_scipy, g_scipy = timed(partial(step_scipy, layers, rank), args.repeats)
        agree = max(float(np.abs(a - b).max() / a[0]) for a, b in zip(g_ours, g_scipy, strict=True))
        row = {"config": name, "layers": n_layers, "N": N, "H": H, "rank": rank}
        row |= {"ours": summarize(t_ours), "scipy": summarize(t_scipy)}
        row["speedup_scipy_over_ours"] = row["scipy"]["median_ms"] / row["ours"]["median_ms"]
        row["max_hsv_diff_rel_g0"] = agree
        rows.append(row)
        o, sp = row["ours"]["median_ms"], row["scipy"]["median_ms"]
        print(f"{name}: ours {o:.1f} ms, scipy {sp:.1f} ms")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "reduction_step", "repeats": args.repeats, "machine": machine()}
    report["results"] = rows
    (args.out / "reduction_step.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    lines = [
        "# Reduction step: closed-form Gramians vs scipy Lyapunov solver",
        "",
        "One step = for every layer, Hankel singular values + square-root balanced truncation +"
        " re-diagonalization. *ours*: the public API as the trainer calls it"
        " (`hankel_singular_values`, then `balanced_truncation`; closed-form Gramians, formed in"
        " each call). *scipy*: Gramians once per layer from `scipy.linalg.solve_discrete_lyapunov`,"
        " then the same factorization / SVD / projection / re-diagonalization.",
        "",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs, OMP_NUM_THREADS={m['omp_num_threads']};"
        f" python {m['python']}, torch {m['torch']}, numpy {m['numpy']}, scipy {m['scipy']}."
        f" {args.repeats} repeats after one warm-up; IQR = 75th - 25th percentile.",
        "",
        "| config | layers | N | H | rank | ours median (IQR) ms | scipy median (IQR) ms |"
        " scipy / ours | max HSV diff / g0 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, s = r["ours"], r["scipy"]
        lines.append(
            f"| {r['config']} | {r['layers']} | {r['N']} | {r['H']} | {r['rank']} |"
            f" {o['median_ms']:.1f} ({o['iqr_ms']:.1f}) |"
            f" {s['median_ms']:.1f} ({s['iqr_ms']:.1f}) |"
            f" {r['speedup_scipy_over_ours']:.2f}x | {r['max_hsv_diff_rel_g0']:.1e} |"
        )
    (args.out / "reduction_step.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
