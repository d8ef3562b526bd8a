"""In-training reduction: when and how the trainer shrinks layers, with a safety net.

At every evaluation inside the window (default: the first 10% of steps, the LR warm-up) the
:class:`Reducer` recomputes each layer's state scores (LRU: Hankel singular values; selective:
data importance on a fixed calibration slice of the training inputs), asks the rank policy for
a new width, and cuts (LRU: balanced truncation; selective: keeps the best state indices).
Before each cut the full training state is checkpointed (``pre_cut.pt``); after it the model is
validated, and if the validation score fell by more than ``max_drop`` the cut is rolled back
and that layer is frozen at its width. ``max_drop=inf`` turns the safety net off: no
checkpoint and no validation around a cut (validation passes are most of what reduction costs,
``bench_results/reduction_share.md``); an attempt at an evaluation still validates the model it
leaves, for the evaluation's record.

Adam moments after a cut: a reduced LRU layer's parameters live in a new basis (balancing then
re-diagonalization mixes all old states), so the old per-coordinate moments no longer belong
to any coordinate. ``moments="reset"`` (default) starts them afresh for the cut layer only;
``"slice"`` keeps the first ``r`` rows, as the paper's code does. A selective layer keeps a
subset of its states unchanged, so their moments are carried over exactly, whatever
``moments`` says. Every other parameter keeps its moments. ``bench_results/compression.md``
compares the two LRU policies.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from compressm_tune._device import module_device
from compressm_tune.errors import ConfigError
from compressm_tune.models import SelectiveLayer
from compressm_tune.reduction import ReductionPolicy, plan_rank, reduce_layer, state_scores
from compressm_tune.training._settle import SCHEDULES, SettleConfig, SettleTracker

__all__ = ["CALIBRATION", "MOMENT_POLICIES", "SCHEDULES", "ReduceConfig", "Reducer",
           "SettleConfig", "layer_inputs", "spectrum_record"]

MOMENT_POLICIES = ("reset", "slice")
CALIBRATION = 128  # training sequences that score a selective layer's states


@dataclass
class ReduceConfig:
    """When and how to reduce during training."""

    policy: ReductionPolicy = field(default_factory=ReductionPolicy)
    window: float = 0.1  # attempt cuts at evaluations within the first 10% of steps
    every: int | None = None  # steps between attempts in the window (None: every evaluation)
    max_drop: float = 0.02  # roll back a cut losing more (accuracy points, or relative loss)
    moments: str = "reset"  # Adam moments of a cut layer: "reset" or "slice" (paper)
    # Optional hook (r, N) -> r' that rounds ranks to widths a hardware profile runs fast.
    round_to: Callable[[int, int], int] | None = None
    # Optional budget check on the per-layer widths; when the window closes and it fails, the
    # weakest balanced states (smallest normalized HSVs, across layers) are cut until it holds.
    fits: Callable[[list[int]], bool] | None = None
    # Training sequences whose layer inputs score the states (selective layers, and LRU
    # layers under an input-weighted policy).
    calibration: int = CALIBRATION
    # "window": the paper's, a tau cut at every attempt in the window; "settle": cut when the
    # spectrum has settled, toward the width repeated cuts would reach (training/_settle.py)
    schedule: str = "window"
    settle: SettleConfig = field(default_factory=SettleConfig)

    def __post_init__(self) -> None:
        if not 0.0 < self.window <= 1.0:
            raise ConfigError(f"0 < window <= 1 must hold, got window={self.window}")
        if self.every is not None and self.every < 1:
            raise ConfigError(f"every >= 1 must hold, got every={self.every}")
        if self.max_drop < 0:
            raise ConfigError(f"max_drop >= 0 must hold, got max_drop={self.max_drop}")
        if self.calibration < 1:
            raise ConfigError(f"calibration >= 1 must hold, got calibration={self.calibration}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "settle" and self.policy.kind == "fraction":
            raise ConfigError("schedule 'settle' needs a tau= or rank= policy: repeated "
                              f"fraction={self.policy.value:g} cuts have no fixed point")
        if self.moments not in MOMENT_POLICIES:
            raise ConfigError(f"moments must be one of {MOMENT_POLICIES}, got {self.moments!r}")


@torch.no_grad()
def layer_inputs(model: torch.nn.Module, x: torch.Tensor, lru: bool = False
                 ) -> list[torch.Tensor | None]:
    """What each block's SSM layer receives for model inputs ``x`` (eval mode): for the
    selective layers' data-driven scores, and with ``lru`` for the LRU layers' input-weighted
    HSVs too; None for the layers left out."""
    captured: list[torch.Tensor | None] = [None] * len(model.blocks)
    hooks = [block.ssm.register_forward_pre_hook(
        lambda _module, args, k=k: captured.__setitem__(k, args[0].detach()))
        for k, block in enumerate(model.blocks)
        if lru or isinstance(block.ssm, SelectiveLayer)]
    if hooks:
        was_training = model.training
        model.eval()
        try:
            model(x.to(module_device(model)))
        finally:
            model.train(was_training)
            for hook in hooks:
                hook.remove()
    return captured


def spectrum_record(model: torch.nn.Module, x: torch.Tensor | None = None,
                    weighting: str = "none") -> list[dict[str, Any]]:
    """Per layer: its state scores, descending (``hsv``) and per current state (``mode_score``).

    LRU: the Hankel singular values (input-weighted on ``x`` with ``weighting="input"``), and
    each diagonal mode's own Hankel score
    ``sqrt(P_ii Q_ii) = |b_i| |c_i| / (1 - |lambda_i|^2)`` (the HSV of mode ``i`` taken alone);
    unlike the HSVs, it keeps the identity of each state between evaluations, so its ranking
    can be compared over training (Kendall tau). Selective: the data importance of every state
    index on calibration inputs ``x`` (model inputs, required), sorted and in state order.
    """
    records = []
    inputs = (layer_inputs(model, x, lru=weighting == "input") if x is not None
              else [None] * len(model.blocks))
    for k, block in enumerate(model.blocks):
        scores = state_scores(block.ssm, inputs[k])
        if isinstance(block.ssm, SelectiveLayer):
            mode_score = scores
        else:
            lam, b, c, _ = block.ssm.system()
            mode_score = (b.abs().norm(dim=1) * c.abs().norm(dim=0) / (1 - lam.abs() ** 2))
        records.append({"layer": k, "hsv": [float(g) for g in np.sort(scores)[::-1]],
                        "mode_score": [float(v) for v in mode_score]})
    return records


def _drop(before: dict[str, float], after: dict[str, float]) -> float:
    """Accuracy points lost, or for regression the relative increase of the loss."""
    if "accuracy" in before:
        return before["accuracy"] - after["accuracy"]
    return (after["loss"] - before["loss"]) / max(before["loss"], 1e-12)


class Reducer:
    """The trainer's reduction hook (see the module docstring)."""

    def __init__(self, config: ReduceConfig) -> None:
        self.config = config
        self.frozen: set[int] = set()
        self.closed = False  # whether the window's closing (budget) step has run
        self.settle = SettleTracker(config.settle)
        self._total_steps: int | None = None  # the run's length, seen by active/due

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": sorted(self.frozen), "closed": self.closed,
                "settle": self.settle.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frozen = set(state["frozen"])
        self.closed = bool(state.get("closed", False))
        self.settle.load_state_dict(state.get("settle", {}))

    def active(self, step: int, total_steps: int) -> bool:
        """Whether an evaluation at ``step`` lies inside the reduction window."""
        self._total_steps = total_steps
        return step <= self.config.window * total_steps

    def due(self, step: int, total_steps: int) -> bool:
        """Whether ``step`` is an extra attempt point inside the window: every ``every``
        steps, or for the settle schedule without ``every``, ``settle.checks`` points spread
        over the window."""
        every = self.cadence(total_steps)
        return every is not None and step % every == 0 and self.active(step, total_steps)

    def cadence(self, total_steps: int) -> int | None:
        """Steps between extra attempts inside the window (None: only at evaluations)."""
        if self.config.every is not None or self.config.schedule != "settle":
            return self.config.every
        return max(1, int(self.config.window * total_steps) // self.config.settle.checks)

    def attempt(self, trainer: Any, val: dict[str, float] | None = None
                ) -> tuple[list[dict[str, Any]], dict[str, float] | None]:
        """Plan every layer's rank, cut all planned layers at once and validate once.

        Validation passes are what the safety net costs (``bench_results/reduction_share.md``:
        one per layer cut was 8% of a run's time), so an attempt validates only when it cuts:
        before (unless ``val``, the validation just measured, is given) and after. If the joint
        cut fails the safety net it is rolled back and the layers are retried one at a time,
        each with its own check, so the layer that hurts is the one frozen.

        Returns the per-layer records (scores, rank, action) and the validation of the model
        as it is after the attempt (None when nothing was planned and ``val`` was None).
        """
        inputs = self._layer_inputs(trainer)
        records, plans = [], {}
        for k, layer in enumerate(trainer.model.ssm_layers()):
            scores = state_scores(layer, inputs[k])  # (N,)
            ranking = np.sort(scores)[::-1]  # descending, what the rank policy reads
            record: dict[str, Any] = {"layer": k, "n": layer.state_dim,
                                      "hsv": [float(g) for g in ranking]}
            rank = None if k in self.frozen else self.plan(k, ranking, trainer.step)
            if k in self.frozen:
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
            self._cut_together(trainer, plans, inputs, None)
            for k in plans:
                records[k]["action"] = "cut"
            return records, None if val is None else trainer.validate()
        if val is None:
            val = trainer.validate()
        if len(plans) > 1:
            after = self._cut_together(trainer, plans, inputs, val)
            if after is not None:
                for k in plans:
                    records[k].update(action="cut", val_before=val, val_after=after)
                return records, after
        for k, (rank, scores) in plans.items():  # one at a time, each with its own check
            layer = trainer.model.ssm_layers()[k]
            if len(plans) > 1 and inputs[k] is not None:  # earlier cuts moved the inputs
                inputs[k] = self._layer_inputs(trainer)[k]
                if isinstance(layer, SelectiveLayer):
                    scores = state_scores(layer, inputs[k])
            val = self._cut(trainer, k, rank, val, records[k], scores, inputs[k])
        return records, val

    @property
    def checked(self) -> bool:
        """Whether cuts are checked (and rolled back): ``max_drop`` is finite."""
        return math.isfinite(self.config.max_drop)

    def _cut_together(self, trainer: Any, plans: dict[int, tuple[int, np.ndarray]],
                      inputs: list[torch.Tensor | None], val: dict[str, float] | None
                      ) -> dict[str, float] | None:
        """Cut every planned layer, rebuild the optimizer once, validate once; on a failed
        check restore the pre-cut state and return None. Unchecked (``val`` None): no
        snapshot, no validation, returns None."""
        snapshot = trainer.save("pre_cut.pt") if val is not None else None
        old_state = trainer.optimizer.state
        layers = trainer.model.ssm_layers()
        cut = []
        policy = self.config.policy
        for k, (rank, scores) in plans.items():
            layer = layers[k]
            old_params = {name: getattr(layer, name) for name in layer.state_axes}
            keep = reduce_layer(layer, rank, select=policy.select, seed=policy.seed,
                                scores=scores, inputs=inputs[k])
            cut.append((layer, old_params, rank, keep))
        trainer.rebuild_optimizer()
        for layer, old_params, rank, keep in cut:
            self._carry_moments(trainer.optimizer, old_state, layer, old_params, rank, keep)
        trainer.best_score = float("-inf")  # "best" now means best at the new widths
        if val is None:
            return None
        after = trainer.validate()
        if _drop(val, after) > self.config.max_drop:
            trainer.restore(snapshot)  # restores best_score too
            return None
        return after

    def close_window(self, trainer: Any) -> list[int] | None:
        """Budget-aware truncation, once, at the first evaluation after the window.

        If ``fits`` rejects the current widths, repeatedly drop the state with the smallest
        score relative to its layer's score sum (the same yardstick as ``tau``) until the
        widths fit, then cut each layer once. These cuts are not rolled back: a model over
        budget is no use, so the trial should finish feasible and let accuracy speak.
        Returns the new widths, or None when nothing was cut.
        """
        self.closed = True
        fits = self.config.fits
        widths = trainer.model.state_dims
        if fits is None or fits(widths):
            return None
        layers = trainer.model.ssm_layers()
        inputs = self._layer_inputs(trainer)
        scores = [state_scores(layer, x) for layer, x in zip(layers, inputs, strict=True)]
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
            reduce_layer(layer, rank, select=policy.select, seed=policy.seed, scores=g, inputs=x)
        trainer.rebuild_optimizer()  # fresh moments: every layer may have changed
        trainer.best_score = float("-inf")
        return ranks

    def plan(self, layer: int, hsv: Any, step: int) -> int | None:
        """The new rank of ``layer`` at ``step`` (None: no cut) from its descending scores;
        override to script cuts."""
        if self.config.schedule == "settle":
            total = self._total_steps
            every = self.cadence(total) if total else None
            last = total is None or every is None or (
                step + every > self.config.window * total)  # no later check in the window
            return self.settle.plan(layer, hsv, self.config.policy, self.config.round_to,
                                    last)
        return plan_rank(hsv, self.config.policy, self.config.round_to)

    def _layer_inputs(self, trainer: Any) -> list[torch.Tensor | None]:
        """Each layer's inputs on the calibration slice: the first ``calibration`` training
        sequences, the same every time, so score changes reflect the model, not the data.
        LRU layers' inputs only for an input-weighted policy."""
        return layer_inputs(trainer.model, trainer.dataset.x_train[:self.config.calibration],
                            lru=self.config.policy.weighting == "input")

    def _cut(self, trainer: Any, k: int, rank: int, val: dict[str, float],
             record: dict[str, Any], scores: np.ndarray | None = None,
             inputs: torch.Tensor | None = None) -> dict[str, float]:
        snapshot = trainer.save("pre_cut.pt")
        layer = trainer.model.blocks[k].ssm
        old_params = {name: getattr(layer, name) for name in layer.state_axes}
        old_state = trainer.optimizer.state
        policy = self.config.policy
        keep = reduce_layer(layer, rank, select=policy.select, seed=policy.seed, scores=scores,
                            inputs=inputs)
        trainer.rebuild_optimizer()
        self._carry_moments(trainer.optimizer, old_state, layer, old_params, rank, keep)
        after = trainer.validate()
        record["val_before"], record["val_after"] = val, after
        if _drop(val, after) > self.config.max_drop:
            trainer.restore(snapshot)
            self.frozen.add(k)
            record["action"] = "rollback"
            return val
        record["action"] = "cut"
        trainer.best_score = float("-inf")  # "best" now means best at the new widths
        return after

    def _carry_moments(self, optimizer: torch.optim.Optimizer, old_state: dict,
                       layer: torch.nn.Module, old_params: dict[str, torch.Tensor],
                       rank: int, keep: torch.Tensor | None) -> None:
        """Carry every untouched parameter's moments; for the cut ones, the kept states'
        moments (``keep``, exact) or, for an LRU with ``moments="slice"``, the first rows."""
        new_params = {id(getattr(layer, name)) for name in layer.state_axes}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in new_params and p in old_state:
                    optimizer.state[p] = old_state[p]
        if keep is None and self.config.moments != "slice":
            return
        index = keep if keep is not None else torch.arange(rank)
        for name, axis in layer.state_axes.items():
            old = old_state.get(old_params[name])
            if not old:
                continue
            optimizer.state[getattr(layer, name)] = {
                key: value.index_select(axis, index.to(value.device)).clone()
                if value.dim() > axis else value.clone()
                for key, value in old.items()
            }
