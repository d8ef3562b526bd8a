"""In-training reduction: when and how the trainer shrinks layers, with a safety net.

At every attempt point inside the reduction window the :class:`Reducer` recomputes each layer's
state scores (LRU: Hankel singular values; selective: data importance on a fixed calibration
slice of the training inputs), asks the schedule for a new width, and cuts (LRU: balanced
truncation; selective: keeps the best state indices). Schedules (``ReduceConfig.schedule``):

* ``adaptive`` (default): the window opens when the model is ready (LR warm-up over, the
  validation metric out of its starting noise band and no longer improving beyond noise:
  :class:`Readiness`) and lasts ``window`` of the steps from there; each layer's width comes
  from its spectrum and the measured effect of the cut, with a bisection after a rejected cut
  (:class:`AdaptiveTracker`), and the kept cuts share one tolerance;
* ``window`` (the paper's): a ``tau`` cut at every attempt in the first ``window`` of the steps;
* ``settle``: cut when the spectrum's target width has settled (:class:`SettleTracker`).

Before each cut the full training state is checkpointed (``pre_cut.pt``); after it the model is
validated on the same samples, and a cut whose per-sample loss change is beyond noise and whose
drop exceeds ``max_drop`` plus the measured noise is rolled back (:func:`paired_verdict`; hosts
without per-sample validation compare the means against ``max_drop``). After a rollback the
``window`` and ``settle`` schedules freeze the layer at its width; ``adaptive`` retries between
the rejected and the kept width. ``max_drop=inf`` turns the safety net off: no checkpoint and
no validation around a cut (validation passes are most of what reduction costs); an attempt at
an evaluation still validates the model it leaves, for the evaluation's record.

Adam moments after a cut: a reduced LRU layer's parameters live in a new basis (balancing then
re-diagonalization mixes all old states), so the old per-coordinate moments no longer belong
to any coordinate. ``moments="reset"`` (default) starts them afresh for the cut layer only;
``"slice"`` keeps the first ``r`` rows, as the paper's code does. A selective layer keeps a
subset of its states unchanged, so their moments are carried over exactly, whatever
``moments`` says. Every other parameter keeps its moments.

The reducer drives its training loop through a small :class:`ReductionHost` interface (the
layers, the optimizer, a validation, a snapshot and its restore, the calibration inputs), which
the :class:`~compressm_tune.training.Trainer` (checkpoints on disk) and the
:class:`~compressm_tune.reduction.Compressor` (any user loop; in-memory snapshots, the user's
optimizer rewritten in place) both implement, so the cut logic exists once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressm_tune.reduction._adaptive import (
    SMALL_SPLIT,
    AdaptiveTracker,
    Baseline,
    Readiness,
    paired_verdict,
    warn_small_split,
)
from compressm_tune.reduction._host import ReductionHost, layer_inputs
from compressm_tune.reduction._policies import plan_rank
from compressm_tune.reduction._reduce_config import ReduceConfig
from compressm_tune.reduction._schedules import (
    SettleTracker,
    target_rank,
)
from compressm_tune.reduction._surgery import (
    carry_moments,
    is_selective,
    layer_width,
    reduce_layer,
    state_scores,
)

__all__ = ["Reducer"]

def _no_phase(name: str) -> AbstractContextManager:
    return nullcontext()


def _drop(before: dict[str, float], after: dict[str, float]) -> float:
    """Accuracy points lost, or for regression the relative increase of the loss."""
    if "accuracy" in before:
        return before["accuracy"] - after["accuracy"]
    return (after["loss"] - before["loss"]) / max(before["loss"], 1e-12)


Samples = dict[str, np.ndarray]


def measure(host: ReductionHost) -> tuple[dict[str, float], Samples | None]:
    """The host's validation and, when it offers ``validate_samples``, its per-sample values."""
    per_sample = getattr(host, "validate_samples", None)
    if per_sample is None:
        return host.validate(), None
    return per_sample()


