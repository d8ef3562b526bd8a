"""The training loop a :class:`~compressm_tune.reduction.Reducer` drives, and how it probes the
model: run it on calibration inputs, capture each reducible layer's inputs, record spectra."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from compressm_tune._device import module_device
from compressm_tune.reduction._surgery import find_reducible, is_selective, state_scores

__all__ = ["ReductionHost", "layer_inputs", "run_model", "spectrum_record"]


class ReductionHost(Protocol):
    """What a :class:`Reducer` drives: the training loop that owns model and optimizer.

    :class:`~compressm_tune.training.Trainer` and :class:`~compressm_tune.reduction.Compressor`
    implement it, so both run the one copy of the cut logic below.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer

    @property
    def steps_done(self) -> int:
        """Optimizer steps taken so far (what :meth:`Reducer.plan` is told)."""

    def reducible_layers(self) -> list[nn.Module]:
        """The layers the reducer may cut, in a fixed order (their index names them)."""

    def calibration_inputs(self, n: int) -> Any:
        """Model inputs of (at most ``n``) fixed calibration sequences, or None if there are
        none (then only LTI layers without input weighting can be scored)."""

    def validate(self) -> dict[str, float]:
        """The validation record: ``"accuracy"`` (higher is better) or ``"loss"``."""

    # Optional: ``validate_samples() -> (record, {"loss": (n,), "accuracy": (n,)})``, the
    # record and its per-sample values, for the paired safety net and readiness; and
    # ``warmup_steps`` (int), the steps of LR warm-up before which the adaptive schedule
    # does not cut; and ``defers_verdicts`` (bool, default False): whether :meth:`snapshot`
    # holds the whole training state, so a cut may train before it is judged (``recover``).

    def snapshot(self) -> Any:
        """Whatever :meth:`restore` needs to undo the next cut, model and optimizer."""

    def restore(self, snapshot: Any) -> None:
        """Return model and optimizer to ``snapshot``."""

    def rebuild_optimizer(self) -> None:
        """Point the optimizer at the current parameters (after surgery); the reducer then
        carries the moments that still apply."""

    def widths_changed(self) -> None:
        """Called after cuts that stay: e.g. "best" now means best at the new widths."""


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def run_model(model: nn.Module, x: Any) -> Any:
    """``model(x)`` on the model's device; a tuple or list of ``x`` is passed as positional
    arguments, a dict as keyword arguments (calibration batches of any model's signature)."""
    x = _to_device(x, module_device(model))
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _default_layers(model: nn.Module) -> list[nn.Module]:
    if hasattr(model, "ssm_layers"):
        return model.ssm_layers()
    return [layer for _, layer in find_reducible(model)]


@torch.no_grad()
def layer_inputs(model: nn.Module, x: Any, lru: bool = False,
                 layers: list[nn.Module] | None = None) -> list[torch.Tensor | None]:
    """What each reducible layer receives (its first positional argument) for model inputs
    ``x`` (eval mode, see :func:`run_model`): for the selective layers' data-driven scores,
    and with ``lru`` for the LTI layers' input-weighted HSVs too; None for the layers left
    out. ``layers`` default: ``model.ssm_layers()``, else every reducible layer inside."""
    layers = _default_layers(model) if layers is None else layers
    captured: list[torch.Tensor | None] = [None] * len(layers)
    hooks = [layer.register_forward_pre_hook(
        lambda _module, args, k=k: captured.__setitem__(k, args[0].detach() if args else None))
        for k, layer in enumerate(layers) if lru or is_selective(layer)]
    if hooks:
        was_training = model.training
        model.eval()
        try:
            run_model(model, x)
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
    layers = _default_layers(model)
    inputs = (layer_inputs(model, x, lru=weighting == "input", layers=layers) if x is not None
              else [None] * len(layers))
    for k, layer in enumerate(layers):
        scores = state_scores(layer, inputs[k])
        if is_selective(layer):
            mode_score = scores
        else:
            lam, b, c, _ = layer.system()
            mode_score = (b.abs().norm(dim=1) * c.abs().norm(dim=0) / (1 - lam.abs() ** 2))
        records.append({"layer": k, "hsv": [float(g) for g in np.sort(scores)[::-1]],
                        "mode_score": [float(v) for v in mode_score]})
    return records
