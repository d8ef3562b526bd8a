"""Plots of a run's Hankel singular value spectra, read back from ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import kendalltau

__all__ = ["read_metrics", "ranking_stability", "plot_hsv_trajectories"]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The evaluation records of a run, in order (one JSON object per line); a line cut short
    by a kill is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # blank, or cut short
    return records


def _spectra(records: list[dict[str, Any]], key: str) -> dict[int, list[tuple[int, list]]]:
    """layer -> [(step, values)] from the ``spectrum`` entries, else the reduction logs."""
    out: dict[int, list[tuple[int, list]]] = {}
    for rec in records:
        for layer in rec.get("spectrum") or rec.get("reduction") or []:
            if key in layer:
                out.setdefault(layer["layer"], []).append((rec["step"], layer[key]))
    return out


def ranking_stability(records: list[dict[str, Any]]) -> dict[int, list[tuple[int, float]]]:
    """Kendall tau between each evaluation's ranking of the diagonal modes and the final one.

    Uses the per-mode Hankel scores logged with ``log_spectrum``; evaluations where a layer's
    width changed since (a cut) are skipped, since its modes are then different states.
    Returns ``{layer: [(step, tau), ...]}``; tau = 1 means the ranking is already final.
    """
    result: dict[int, list[tuple[int, float]]] = {}
    for layer, series in _spectra(records, "mode_score").items():
        final = np.asarray(series[-1][1])
        result[layer] = [(step, float(kendalltau(np.asarray(v), final).statistic))
                         for step, v in series if len(v) == len(final)]
    return result


def plot_hsv_trajectories(records: list[dict[str, Any]], path: str | Path,
                          top: int = 16) -> Path | None:
    """PNG: per layer, the ``top`` largest HSVs over training (log scale), the width, and
    (when mode scores were logged) the ranking stability. None when no record holds a
    spectrum (no reduction attempt was made): there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hsv = _spectra(records, "hsv")
    if not hsv:
        return None
    stability = ranking_stability(records)
    layers = sorted(hsv)
    cols = 3 if stability else 2
    fig, axes = plt.subplots(len(layers), cols, figsize=(4.2 * cols, 3 * len(layers)),
                             squeeze=False)
    for row, layer in zip(axes, layers, strict=True):
        steps = [s for s, _ in hsv[layer]]
        width = max(len(v) for _, v in hsv[layer])
        grid = np.full((len(steps), min(top, width)), np.nan)
        for i, (_, v) in enumerate(hsv[layer]):
            grid[i, :min(top, len(v))] = np.asarray(v[:top]) / max(v[0], 1e-300)
        row[0].semilogy(steps, grid, lw=1, marker=".")  # markers: one attempt is one point
        row[0].set(title=f"layer {layer}: top-{grid.shape[1]} HSVs / largest", xlabel="step")
        # the width after every record (evaluations and cuts), from the run's start
        dims = [(rec["step"], rec["state_dims"][layer]) for rec in records
                if len(rec.get("state_dims") or ()) > layer]
        start = [(0, width)] if not dims or dims[0][0] > 0 else []
        xs, ns = zip(*(start + dims), strict=True)
        row[1].step(xs, ns, where="post", marker="o", ms=3)
        row[1].set(title=f"layer {layer}: state width", xlabel="step", ylabel="N",
                   ylim=(0, 1.08 * max(ns)))
        if stability:
            pts = stability.get(layer, [])
            row[2].plot([s for s, _ in pts], [t for _, t in pts], marker=".")
            row[2].set(title=f"layer {layer}: Kendall tau vs final ranking", xlabel="step",
                       ylim=(-0.1, 1.05))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
