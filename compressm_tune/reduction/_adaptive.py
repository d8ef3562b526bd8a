"""The ``adaptive`` reduction schedule and the noise-aware safety net every schedule uses.

**Readiness** (:class:`Readiness`): the first cut waits until the model has learned what it
will learn at full width, measured on the run's own validation split:

* the learning-rate warm-up is over;
* the validation metric (accuracy for classification, the loss for regression) has left its
  starting band, ``noise`` standard errors of the per-sample metric before training
  (:class:`Baseline`);
* and it has stopped improving: its paired per-sample change over the last ``span`` of the
  steps is within ``noise`` standard errors (a plateau), or ``by`` of the steps have passed.

Why the plateau: the spectrum of a young model does not show the capacity it will need; a
model cut while still learning fast trains on at a width chosen too early and ends no better
than one trained small from scratch, while a model cut near its plateau keeps what it learned
and recovers from the cut in the remaining steps. Before readiness the schedule checks every
``span`` of the steps (and at evaluations); its attempts record ``"wait"`` with the reason.

**Window.** The reduction window opens at readiness and lasts ``window * total_steps`` steps,
never past ``latest * total_steps``: the rest of training recovers from the cuts. A run not
ready by then is never cut. Inside the window the checks are ``every`` steps apart, or
``checks`` of them spread over the window.

**Widths** (:class:`AdaptiveTracker`). At each check a layer's proposed width is the fixed
point of ``tau`` cuts on its current (input-weighted, with ``weighting=input``) Hankel spectrum
(:func:`~compressm_tune.reduction._schedules.target_rank`); the cut goes there directly and the
safety net measures its effect. The first target a layer is given is a floor for its later
ones: truncation shrinks the tail of what it keeps, so every re-measured spectrum asks for a
little more, and repeated cuts would end at a width set by the number of checks. A rejected
cut is rolled back and the layer remembers the rejected width: later proposals at or below it
are replaced by the midpoint between the rejected and the kept width (bisection), and the
layer stops when that midpoint would remove less than the policy's ``gate`` share. So each
layer ends near the smallest width whose measured effect is within tolerance, set by its own
spectrum and its own cost, not by fixed steps.

**Safety net** (:func:`paired_verdict`). A cut is judged on the same validation samples
before and after it: per sample, the loss change ``d_i`` and, for classification, the accuracy
drop ``a_i``. It is rolled back when the mean loss change exceeds ``noise`` standard errors of
``d`` (a real change, not noise) *and* the mean drop (accuracy points; for regression, the
loss change relative to the loss before) exceeds both ``max_drop`` and ``noise`` standard
errors of the drop. Under ``adaptive`` the cuts share one tolerance: the drops of the cuts
already kept count toward each later cut's (``spent``), so a series of cuts each just under
``max_drop`` cannot add up to several times it. (Comparing with the model at readiness instead
would count the training in between as the cuts' effect.) Below ``SMALL_SPLIT`` validation
samples the bar is ``max_drop`` *plus* ``noise`` standard errors (the tolerance widened by the
measured noise), the record says ``small_split`` and a warning is issued once. The multiplier
grows with Student's t for few samples. One flipped sample (``a`` one 1, the rest 0: mean
``1/n``, standard error ``1/n``) never passes the bar for ``noise > 1``.

**Recovery before the verdict** (``recover``). Right after a cut the model has not yet
re-fitted its other weights to the smaller state: on regression tasks especially, the loss
jumps by far more than the tolerance and comes back within a few dozen steps. Judging only
that moment rejects cuts the run would have absorbed. So under ``adaptive`` (in the
:class:`~compressm_tune.training.Trainer`, whose snapshot is the whole training state on disk)
a cut that fails at once is not rolled back yet: it trains ``recover * total_steps`` steps and
is judged again against the validation before the cut, on the same samples. Only a cut that
fails both times is undone: the run returns to its pre-cut checkpoint (the recovery steps are
spent, the step count goes on) and bisects. The window stands still while a cut recovers (it
still ends at ``latest``), so a rollback does not use up the window's later checks. A
:class:`~compressm_tune.reduction.Compressor` keeps references, not copies, so it judges at once.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from compressm_tune.errors import ConfigError

__all__ = ["SMALL_SPLIT", "AdaptiveConfig", "AdaptiveTracker", "Baseline", "Readiness",
           "paired_verdict"]

SMALL_SPLIT = 20  # validation samples below which the net's verdicts are flagged as noisy
_Z = stats.norm.ppf(0.975)


@dataclass
class AdaptiveConfig:
    """Readiness, window bounds and noise level of the ``adaptive`` schedule (module doc)."""

    checks: int = field(default=8, metadata={
        "flag": "--adaptive-checks",
        "help": "adaptive schedule: checks spread over the window after readiness (when no "
                "--reduce-every is given)"})
    noise: float = field(default=2.0, metadata={
        "flag": "--adaptive-noise",
        "help": "adaptive schedule: standard errors of the per-sample validation metric that "
                "count as noise (the starting band, the plateau test, the safety net's "
                "margin); > 1"})
    span: float = field(default=0.1, metadata={
        "flag": "--plateau-span",
        "help": "adaptive schedule: share of the steps over which validation must stop "
                "improving beyond noise before the first cut"})
    by: float = field(default=0.5, metadata={
        "flag": "--ready-by",
        "help": "adaptive schedule: share of the steps after which a model out of its "
                "starting band counts as ready even if still improving"})
    latest: float = field(default=0.75, metadata={
        "flag": "--latest-cut",
        "help": "adaptive schedule: no cut after this share of the steps (the rest recovers)"})
    recover: float = field(default=0.06, metadata={
        "flag": "--recover",
        "help": "adaptive schedule: a cut the safety net rejects at once trains this share "
                "of the steps and is judged again before it is rolled back (0: no second "
                "verdict; train and the job, a Compressor judges at once)"})

    def __post_init__(self) -> None:
        if self.checks < 1:
            raise ConfigError(f"checks >= 1 must hold, got checks={self.checks}")
        if not self.noise > 1.0:
            raise ConfigError(f"noise > 1 must hold (standard errors), got noise={self.noise}")
        for name in ("span", "by", "latest"):
            if not 0.0 < getattr(self, name) <= 1.0:  # NaN fails too
                raise ConfigError(f"0 < {name} <= 1 must hold, got {name}={getattr(self, name)}")
        if not 0.0 <= self.recover < 1.0:
            raise ConfigError(f"0 <= recover < 1 must hold, got recover={self.recover}")


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


def improving(earlier: np.ndarray, now: np.ndarray, noise: float) -> bool:
    """Whether the per-sample metric values ``now`` (higher is better) improved on
    ``earlier`` (the same samples) beyond ``noise`` standard errors of the paired change.

    >>> import numpy as np
    >>> before = np.zeros(100); after = before.copy(); after[:3] = 1.0  # 3 of 100 flip right
    >>> improving(before, after, 2.0), improving(before, np.ones(100), 2.0)
    (False, True)
    """
    d = np.asarray(now, np.float64) - np.asarray(earlier, np.float64)
    mean, se = _mean_se(d)
    return bool(mean > 0 and mean > _multiplier(noise, len(d)) * se)


class Readiness:
    """When the adaptive schedule may make its first cut (module docstring): the starting
    band and the recent validation for the plateau test; and the share of the safety net's
    tolerance the kept cuts have used up."""

    def __init__(self, config: AdaptiveConfig) -> None:
        self.config = config
        self.baseline: Baseline | None = None
        self.history: list[tuple[int, list[float]]] = []  # (step, per-sample metric, higher
        # is better), the newest check at least a span back and every later one
        self.spent = 0.0  # the drops of the cuts kept so far, summed (one shared tolerance)

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": None if self.baseline is None else vars(self.baseline),
                "history": [[t, v] for t, v in self.history], "spent": self.spent}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        base = state.get("baseline")
        self.baseline = Baseline(**base) if base else None
        self.history = [(int(t), [float(x) for x in v]) for t, v in state.get("history", [])]
        self.spent = float(state.get("spent", 0.0))

    def begin(self, samples: dict[str, np.ndarray]) -> None:
        self.baseline = Baseline.measure(samples, self.config.noise)

    def wait(self, step: int, total: int | None, val: dict[str, float],
             samples: dict[str, np.ndarray] | None) -> str | None:
        """Why the model is not ready at ``step`` of ``total`` (None: ready; the LR warm-up is
        the caller's). ``total`` None (a loop of unknown length): the plateau is measured
        over one step and there is no ``by``."""
        if self.baseline is None or samples is None:
            return None  # no per-sample validation: nothing to measure, ready after warm-up
        _, values, sign = _metric(samples)
        values = sign * values
        span = 1 if total is None else max(1, int(self.config.span * total))
        earlier = [(t, v) for t, v in self.history if t <= step - span][-1:]
        self.history = earlier + [(t, v) for t, v in self.history if t > step - span]
        self.history.append((step, values.tolist()))
        if not self.baseline.left(val):
            return "metric in its starting band"
        if total is not None and step >= self.config.by * total:
            return None
        if not earlier:
            return "no validation a span back yet"
        if improving(np.asarray(earlier[0][1]), values, self.config.noise):
            return "metric still improving"
        return None



def paired_verdict(before: dict[str, np.ndarray], after: dict[str, np.ndarray],
                   max_drop: float, noise: float, spent: float = 0.0) -> dict[str, Any]:
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
    spent : float
        The drops of earlier cuts that were kept (the adaptive schedule): this cut's drop
        plus ``spent`` is what must stay within the tolerance.

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
    rollback = bool(loss_change > k * loss_se and drop + spent > tolerance)
    out = {"rollback": rollback, "n_val": n, "loss_change": loss_change,
           "loss_change_se": loss_se, "drop": drop, "drop_se": drop_se, "tolerance": tolerance}
    if spent:
        out["spent"] = spent
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
