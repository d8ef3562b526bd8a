"""Side-by-side comparison of device profiles: a table, ratios, step-up widths and a plot."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from compressm_tune._io import atomic_write
from compressm_tune.errors import ConfigError
from compressm_tune.hardware._profile import Profile

__all__ = ["ComparisonTable", "compare", "plot_comparison"]

# Per-width quantities shown in the table: (metric key, column header).
_COLUMNS = (("latency_ms", "latency ms"), ("throughput", "samples/s"), ("energy_mj", "mJ/inf"))


@dataclass(frozen=True)
class ComparisonTable:
    """Profiles side by side; the first profile is the reference for ratios.

    Attributes
    ----------
    labels : tuple of str
        One unique name per profile, in input order.
    widths : tuple of int
        Union of the profiled widths, ascending.
    latency_ms, throughput_samples_per_s, energy_mj : tuple of tuple
        ``[device][width]`` values; ``None`` where a device did not measure that width
        (or energy at all).
    latency_iqr_ms : tuple of tuple
        The spread of ``latency_ms``, same layout.
    energy_methods : tuple of str
        Energy method per device; estimates start with ``"estimate"``.
    step_up_widths, fast_widths : tuple of tuple of int
        Per device: widths where latency jumps by more than ``tolerance`` over the previous
        width, and the last width of every latency plateau (good cut points).
    tolerance : float
        Relative rise that counts as a step.
    notes : tuple of tuple of str
        Each profile's notes (shared machine, estimated energy, ...).
    """

    labels: tuple[str, ...]
    widths: tuple[int, ...]
    latency_ms: tuple[tuple[float | None, ...], ...]
    latency_iqr_ms: tuple[tuple[float | None, ...], ...]
    throughput_samples_per_s: tuple[tuple[float | None, ...], ...]
    energy_mj: tuple[tuple[float | None, ...], ...]
    energy_methods: tuple[str, ...]
    step_up_widths: tuple[tuple[int, ...], ...]
    fast_widths: tuple[tuple[int, ...], ...]
    tolerance: float
    notes: tuple[tuple[str, ...], ...]

    def ratios(self, metric: str = "latency_ms") -> list[list[float | None]]:
        """``[device][width]`` ratio of each device's value to the first device's.

        ``metric`` is ``"latency_ms"``, ``"throughput_samples_per_s"`` or ``"energy_mj"``;
        ``None`` where either value is missing.
        """
        rows = getattr(self, metric)
        return [[None if a is None or b is None or a == 0 else b / a
                 for a, b in zip(rows[0], row, strict=True)] for row in rows]

    def to_markdown(self) -> str:
        """The table, the ratios to the first device, step-up widths and notes, as Markdown."""
        data = {"latency_ms": self.latency_ms, "throughput": self.throughput_samples_per_s,
                "energy_mj": self.energy_mj}
        header = ["N"]
        for label, method in zip(self.labels, self.energy_methods, strict=True):
            est = " (estimate)" if method.startswith("estimate") else ""
            header += [f"{label}: {name}{est if key == 'energy_mj' else ''}"
                       for key, name in _COLUMNS]
        ratio_rows = self.ratios("latency_ms")
        header += [f"latency {label} / {self.labels[0]}" for label in self.labels[1:]]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for j, width in enumerate(self.widths):
            cells = [str(width)]
            for d in range(len(self.labels)):
                cells += [_fmt(data[key][d][j]) for key, _ in _COLUMNS]
            cells += [_fmt(ratio_rows[d][j], "x") for d in range(1, len(self.labels))]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Widths where latency steps up (> {self.tolerance:.0%} over the previous "
                  "width) and fast widths (last width of each plateau, good cut points):", ""]
        for d, label in enumerate(self.labels):
            lines.append(f"- {label}: steps up at {list(self.step_up_widths[d])}; "
                         f"fast widths {list(self.fast_widths[d])}; "
                         f"energy method `{self.energy_methods[d]}`")
            lines += [f"  - note: {note}" for note in self.notes[d]]
        return "\n".join(lines) + "\n"


def _fmt(value: float | None, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.3g}{suffix}" if abs(value) < 1000 else f"{value:,.0f}{suffix}"


def _unique_labels(profiles: Sequence[Profile]) -> list[str]:
    labels = [p.device.label for p in profiles]
    if len(set(labels)) < len(labels):
        labels = [f"{p.device.label} [{p.config.runtime}]" for p in profiles]
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return unique


def compare(profiles: Sequence[Profile], tolerance: float = 0.1) -> ComparisonTable:
    """Put profiles side by side (the first is the reference for ratios).

    Parameters
    ----------
    profiles : sequence of Profile
        At least one.
    tolerance : float
        Relative latency rise between neighbouring widths that counts as a step up.

    Returns
    -------
    ComparisonTable
        Render it with :meth:`ComparisonTable.to_markdown` and :func:`plot_comparison`.
    """
    if not profiles:
        raise ConfigError("compare needs at least one profile, got 0")
    if not tolerance >= 0:
        raise ConfigError(f"tolerance must be >= 0, got {tolerance=}")
    widths = tuple(sorted({w for p in profiles for w in p.widths}))

    def column(profile: Profile, value) -> tuple[float | None, ...]:
        by_width = {r.state_dim: value(r) for r in profile.records}
        return tuple(by_width.get(w) for w in widths)

    return ComparisonTable(
        labels=tuple(_unique_labels(profiles)),
        widths=widths,
        latency_ms=tuple(column(p, lambda r: r.latency.p50_ms) for p in profiles),
        latency_iqr_ms=tuple(column(p, lambda r: r.latency.iqr_ms) for p in profiles),
        throughput_samples_per_s=tuple(
            column(p, lambda r: r.throughput_samples_per_s) for p in profiles
        ),
        energy_mj=tuple(column(p, lambda r: r.energy_mj) for p in profiles),
        energy_methods=tuple(p.energy_method for p in profiles),
        step_up_widths=tuple(tuple(p.step_up_widths(tolerance=tolerance)) for p in profiles),
        fast_widths=tuple(tuple(p.fast_widths(tolerance=tolerance)) for p in profiles),
        tolerance=tolerance,
        notes=tuple(p.notes for p in profiles),
    )


def plot_comparison(table: ComparisonTable, path: str | os.PathLike[str]) -> Path:
    """Write a PNG of median latency (band: +-IQR/2) against state width, one line per device.

    Step-up widths are marked with hollow circles. Drawn on matplotlib's Agg canvas
    (no display needed).

    Returns
    -------
    pathlib.Path
        The written file; parent directories are created.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, NullLocator, ScalarFormatter

    path = Path(path)
    kind = path.suffix.lower().lstrip(".")
    if kind not in ("png", "pdf", "svg"):
        raise ConfigError(f"the plot's file name must end in .png, .pdf or .svg, got {path}")
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
    ax = fig.add_subplot()
    for d, label in enumerate(table.labels):
        points = [(w, v, s) for w, v, s in
                  zip(table.widths, table.latency_ms[d], table.latency_iqr_ms[d], strict=True)
                  if v is not None]
        xs, ys, spreads = (list(c) for c in zip(*points, strict=True))
        (line,) = ax.plot(xs, ys, marker="o", ms=4, label=label)
        ax.fill_between(xs, [y - s / 2 for y, s in zip(ys, spreads, strict=True)],
                        [y + s / 2 for y, s in zip(ys, spreads, strict=True)],
                        color=line.get_color(), alpha=0.2)
        steps = [(w, y) for w, y in zip(xs, ys, strict=True) if w in table.step_up_widths[d]]
        if steps:
            ax.scatter(*zip(*steps, strict=True), s=90, facecolors="none",
                       edgecolors=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xticks(table.widths, [str(w) for w in table.widths], minor=False)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())  # minor labels overlap the major ones
    ax.set_xlabel("state width N (every block)")
    ax.set_ylabel("latency per sample, batch 1 (ms, median)")
    ax.set_title("Inference latency vs state width (circles: latency steps up)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=kind, dpi=120))
