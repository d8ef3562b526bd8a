"""Optimizer and learning-rate schedule, as in the paper's code.

AdamW with two groups: the recurrence's parameters (``SSM_PARAMETERS``) get
``lr * ssm_lr_factor`` and no weight decay; everything else gets ``lr`` and ``weight_decay``.
The schedule is a linear warm-up over the first ``warmup_frac`` of the steps followed by a
cosine decay to ``min_lr_frac * lr``. After a reduction the optimizer is rebuilt for the new
shapes; the schedule is a pure function of the step, so it simply continues.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compressm_tune.models import SSM_PARAMETERS

__all__ = ["build_optimizer", "lr_factor", "set_lr"]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, ssm_lr_factor: float,
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW over ``model`` with the SSM group first and the rest second; ``fused`` (CUDA):
    one kernel for the whole update instead of a few per parameter."""
    ssm, rest = [], []
    for name, param in model.named_parameters():
        (ssm if name.rsplit(".", 1)[-1] in SSM_PARAMETERS else rest).append(param)
    ssm_lr = lr * ssm_lr_factor
    groups = [
        {"params": ssm, "lr": ssm_lr, "weight_decay": 0.0, "base_lr": ssm_lr},
        {"params": rest, "lr": lr, "weight_decay": weight_decay, "base_lr": lr},
    ]
    return torch.optim.AdamW(groups, fused=fused or None)


def lr_factor(step: int, total_steps: int, warmup_frac: float, min_lr_frac: float) -> float:
    """Multiplier of the base LR at ``step`` (0-based): linear warm-up then cosine decay.

    Examples
    --------
    >>> [round(lr_factor(s, 10, 0.2, 0.0), 3) for s in (0, 1, 2, 6, 9)]
    [0.5, 1.0, 1.0, 0.5, 0.038]
    """
    warmup = max(1, int(round(warmup_frac * total_steps)))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's LR to ``base_lr * factor``."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
