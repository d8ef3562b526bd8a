"""Where cost steps up across widths: good cut points for hardware-aware rank rounding."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["fast_widths", "step_up_widths"]


def _check(widths: Sequence[int], values: Sequence[float | None], tolerance: float) -> None:
    if len(widths) != len(values) or list(widths) != sorted(set(widths)):
        raise ValueError(
            "widths must be distinct, ascending and as many as values, got "
            f"{list(widths)=} with {len(values)} values"
        )
    if any(v is None for v in values):
        raise ValueError("values must all be measured (no None)")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance=}")


def step_up_widths(
    widths: Sequence[int], values: Sequence[float | None], tolerance: float = 0.1
) -> list[int]:
    """Widths at which the cost exceeds the previous width's by more than ``tolerance``.

    Parameters
    ----------
    widths : sequence of int
        Measured state widths, ascending.
    values : sequence of float
        The cost at each width (latency, energy, ...).
    tolerance : float
        Relative rise that counts as a step, e.g. 0.1 for 10 %.

    Returns
    -------
    list of int
        Ascending; the first width is never included.

    Examples
    --------
    >>> step_up_widths([4, 8, 16, 32], [1.0, 1.02, 1.5, 1.55])
    [16]
    """
    _check(widths, values, tolerance)
    return [w for w, prev, cur in zip(widths[1:], values, values[1:], strict=False)
            if cur > prev * (1.0 + tolerance)]  # type: ignore[operator]


def fast_widths(
    widths: Sequence[int], values: Sequence[float | None], tolerance: float = 0.1
) -> list[int]:
    """The last width of every plateau: widening past one of these costs more than
    ``tolerance``; the largest measured width is always included.

    Rounding a rank up to the next fast width keeps more state for (almost) no cost.

    Examples
    --------
    >>> fast_widths([4, 8, 16, 32], [1.0, 1.02, 1.5, 1.55])
    [8, 32]
    """
    _check(widths, values, tolerance)
    steps = set(step_up_widths(widths, values, tolerance))
    fast = [w for w, nxt in zip(widths, widths[1:], strict=False) if nxt in steps]
    return fast + [widths[-1]]

