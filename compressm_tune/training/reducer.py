"""In-training reduction: when and how the trainer shrinks layers, with a safety net.

At every evaluation inside the window (default: the first 10% of steps, the LR warm-up) the
:class:`Reducer` recomputes each layer's Hankel singular values, asks the rank policy for a
new width, and cuts by balanced truncation. Before each cut the full training state is
checkpointed (``pre_cut.pt``); after it the model is validated, and if the validation score
fell by more than ``max_drop`` the cut is rolled back and that layer is frozen at its width.

Adam moments after a cut: the reduced layer's parameters live in a new basis (balancing then
re-diagonalization mixes all old states), so the old per-coordinate moments no longer belong
to any coordinate. ``moments="reset"`` (default) starts them afresh for the cut layer only;
``"slice"`` keeps the first ``r`` rows, as the paper's code does. Every other parameter keeps
its moments. ``bench_results/compression.md`` compares the two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from compressm_tune.errors import ConfigError
from compressm_tune.reduction import ReductionPolicy, layer_hsv, plan_rank, truncate_layer

__all__ = ["ReduceConfig", "Reducer", "MOMENT_POLICIES", "spectrum_record"]

MOMENT_POLICIES = ("reset", "slice")
# Which axis of each recurrence parameter indexes the state (for moments="slice").
_STATE_AXIS = {"nu_log": 0, "theta_log": 0, "gamma_log": 0, "B_re": 0, "B_im": 0,
               "C_re": 1, "C_im": 1}


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

    def __post_init__(self) -> None:
        if not 0.0 < self.window <= 1.0:
            raise ConfigError(f"0 < window <= 1 must hold, got window={self.window}")
        if self.every is not None and self.every < 1:
            raise ConfigError(f"every >= 1 must hold, got every={self.every}")
        if self.max_drop < 0:
            raise ConfigError(f"max_drop >= 0 must hold, got max_drop={self.max_drop}")
        if self.moments not in MOMENT_POLICIES:
            raise ConfigError(f"moments must be one of {MOMENT_POLICIES}, got {self.moments!r}")


def spectrum_record(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Per layer: HSVs (descending) and each diagonal mode's own Hankel score.

    The mode score ``sqrt(P_ii Q_ii) = |b_i| |c_i| / (1 - |lambda_i|^2)`` is the HSV of mode
    ``i`` taken alone; unlike the HSVs, it keeps the identity of each state between
    evaluations, so its ranking can be compared over training (Kendall tau).
    """
    records = []
    for k, block in enumerate(model.blocks):
        lam, b, c, _ = block.lru.system()
        score = (b.abs().norm(dim=1) * c.abs().norm(dim=0) / (1 - lam.abs() ** 2))  # (N,)
        records.append({"layer": k, "hsv": [float(g) for g in layer_hsv(block.lru)],
                        "mode_score": [float(v) for v in score]})
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

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": sorted(self.frozen), "closed": self.closed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frozen = set(state["frozen"])
        self.closed = bool(state.get("closed", False))

    def active(self, step: int, total_steps: int) -> bool:
        """Whether an evaluation at ``step`` lies inside the reduction window."""
        return step <= self.config.window * total_steps

    def due(self, step: int, total_steps: int) -> bool:
        """Whether ``step`` is an extra attempt point (``every``) inside the window."""
        every = self.config.every
        return every is not None and step % every == 0 and self.active(step, total_steps)

    def attempt(self, trainer: Any, val: dict[str, float]) -> list[dict[str, Any]]:
        """Try one cut per layer; return a log record per layer (HSVs, rank, action)."""
        records = []
        for k in range(len(trainer.model.blocks)):
            layer = trainer.model.blocks[k].lru
            hsv = layer_hsv(layer)
            record: dict[str, Any] = {"layer": k, "n": layer.state_dim,
                                      "hsv": [float(g) for g in hsv]}
            rank = None if k in self.frozen else self.plan(k, hsv, trainer.step)
            if k in self.frozen:
                record["action"] = "frozen"
            elif rank is None:
                record["action"] = "keep"
            else:
                record["rank"] = rank
                val = self._cut(trainer, k, rank, val, record)
            records.append(record)
        return records

    def close_window(self, trainer: Any) -> list[int] | None:
        """Budget-aware truncation, once, at the first evaluation after the window.

        If ``fits`` rejects the current widths, repeatedly drop the balanced state with the
        smallest HSV relative to its layer's HSV sum (the same yardstick as ``tau``) until the
        widths fit, then truncate each layer once. These cuts are not rolled back: a model
        over budget is no use, so the trial should finish feasible and let accuracy speak.
        Returns the new widths, or None when nothing was cut.
        """
        self.closed = True
        fits = self.config.fits
        widths = trainer.model.state_dims
        if fits is None or fits(widths):
            return None
        hsv = [layer_hsv(block.lru) for block in trainer.model.blocks]
        ranks = list(widths)
        while not fits(ranks):
            weakest = [(h[r - 1] / h.sum(), k)
                       for k, (h, r) in enumerate(zip(hsv, ranks, strict=True)) if r > 1]
            if not weakest:
                break
            ranks[min(weakest)[1]] -= 1
        for block, rank in zip(trainer.model.blocks, ranks, strict=True):
            truncate_layer(block.lru, rank, select=self.config.policy.select,
                           seed=self.config.policy.seed)
        trainer.rebuild_optimizer()  # fresh moments: every layer may have changed basis
        trainer.best_score = float("-inf")
        return ranks

    def plan(self, layer: int, hsv: Any, step: int) -> int | None:
        """The new rank of ``layer`` at ``step`` (None: no cut); override to script cuts."""
        return plan_rank(hsv, self.config.policy, self.config.round_to)

    def _cut(self, trainer: Any, k: int, rank: int, val: dict[str, float],
             record: dict[str, Any]) -> dict[str, float]:
        snapshot = trainer.save("pre_cut.pt")
        layer = trainer.model.blocks[k].lru
        old_params = {name: getattr(layer, name) for name in _STATE_AXIS}
        old_state = trainer.optimizer.state
        policy = self.config.policy
        truncate_layer(layer, rank, select=policy.select, seed=policy.seed)
        trainer.rebuild_optimizer()
        self._carry_moments(trainer.optimizer, old_state, layer, old_params, rank)
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
                       rank: int) -> None:
        new_params = {id(getattr(layer, name)) for name in _STATE_AXIS}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in new_params and p in old_state:
                    optimizer.state[p] = old_state[p]
        if self.config.moments != "slice":
            return
        for name, axis in _STATE_AXIS.items():
            old = old_state.get(old_params[name])
            if not old:
                continue
            optimizer.state[getattr(layer, name)] = {
                key: value.narrow(axis, 0, rank).clone() if value.dim() > axis else value.clone()
                for key, value in old.items()
            }
