"""The ``settle`` reduction schedule: cut when the spectrum has settled, to a width it sets.

Why: the paper's schedule (``window``) cuts at every evaluation inside the window, each time
discarding ``tau`` of the current HSV sum, so its final width is set by how many attempts fit in
the window rather than by the data. Here a layer's **target width** comes from its spectrum as
measured now: the fixed point of ``tau`` cuts on the prefixes of this one spectrum,
``r_0 = N``, ``r_{i+1} = rank(g[:r_i])`` until the policy's gate refuses (:func:`target_rank`).
A spectrum without a knee stops just below ``1 / tau``; a knee stops it earlier. (Real repeated
cuts go further: truncation shrinks the tail values of what it keeps.) Early in training the
unweighted HSVs of an LRU still show its initialization; input-weighted ones
(``weighting="input"``) see the layer's inputs from the first check.

When to cut: at every check (an attempt point inside the window) each layer's target is
recorded; the layer is *settled* when its target moved by at most ``drift * N`` over the last
``patience`` check intervals on the same basis (a cut changes the basis, so the history starts
again). A settled layer is cut toward its target, keeping at least ``min_keep`` of its states
per cut so the safety net judges moderate steps; the last check inside the window cuts unsettled
layers too. The target of a layer's first cut floors the later ones: right after a cut (new
basis, fresh Adam moments) the spectrum moves by the perturbation as much as by learning.
Cutting ends at the target, at a rollback (the layer is frozen), or when the window closes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from compressm_tune.errors import ConfigError
from compressm_tune.reduction._policies import ReductionPolicy, plan_rank

__all__ = ["SCHEDULES", "SettleConfig", "SettleTracker", "target_rank"]

SCHEDULES = ("adaptive", "window", "settle")  # the first is the default


def target_rank(hsv: Any, policy: ReductionPolicy,
                round_to: Callable[[int, int], int] | None = None) -> int:
    """The fixed point of ``policy``'s cuts on prefixes of this spectrum (see module doc).

    Parameters
    ----------
    hsv : array_like, shape (N,), real, >= 0
        Hankel singular values (any order; sorted descending here).
    policy : ReductionPolicy
        Of kind ``"tau"`` or ``"rank"`` (``"fraction"`` has no fixed point: it shrinks forever).
    round_to : callable, optional
        Rounds each rank to a fast width, as in :func:`plan_rank`.

    Returns
    -------
    int
        ``r`` in ``[1, N]``; ``N`` when the policy would not cut at all.

    Examples
    --------
    >>> from compressm_tune.reduction import ReductionPolicy
    >>> g = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625]
    >>> target_rank(g, ReductionPolicy("tau", 0.04))  # 8 -> 5 -> 4; 4 -> 4 is no cut
    4
    """
    if policy.kind == "fraction":
        raise ConfigError("the settle schedule needs a tau= or rank= policy: repeated "
                          f"fraction={policy.value:g} cuts have no fixed point")
    g = np.sort(np.asarray(hsv, dtype=np.float64))[::-1]  # (N,) descending
    r = len(g)
    while True:
        new = plan_rank(g[:r], policy, round_to)
        if new is None or new >= r:
            return r
        r = new


@dataclass
class SettleConfig:
    """When the ``settle`` schedule counts a layer's spectrum as settled, and how far it cuts."""

    checks: int = 12  # spectrum checks spread over the window (when ReduceConfig.every is None)
    drift: float = 0.03  # settled: the target width moved by <= 3% of N ...
    patience: int = 2  # ... over each of the last 2 check intervals
    min_keep: float = 0.5  # a cut keeps at least half of the states (the safety net's step)

    def __post_init__(self) -> None:
        if self.checks < 1 or self.patience < 1:
            raise ConfigError(f"checks >= 1 and patience >= 1 must hold, got "
                              f"checks={self.checks} patience={self.patience}")
        if not 0 <= self.drift < 1 or not 0 < self.min_keep <= 1:
            raise ConfigError(f"0 <= drift < 1 and 0 < min_keep <= 1 must hold, got "
                              f"drift={self.drift} min_keep={self.min_keep}")


class SettleTracker:
    """Per-layer history of target widths, and the cut decision (see the module docstring)."""

    def __init__(self, config: SettleConfig) -> None:
        self.config = config
        self.history: dict[int, list[tuple[int, int]]] = {}  # layer -> [(N, target)], oldest first
        self.floor: dict[int, int] = {}  # layer -> the target its first cut aimed at

    def state_dict(self) -> dict[str, Any]:
        return {"history": {str(k): [list(p) for p in v] for k, v in self.history.items()},
                "floor": {str(k): v for k, v in self.floor.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {int(k): [(int(n), int(t)) for n, t in v]
                        for k, v in state.get("history", {}).items()}
        self.floor = {int(k): int(v) for k, v in state.get("floor", {}).items()}

    def plan(self, layer: int, hsv: Any, policy: ReductionPolicy,
             round_to: Callable[[int, int], int] | None, last: bool) -> int | None:
        """Record this check's target for ``layer``; return the rank to cut to, or None.

        ``last``: this is the window's last check, so an unsettled layer is cut too.
        """
        n = len(hsv)
        target = max(target_rank(hsv, policy, round_to), self.floor.get(layer, 1))
        history = self.history.setdefault(layer, [])
        if history and history[-1][0] != n:  # cut since the last check: a new basis
            history.clear()
        history.append((n, target))
        del history[:-(self.config.patience + 1)]
        recent = [t for _, t in history]
        settled = (len(history) > self.config.patience
                   and max(recent) - min(recent) <= self.config.drift * n)
        if target >= n or not (settled or last):
            return None
        rank = max(target, math.ceil(self.config.min_keep * n))
        if round_to is not None:
            rank = min(n, max(1, int(round_to(rank, n))))
        if rank >= policy.gate * n:
            return None
        self.floor.setdefault(layer, target)
        return rank