class Reducer:
    """The reduction hook of a training loop, any :class:`ReductionHost` (see the module
    docstring).

    ``phase``, optional, is called with a phase name and returns a context manager that wraps
    that phase (for timing or tracing; the default does nothing): ``"attempt"`` (a whole
    :meth:`attempt`), ``"plan"`` (one layer's :meth:`plan`), ``"scores"`` (one layer's state
    scores), ``"cut"`` (one layer's truncation and surgery), ``"moments"`` (rebuilding the
    optimizer and carrying its state) and ``"close_window"`` (a whole :meth:`close_window`).
    Phases nest: everything but ``"close_window"`` runs inside an ``"attempt"`` or a
    ``"close_window"``.
    """

    def __init__(self, config: ReduceConfig,
                 phase: Callable[[str], AbstractContextManager] | None = None) -> None:
        self.config = config
        self.phase = phase if phase is not None else _no_phase
        self.frozen: set[int] = set()
        self.closed = False  # whether the window's closing (budget) step has run
        self.settle = SettleTracker(config.settle)
        self.bisect = AdaptiveTracker()
        self.readiness = Readiness(config.adaptive)  # when the adaptive schedule may cut
        self.ready: dict[str, Any] | None = None  # step and validation at readiness
        self.first_cut: dict[str, Any] | None = None  # step and validation of the first cut
        self.pending: dict[str, Any] | None = None  # a cut recovering before its verdict
        self.paused = 0  # steps the window stood still while cuts recovered
        self._warned = False
        self._total_steps: int | None = None  # the run's length, seen by active/due

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": sorted(self.frozen), "closed": self.closed,
                "settle": self.settle.state_dict(), "bisect": self.bisect.state_dict(),
                "readiness": self.readiness.state_dict(),
                "ready": self.ready, "first_cut": self.first_cut, "pending": self._pending_state(),
                "paused": self.paused}

    def _pending_state(self) -> dict[str, Any] | None:
        """The recovering cut as plain data; its snapshot survives a resume only as a file."""
        p = self.pending
        if p is None or not isinstance(p["snapshot"], (str, Path)):
            return None
        return {**p, "snapshot": str(p["snapshot"]),
                "samples": {k: np.asarray(v).tolist() for k, v in p["samples"].items()},
                "plans": {str(k): v for k, v in p["plans"].items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frozen = set(state["frozen"])
        self.closed = bool(state.get("closed", False))
        self.settle.load_state_dict(state.get("settle", {}))
        self.bisect.load_state_dict(state.get("bisect", {}))
        self.readiness.load_state_dict(state.get("readiness")
                                       or {"baseline": state.get("baseline")})
        self.ready, self.first_cut = state.get("ready"), state.get("first_cut")
        self.paused = int(state.get("paused", 0))
        p = state.get("pending")
        self.pending = None if p is None or not Path(p["snapshot"]).exists() else {
            **p, "samples": {k: np.asarray(v, np.float64) for k, v in p["samples"].items()},
            "plans": {int(k): v for k, v in p["plans"].items()}}

    @property
    def baseline(self) -> Baseline | None:
        """The validation before training and its noise band (adaptive schedule)."""
        return self.readiness.baseline

    @property
    def adaptive(self) -> bool:
        return self.config.schedule == "adaptive"

    def begin(self, host: ReductionHost) -> None:
        """Measure the starting validation and its noise band (the adaptive schedule's
        readiness test), once, before the first training step."""
        if not self.adaptive or self.baseline is not None:
            return
        val, samples = measure(host)
        if samples is not None:
            self.readiness.begin(samples)

    def summary(self) -> dict[str, Any]:
        """What the run record says about the schedule: the starting band, readiness, the
        first cut (step and validation before and after it), and the rolled-back widths."""
        return {"schedule": self.config.schedule,
                "baseline": None if self.baseline is None else self.baseline.as_dict(),
                "ready": self.ready, "first_cut": self.first_cut,
                "rejected_widths": {str(k): v for k, v in self.bisect.rejected.items()},
                "frozen": sorted(self.frozen)}

    def active(self, step: int, total_steps: int) -> bool:
        """Whether an evaluation at ``step`` lies inside the reduction window (for
        ``adaptive``: before readiness while readiness is still possible, then ``window`` of
        the steps from readiness on, never past ``adaptive.latest``), or a cut still awaits
        its verdict."""
        self._total_steps = total_steps
        return self.pending is not None or self._open(step, total_steps)

    def _open(self, step: int, total_steps: int) -> bool:
        """Whether new cuts may be made at ``step`` (see :meth:`active`)."""
        if not self.adaptive:
            return step <= self.config.window * total_steps
        if step > self.config.adaptive.latest * total_steps:
            return False
        return self.ready is None or step <= (self.ready["step"] + self.paused
                                              + self.config.window * total_steps)

    def due(self, step: int, total_steps: int) -> bool:
        """Whether ``step`` is an extra attempt point inside the window: every ``every``
        steps, or for the settle schedule without ``every``, ``settle.checks`` points spread
        over the window; and the step a recovering cut is judged at."""
        if self.pending is not None:
            self._total_steps = total_steps
            return step >= self.pending["judge_at"]
        every = self.cadence(total_steps)
        if self.adaptive and self.ready is None:  # readiness checks: two per plateau span
            every = max(1, int(self.config.adaptive.span * total_steps) // 2)
        return every is not None and step % every == 0 and self.active(step, total_steps)

    def cadence(self, total_steps: int) -> int | None:
        """Steps between extra attempts inside the window (None: only at evaluations)."""
        if self.config.every is not None or self.config.schedule == "window":
            return self.config.every
        checks = (self.config.adaptive.checks if self.adaptive
                  else self.config.settle.checks)
        return max(1, int(self.config.window * total_steps) // checks)

    def _wait(self, host: ReductionHost, val: dict[str, float] | None,
              samples: Samples | None) -> tuple[str | None, dict[str, float] | None,
                                                 Samples | None]:
        """Readiness of the adaptive schedule: why it must still wait (None: ready now),
        with the validation measured for it."""
        if host.steps_done < getattr(host, "warmup_steps", 0):
            return "lr warm-up", val, samples
        if self.baseline is not None:
            if val is None or samples is None:
                val, samples = measure(host)
            why = self.readiness.wait(host.steps_done, self._total_steps, val, samples)
            if why is not None:
                return why, val, samples
        self.ready = {"step": host.steps_done, "val": val}
        return None, val, samples

    def attempt(self, host: ReductionHost, val: dict[str, float] | None = None,
                samples: Samples | None = None
                ) -> tuple[list[dict[str, Any]], dict[str, float] | None]:
        """Plan every layer's rank, cut all planned layers at once and validate once.

        Validation passes are what the safety net costs, so an attempt validates only when it
        cuts: before (unless ``val``, the validation just measured, is given) and after. If
        the joint cut fails the safety net it is rolled back and the layers are retried one at
        a time, each with its own check, so the layer that hurts is the one frozen.

        ``samples``: the per-sample values of ``val`` (see :func:`measure`), for the paired
        safety net. The adaptive schedule first checks readiness (records ``"wait"``).

        Returns the per-layer records (scores, rank, action) and the validation of the model
        as it is after the attempt (None when nothing was planned and ``val`` was None).
        """
        with self.phase("attempt"):
            return self._attempt(host, val, samples)

    def _attempt(self, host: ReductionHost, val: dict[str, float] | None,
                 samples: Samples | None
                 ) -> tuple[list[dict[str, Any]], dict[str, float] | None]:
        if self.adaptive and self.ready is None:
            why, val, samples = self._wait(host, val, samples)
            if why is not None:
                return [{"layer": k, "n": layer_width(layer), "action": "wait", "why": why}
                        for k, layer in enumerate(host.reducible_layers())], val
        verdicts: list[dict[str, Any]] = []
        if self.pending is not None:
            last = self._total_steps is not None and host.steps_done >= self._total_steps
            if host.steps_done < self.pending["judge_at"] and not last:  # the end judges now
                return [{"layer": k, "n": n, "rank": rank, "action": "recovering",
                         "judge_at": self.pending["judge_at"]}
                        for k, (n, rank) in self.pending["plans"].items()], val
            verdicts, val, samples = self._verdict(host, val, samples)
            if self._total_steps is not None and not self._open(host.steps_done,
                                                                self._total_steps):
                return verdicts, val
        records, val = self._plan_and_cut(host, val, samples)
        return verdicts + records, val

    def _plan_and_cut(self, host: ReductionHost, val: dict[str, float] | None,
                      samples: Samples | None
                      ) -> tuple[list[dict[str, Any]], dict[str, float] | None]:
        inputs = self._layer_inputs(host)
        records, plans = [], {}
        for k, layer in enumerate(host.reducible_layers()):
            scores = self._scores(layer, inputs[k])  # (N,)
            ranking = np.sort(scores)[::-1]  # descending, what the rank policy reads
            record: dict[str, Any] = {"layer": k, "n": layer_width(layer),
                                      "hsv": [float(g) for g in ranking]}
            rank = None
            if k not in self.frozen:
                with self.phase("plan"):
                    rank = self.plan(k, ranking, host.steps_done)
            if k in self.frozen:  # (plan may have frozen it: its bisection converged)
                record["action"] = "frozen"
            elif rank is None:
                record["action"] = "keep"
            else:
                record["rank"] = rank
                plans[k] = (rank, scores)
            records.append(record)
        if not plans:
            return records, val
        if not self.checked:  # no safety net: cut, and validate only for an evaluation
            self._cut_together(host, plans, inputs, None)
            for k in plans:
                records[k]["action"] = "cut"
            after = None if val is None else host.validate()
            self._first(host, val, after)
            return records, after
        if val is None or samples is None:
            val, samples = measure(host)
        self._note_split(samples)
        if len(plans) > 1:
            after, after_samples, verdict = self._cut_together(host, plans, inputs, val,
                                                               samples)
            if after is not None:
                for k in plans:
                    records[k].update(action="cut", val_before=val, val_after=after,
                                      **verdict)
                self._first(host, val, after)
                return records, after
        for k, (rank, scores) in plans.items():  # one at a time, each with its own check
            if self.pending is not None:  # an earlier layer's cut recovers: this one waits
                records[k].update(action="keep", why="a cut is recovering")
                continue
            layer = host.reducible_layers()[k]
            if len(plans) > 1 and inputs[k] is not None:  # earlier cuts moved the inputs
                inputs[k] = self._layer_inputs(host)[k]
                if is_selective(layer):
                    scores = self._scores(layer, inputs[k])
            val, samples = self._cut(host, k, rank, val, records[k], scores, inputs[k],
                                     samples)
        return records, val

    def _defers(self, host: ReductionHost) -> bool:
        """Whether cuts train ``adaptive.recover`` of the steps before their verdict: the
        adaptive schedule, with a host whose snapshot is the whole training state."""
        return (self.adaptive and self.config.adaptive.recover > 0
                and self._total_steps is not None and getattr(host, "defers_verdicts", False))

    def _verdict(self, host: ReductionHost, val: dict[str, float] | None,
                 samples: Samples | None
                 ) -> tuple[list[dict[str, Any]], dict[str, float], Samples | None]:
        """Judge the recovered cut against the validation before it: keep it, or return to
        the pre-cut checkpoint and bisect. Returns the records and the validation (with its
        samples) of the model kept."""
        p, self.pending = self.pending, None
        self.paused += host.steps_done - p["step"]  # recovery does not use up the window
        if val is None or samples is None:
            val, samples = measure(host)
        verdict = self._judge(p["val"], p["samples"], val, samples)
        rollback = verdict.pop("rollback")
        records = [{"layer": k, "n": n, "rank": rank, "cut_at": p["step"],
                    "action": "rollback" if rollback else "kept", "val_before": p["val"],
                    "val_after": val, **verdict} for k, (n, rank) in p["plans"].items()]
        if not rollback:
            self._first(host, p["val"], val, step=p["step"])
            return records, val, samples
        host.restore(p["snapshot"])
        host.widths_changed()
        for k, (_, rank) in p["plans"].items():
            self._rejected(k, rank)
        return records, p["val"], p["samples"]

    def _note_split(self, samples: Samples | None) -> None:
        if samples is not None and not self._warned and len(samples["loss"]) < SMALL_SPLIT:
            warn_small_split(len(samples["loss"]))
            self._warned = True

    def _first(self, host: ReductionHost, before: dict[str, float],
               after: dict[str, float], step: int | None = None) -> None:
        if self.first_cut is None:
            self.first_cut = {"step": host.steps_done if step is None else step,
                              "val_before": before, "val_after": after}

    def _judge(self, before: dict[str, float], before_samples: Samples | None,
               after: dict[str, float], after_samples: Samples | None) -> dict[str, Any]:
        """The safety net's verdict: paired per sample when both sides have samples."""
        if before_samples is not None and after_samples is not None:
            spent = self.readiness.spent if self.adaptive else 0.0
            verdict = paired_verdict(before_samples, after_samples, self.config.max_drop,
                                     self.config.adaptive.noise, spent)
            if self.adaptive and not verdict["rollback"]:  # kept: its drop is spent
                self.readiness.spent += max(0.0, verdict["drop"])
            return verdict
        return {"rollback": _drop(before, after) > self.config.max_drop}

    def _rejected(self, k: int, rank: int) -> None:
        """After a rollback: the adaptive schedule remembers the width (bisection); the
        others freeze the layer."""
        if self.adaptive:
            self.bisect.reject(k, rank)
        else:
            self.frozen.add(k)

    @property
    def checked(self) -> bool:
        """Whether cuts are checked (and rolled back): ``max_drop`` is finite."""
        return math.isfinite(self.config.max_drop)

    def _surgery(self, host: ReductionHost, plans: dict[int, tuple[int, np.ndarray]],
                 inputs: list[torch.Tensor | None]) -> None:
        """Cut every planned layer, point the optimizer at the new parameters once, and carry
        the moments that still apply (see :func:`carry_moments`)."""
        old_state = dict(host.optimizer.state)  # the host may rewrite the optimizer in place
        layers = host.reducible_layers()
        cut = []
        policy = self.config.policy
        for k, (rank, scores) in plans.items():
            layer = layers[k]
            before = dict(layer.named_parameters())
            shapes = {name: p.shape for name, p in before.items()}
            with self.phase("cut"):
                keep = reduce_layer(layer, rank, select=policy.select, seed=policy.seed,
                                    scores=scores, inputs=inputs[k])
            cut.append((layer, before, shapes, rank, keep))
        with self.phase("moments"):
            host.rebuild_optimizer()
            for layer, before, shapes, rank, keep in cut:
                carry_moments(self.config.moments, host.optimizer, old_state, layer, before,
                              shapes, rank, keep)

    def _cut_together(self, host: ReductionHost, plans: dict[int, tuple[int, np.ndarray]],
                      inputs: list[torch.Tensor | None], val: dict[str, float] | None,
                      samples: Samples | None = None
                      ) -> tuple[dict[str, float] | None, Samples | None, dict[str, Any]]:
        """Cut every planned layer, rebuild the optimizer once, validate once; on a failed
        check restore the pre-cut state and return None. Unchecked (``val`` None): no
        snapshot, no validation, returns None. Also returns the per-sample values after
        the cut and the net's verdict."""
        snapshot = host.snapshot() if val is not None else None
        self._surgery(host, plans, inputs)
        host.widths_changed()
        if val is None:
            return None, None, {}
        after, after_samples = measure(host)
        verdict = self._judge(val, samples, after, after_samples)
        if verdict.pop("rollback"):
            host.restore(snapshot)
            return None, None, verdict
        return after, after_samples, verdict

    def close_window(self, host: ReductionHost) -> list[int] | None:
        """Budget-aware truncation, once, at the first evaluation after the window.

        If ``fits`` rejects the current widths, repeatedly drop the state with the smallest
        score relative to its layer's score sum (the same yardstick as ``tau``) until the
        widths fit, then cut each layer once. These cuts are not rolled back: a model over
        budget is no use, so the trial should finish feasible and let accuracy speak.
        Returns the new widths, or None when nothing was cut.
        """
        with self.phase("close_window"):
            return self._close_window(host)

    def _close_window(self, host: ReductionHost) -> list[int] | None:
        self.closed = True
        fits = self.config.fits
        layers = host.reducible_layers()
        widths = [layer_width(layer) for layer in layers]
        if fits is None or fits(widths):
            return None
        inputs = self._layer_inputs(host)
        scores = [self._scores(layer, x) for layer, x in zip(layers, inputs, strict=True)]
        ranking = [np.sort(g)[::-1] for g in scores]
        ranks = list(widths)
        while not fits(ranks):
            weakest = [(g[r - 1] / g.sum(), k)
                       for k, (g, r) in enumerate(zip(ranking, ranks, strict=True)) if r > 1]
            if not weakest:
                break
            ranks[min(weakest)[1]] -= 1
        policy = self.config.policy
        for layer, rank, g, x in zip(layers, ranks, scores, inputs, strict=True):
            with self.phase("cut"):
                reduce_layer(layer, rank, select=policy.select, seed=policy.seed, scores=g,
                             inputs=x)
        with self.phase("moments"):
            host.rebuild_optimizer()  # fresh moments: every layer may have changed
            for group in host.optimizer.param_groups:
                for p in group["params"]:
                    host.optimizer.state.pop(p, None)
        host.widths_changed()
        return ranks

    def plan(self, layer: int, hsv: Any, step: int) -> int | None:
        """The new rank of ``layer`` at ``step`` (None: no cut) from its descending scores;
        override to script cuts."""
        if self.adaptive:
            n = len(hsv)
            target = (target_rank(hsv, self.config.policy, self.config.round_to)
                      if self.config.policy.kind == "tau"
                      else plan_rank(hsv, self.config.policy, self.config.round_to) or n)
            rank, done = self.bisect.plan(layer, n, target, self.config.policy.gate)
            if done:
                self.frozen.add(layer)
            return rank
        if self.config.schedule == "settle":
            total = self._total_steps
            every = self.cadence(total) if total else None
            last = total is None or every is None or (
                step + every > self.config.window * total)  # no later check in the window
            return self.settle.plan(layer, hsv, self.config.policy, self.config.round_to,
                                    last)
        return plan_rank(hsv, self.config.policy, self.config.round_to)

    def _scores(self, layer: nn.Module, inputs: torch.Tensor | None) -> np.ndarray:
        with self.phase("scores"):
            return state_scores(layer, inputs)

    def _layer_inputs(self, host: ReductionHost) -> list[torch.Tensor | None]:
        """Each layer's inputs on the calibration slice: the first ``calibration`` training
        sequences, the same every time, so score changes reflect the model, not the data.
        LTI layers' inputs only for an input-weighted policy."""
        lru = self.config.policy.weighting == "input"
        layers = host.reducible_layers()
        x = host.calibration_inputs(self.config.calibration)
        if x is None:
            return [None] * len(layers)
        return layer_inputs(host.model, x, lru=lru, layers=layers)

    def _cut(self, host: ReductionHost, k: int, rank: int, val: dict[str, float],
             record: dict[str, Any], scores: np.ndarray | None = None,
             inputs: torch.Tensor | None = None, samples: Samples | None = None
             ) -> tuple[dict[str, float], Samples | None]:
        """Cut one layer and check it: returns the validation (and its per-sample values)
        of the model kept."""
        if samples is None and val is None:
            val, samples = measure(host)
        snapshot = host.snapshot()
        self._surgery(host, {k: (rank, scores)}, {k: inputs})
        after, after_samples = measure(host)
        record["val_before"], record["val_after"] = val, after
        verdict = self._judge(val, samples, after, after_samples)
        rollback = verdict.pop("rollback")
        if rollback and self._defers(host):  # judged again after recovery (_verdict)
            judge_at = host.steps_done + max(1, round(self.config.adaptive.recover
                                                      * self._total_steps))
            self.pending = {"step": host.steps_done, "judge_at": judge_at,
                            "snapshot": snapshot, "val": val, "samples": samples,
                            "plans": {k: [record["n"], rank]}}
            record.update(action="cut", judge_at=judge_at, at_once=verdict)
            host.widths_changed()
            return after, after_samples
        if rollback:
            record.update(verdict)
            host.restore(snapshot)
            self._rejected(k, rank)
            record["action"] = "rollback"
            return val, samples
        record.update(action="cut", **verdict)
        host.widths_changed()
        self._first(host, val, after)
        return after, after_samples
