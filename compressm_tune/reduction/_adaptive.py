"""The ``adaptive`` reduction schedule and the noise-aware safety net every schedule uses.

**Readiness.** No cut is attempted while the learning rate is still warming up, nor while the
validation metric (accuracy for classification, the loss for regression) is still within noise
of its value before training: the *band* is ``noise`` standard errors of the per-sample
metric on the validation split at the start (:class:`Baseline`). A model that has not learned
yet has no structure to keep; its spectrum shows the initialization.

**Window.** The reduction window opens at readiness, the first check at which both hold, and
lasts ``window * total_steps`` steps from there, but never past ``latest * total_steps``: the
rest of training recovers from the cuts. A run that is not ready by then is never cut (its
attempts record ``"wait"`` with the reason, and the summary has no ``ready`` step). Checks
inside the window are ``every`` steps apart, or ``checks`` of them spread over the window.

**Widths.** At each check a layer's proposed width is the fixed point of ``tau`` cuts on its
current (input-weighted, with ``weighting=input``) Hankel spectrum
(:func:`~compressm_tune.reduction._schedules.target_rank`); the cut goes there directly, and the
safety net measures its effect. The first target a layer is given is a floor for its later
ones: truncation shrinks the tail of what it keeps, so every re-measured spectrum asks for a
little more, and repeated cuts would end at a width set by the number of checks. A rejected
cut is rolled back and the layer remembers the rejected width: later proposals at or below it
are replaced by the midpoint between the rejected and the kept width (bisection), and the
layer stops when that midpoint would remove less than the policy's ``gate`` share. So the
final widths come from each layer's spectrum and from what the cuts measurably cost, not from
fixed steps.

**Safety net** (:func:`paired_verdict`). A cut is judged on the same validation samples before
and after it: per sample, the loss change ``d_i`` and, for classification, the accuracy drop
``a_i``. It is rolled back when the mean loss change exceeds ``noise`` standard errors of
``d`` (a real change, not noise) *and* the mean drop (accuracy points; for regression, the
loss change relative to the loss before) exceeds both ``max_drop`` and ``noise`` standard
errors of the drop. Below ``SMALL_SPLIT`` validation samples the bar is ``max_drop`` *plus*
``noise`` standard errors (the tolerance widened by the measured noise), the record says
``small_split`` and a warning is issued once. The multiplier grows with Student's t for few
samples. One flipped sample (``a`` one 1, the rest 0: mean ``1/n``, standard error ``1/n``)
never passes the bar for ``noise > 1``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from compressm_tune.errors import ConfigError

__all__ = ["SMALL_SPLIT", "AdaptiveConfig", "AdaptiveTracker", "Baseline", "paired_verdict"]

SMALL_SPLIT = 20  # validation samples below which the net's verdicts are flagged as noisy
_Z = stats.norm.ppf(0.975)


@dataclass
class AdaptiveConfig:
    """Readiness, window bounds and noise level of the ``adaptive`` schedule (module doc)."""

    checks: int = 8  # checks spread over the window (when no every= is given)
    noise: float = 2.0  # standard errors: the readiness band and the safety net's margin
    latest: float = 0.5  # no cut after this share of the steps

    def __post_init__(self) -> None:
        if self.checks < 1:
            raise ConfigError(f"checks >= 1 must hold, got checks={self.checks}")
        if not self.noise > 1.0:
            raise ConfigError(f"noise > 1 must hold (standard errors), got noise={self.noise}")
        if not 0.0 < self.latest <= 1.0:
            raise ConfigError(f"0 < latest <= 1 must hold, got latest={self.latest}")


def _metric(samples: dict[str, np.ndarray]) -> tuple[str, np.ndarray, float]:
    """The per-sample values the task is judged on, their name and the sign making
    higher better."""
    if "accuracy" in samples:
        return "accuracy", np.asarray(samples["accuracy"], dtype=np.float64), 1.0
    return "loss", np.asarray(samples["loss"], dtype=np.float64), -1.0


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    n = len(values)
    mean = float(values.mean())
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("inf")
    return mean, se


def _multiplier(noise: float, n: int) -> float:
    """``noise`` standard errors, widened by Student's t for ``n`` samples."""
    if n < 2:
        return float("inf")
    return noise * float(stats.t.ppf(0.975, n - 1)) / _Z


