"""Time one reduction step: closed-form Gramians vs scipy's Lyapunov solver.

A reduction step is, for every layer: the Hankel singular values (to plan the rank), square-root
balanced truncation to that rank, and re-diagonalization. ``ours`` is the public API as the
trainer calls it (``hankel_singular_values`` then ``balanced_truncation``). ``scipy`` solves the
Gramians with ``scipy.linalg.solve_discrete_lyapunov`` on the dense ``A = diag(lam)`` and then
does the same square-root balancing in plain numpy. Systems use the LRU init; target ranks are
the final widths the paper reports (sCIFAR tau=0.10: ~93; sMNIST tau=0.01: ~47). The two are
timed round-robin.

    OMP_NUM_THREADS=2 python benchmarks/bench_reduction.py [--repeats 7] [--results-dir DIR]
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import numpy as np
import scipy.linalg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleave, machine, machine_line, parser, spread, write  # noqa: E402

from compressm_tune._table import markdown_table  # noqa: E402
from compressm_tune.reduction import balanced_truncation, hankel_singular_values  # noqa: E402

CONFIGS = [("sCIFAR-like", 6, 384, 512, 93), ("sMNIST-like", 1, 256, 8, 47)]  # layers, N, H, r


def lru_layers(rng: np.random.Generator, layers: int, n: int, h: int) -> list[tuple]:
    """``layers`` random LRU systems (lam, B incl. gamma, C) as in the paper's init."""
    out = []
    for _ in range(layers):
        r = rng.uniform(0.9, 0.999, n)  # (N,)
        lam = r * np.exp(1j * rng.uniform(0, 2 * np.pi, n))  # (N,)
        b = (rng.normal(size=(n, h)) + 1j * rng.normal(size=(n, h)))  # (N, H)
        b *= np.sqrt(1 - r**2)[:, None] / np.sqrt(2 * h)
        c = (rng.normal(size=(h, n)) + 1j * rng.normal(size=(h, n))) / np.sqrt(n)  # (H, N)
        out.append((lam, b, c))
    return out


def step_ours(layers: list[tuple], rank: int) -> list[np.ndarray]:
    hsvs = []
    for lam, b, c in layers:
        hsvs.append(hankel_singular_values(lam, b, c))  # (N,)
        balanced_truncation(lam, b, c, rank)
    return hsvs


def _sqrt_factor(m: np.ndarray) -> np.ndarray:
    """L with L L^H = m for a Hermitian PSD m (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh(0.5 * (m + m.conj().T))
    return v * np.sqrt(np.clip(w, 0, None))


def step_scipy(layers: list[tuple], rank: int) -> list[np.ndarray]:
    hsvs = []
    for lam, b, c in layers:
        a = np.diag(lam)  # (N, N)
        lc = _sqrt_factor(scipy.linalg.solve_discrete_lyapunov(a, b @ b.conj().T))
        lo = _sqrt_factor(scipy.linalg.solve_discrete_lyapunov(a.conj().T, c.conj().T @ c))
        u, s, vh = np.linalg.svd(lo.conj().T @ lc)  # (N, N), (N,), (N, N)
        scale = 1 / np.sqrt(s[:rank])
        t = lc @ vh[:rank].conj().T * scale  # (N, r)
        ti = scale[:, None] * (u[:, :rank].conj().T @ lo.conj().T)  # (r, N)
        lam_r, v = np.linalg.eig(ti @ a @ t)  # re-diagonalize the (r, r) system
        _ = lam_r, np.linalg.solve(v, ti @ b), c @ t @ v  # the reduced (lam, B, C)
        hsvs.append(s)
    return hsvs


def main() -> None:
    ap = parser(__doc__, "reduction_step", quick="the small config, 3 repeats")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    repeats = 3 if args.quick else args.repeats
    rng, load, rows = np.random.default_rng(0), os.getloadavg()[0], []
    for name, n_layers, n, h, rank in CONFIGS[1:] if args.quick else CONFIGS:
        layers = lru_layers(rng, n_layers, n, h)
        agree = max(float(np.abs(a - b).max() / a[0]) for a, b in  # also the warm-up
                    zip(step_ours(layers, rank), step_scipy(layers, rank), strict=True))
        times = interleave({"ours": partial(step_ours, layers, rank),
                            "scipy": partial(step_scipy, layers, rank)}, repeats, warmup=0)
        row = {"config": name, "layers": n_layers, "N": n, "H": h, "rank": rank,
               "ours": spread(times["ours"][0], "times_ms"),
               "scipy": spread(times["scipy"][0], "times_ms"), "max_hsv_diff_rel_g0": agree}
        row["speedup_scipy_over_ours"] = row["scipy"]["median_ms"] / row["ours"]["median_ms"]
        rows.append(row)
        print(f"{name}: ours {row['ours']['median_ms']:.1f} ms, "
              f"scipy {row['scipy']['median_ms']:.1f} ms")
    m = machine(load) | {"omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    table = markdown_table(
        ["config", "layers", "N", "H", "rank", "ours median (IQR) ms", "scipy median (IQR) ms",
         "scipy / ours", "max HSV diff / g0"],
        [[r["config"], r["layers"], r["N"], r["H"], r["rank"],
          f"{r['ours']['median_ms']:.1f} ({r['ours']['iqr_ms']:.1f})",
          f"{r['scipy']['median_ms']:.1f} ({r['scipy']['iqr_ms']:.1f})",
          f"{r['speedup_scipy_over_ours']:.2f}x", f"{r['max_hsv_diff_rel_g0']:.1e}"]
         for r in rows])
    md = ["# Reduction step: closed-form Gramians vs scipy Lyapunov solver", "",
          "One step = for every layer, Hankel singular values + square-root balanced truncation "
          "+ re-diagonalization. *ours*: the public API as the trainer calls it; *scipy*: "
          "Gramians from `scipy.linalg.solve_discrete_lyapunov`, then the same balancing in "
          f"numpy. {repeats} interleaved repeats after one warm-up; IQR = 75th - 25th "
          f"percentile. OMP_NUM_THREADS={m['omp_num_threads']}.", "", machine_line(m), "", table]
    write(args.results_dir / args.name, {"benchmark": "reduction_step", "repeats": repeats,
                                         "machine": m, "results": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