@dataclass
class Baseline:
    """The validation metric before training and its noise band (module docstring)."""

    metric: str
    value: float
    se: float
    n: int
    noise: float

    @classmethod
    def measure(cls, samples: dict[str, np.ndarray], noise: float) -> Baseline:
        metric, values, _ = _metric(samples)
        mean, se = _mean_se(values)
        return cls(metric, mean, se, len(values), noise)

    @property
    def band(self) -> float:
        """Half-width of the band: ``noise`` standard errors (Student-t widened)."""
        return _multiplier(self.noise, self.n) * self.se

    def left(self, val: dict[str, float]) -> bool:
        """Whether ``val`` has improved beyond the band."""
        sign = 1.0 if self.metric == "accuracy" else -1.0
        return sign * (val[self.metric] - self.value) > self.band

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "se": self.se, "n": self.n,
                "band": self.band}


def paired_verdict(before: dict[str, np.ndarray], after: dict[str, np.ndarray],
                   max_drop: float, noise: float) -> dict[str, Any]:
    """Whether a cut failed, from per-sample values before and after it (module docstring).

    Parameters
    ----------
    before, after : dict of str to ndarray (n,)
        Per validation sample, on the same samples in the same order: ``"loss"`` and, for
        classification, ``"accuracy"`` (the share of the sample's labels predicted right).
    max_drop : float
        Tolerated mean drop: accuracy points, or for regression the relative loss increase.
    noise : float
        Standard errors of margin, > 1.

    Returns
    -------
    dict
        ``rollback`` (bool), ``n_val`` (samples), ``loss_change`` and ``loss_change_se``
        (mean and standard error of the per-sample loss change), ``drop``, ``drop_se`` and
        ``tolerance`` (the bar ``drop`` had to exceed), and ``small_split`` when
        ``n_val < SMALL_SPLIT``.

    Examples
    --------
    >>> import numpy as np
    >>> acc = np.ones(10)
    >>> flipped = acc.copy(); flipped[3] = 0.0  # one sample of ten flips
    >>> loss = np.full(10, 0.5); worse = loss.copy(); worse[3] = 3.0
    >>> paired_verdict({"loss": loss, "accuracy": acc}, {"loss": worse, "accuracy": flipped},
    ...                max_drop=0.02, noise=2.0)["rollback"]
    False
    """
    d = np.asarray(after["loss"], np.float64) - np.asarray(before["loss"], np.float64)
    n = len(d)
    k = _multiplier(noise, n)
    loss_change, loss_se = _mean_se(d)
    if "accuracy" in before:
        a = np.asarray(before["accuracy"], np.float64) - np.asarray(after["accuracy"], np.float64)
        drop, drop_se = _mean_se(a)
    else:
        scale = max(float(np.mean(before["loss"])), 1e-12)
        drop, drop_se = loss_change / scale, loss_se / scale
    tolerance = (max_drop + k * drop_se if n < SMALL_SPLIT
                 else max(max_drop, k * drop_se))
    rollback = bool(loss_change > k * loss_se and drop > tolerance)
    out = {"rollback": rollback, "n_val": n, "loss_change": loss_change,
           "loss_change_se": loss_se, "drop": drop, "drop_se": drop_se, "tolerance": tolerance}
    if n < SMALL_SPLIT:
        out["small_split"] = True
    return out


def warn_small_split(n: int) -> None:
    warnings.warn(f"the validation split holds {n} samples (< {SMALL_SPLIT}): cut verdicts "
                  "are noisy, so the safety net's tolerance is widened by their measured "
                  "spread; more validation data gives sharper verdicts", stacklevel=3)


class AdaptiveTracker:
    """Per layer: the largest width whose cut was rejected, and the bisection it implies."""

    def __init__(self) -> None:
        self.rejected: dict[int, int] = {}  # layer -> largest rejected width
        self.floor: dict[int, int] = {}  # layer -> the first target its spectrum gave

    def state_dict(self) -> dict[str, Any]:
        return {"rejected": {str(k): v for k, v in self.rejected.items()},
                "floor": {str(k): v for k, v in self.floor.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rejected = {int(k): int(v) for k, v in state.get("rejected", {}).items()}
        self.floor = {int(k): int(v) for k, v in state.get("floor", {}).items()}

    def plan(self, layer: int, n: int, target: int, gate: float) -> tuple[int | None, bool]:
        """The width to cut ``layer`` (now ``n`` states) to, given the spectrum's ``target``;
        and whether the layer is done (its bisection has converged)."""
        if target < n:
            target = max(target, self.floor.setdefault(layer, target))
        floor = self.rejected.get(layer, 0)
        rank = target
        if rank <= floor:  # the spectrum asks for a width already rejected: bisect
            rank = math.ceil((floor + n) / 2)
            if rank >= gate * n:
                return None, True
        if rank >= gate * n:
            return None, False
        return max(1, rank), False

    def reject(self, layer: int, rank: int) -> None:
        self.rejected[layer] = max(rank, self.rejected.get(layer, 0))
