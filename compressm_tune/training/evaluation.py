"""What a run is judged by (loss, accuracy, the validation score) and what it costs in memory.

The loss and metric definitions live here once: the trainer optimizes :func:`_loss`, reports
:func:`evaluate`, and the reducer's safety net compares :func:`_sample_loss` before and after a
cut; the memory estimate refuses, before anything is allocated, a model the device cannot hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from compressm_tune._device import autocast, module_device
from compressm_tune.errors import ConfigError
from compressm_tune.models import SSMConfig, SSMModel

__all__ = ["check_training_memory", "distill_loss", "evaluate", "score",
           "training_memory_bytes"]


def evaluate(model: SSMModel, x: torch.Tensor, y: torch.Tensor, task: str,
             batch_size: int = 500, precision: str = "fp32",
             bits_name: str | None = None, per_sample: bool = False,
             gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Any:
    """Mean loss (cross-entropy or MSE) and, for classification, accuracy on ``(x, y)``.

    Both are means over ``y``'s elements: per sequence for labels ``(n,)``, per answer token
    for labels ``(n, M)`` (scored at the model's last ``M`` output steps, see ``_loss``), per
    value for regression targets. Runs on the model's device, ``batch_size`` rows at a time.
    With ``bits_name`` (a dataset's ``info["bits_name"]``, e.g. ``"bits_per_char"``) the
    cross-entropy is also reported in bits under that key: ``loss / ln 2``.

    With ``per_sample`` returns ``(record, samples)``: ``samples["loss"]`` (n,) is each
    sequence's mean loss over its scored elements and, for classification,
    ``samples["accuracy"]`` (n,) the share of its labels predicted right (numpy float64).

    ``gather`` (torch.distributed: each rank evaluates its shard of the rows) maps this
    shard's per-sequence float64 sums ``(n_shard,)`` to the whole split's ``(n,)`` in row
    order, before anything is averaged: record and samples are then the whole split's, the
    same on every rank.
    """
    was_training = model.training
    model.eval()
    device = module_device(model)
    sums, counts, hits = [], [], []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            target = y[i:i + batch_size].to(device)
            with autocast(device, precision):
                out = model(x[i:i + batch_size].to(device))
                loss, count = _sample_loss(out.float(), target, task)  # (b,), (b,)
            sums.append(loss.double().cpu())
            counts.append(count.double().cpu())
            if task == "classification":
                right = _scored(out, target).argmax(-1) == target  # (b,) or (b, M)
                hits.append(right.reshape(len(right), -1).double().sum(1).cpu())
    model.train(was_training)
    collect = gather if gather is not None else _identity
    loss_sum, count = collect(torch.cat(sums)), collect(torch.cat(counts))  # (n,) each
    scored = max(1.0, float(count.sum()))
    record = {"loss": float(loss_sum.sum()) / scored}
    samples = {"loss": (loss_sum / count.clamp_min(1)).numpy()}
    if task == "classification":
        correct = collect(torch.cat(hits))  # (n,)
        record["accuracy"] = float(correct.sum()) / scored
        samples["accuracy"] = (correct / count.clamp_min(1)).numpy()
        if bits_name:
            record[bits_name] = record["loss"] / math.log(2)
    return (record, samples) if per_sample else record


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _sample_loss(out: torch.Tensor, target: torch.Tensor, task: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed loss and the number of scored elements, both (batch,)."""
    if task == "classification":
        logits = _scored(out, target)  # (b, C) or (b, M, C)
        loss = F.cross_entropy(logits.flatten(0, -2), target.flatten(), reduction="none")
        per = loss.reshape(len(target), -1)  # (b, 1) or (b, M)
        return per.sum(1), torch.full((len(target),), per.shape[1], device=per.device)
    valid = ~torch.isnan(target)  # (b, L, d_output)
    err = torch.where(valid, out - target.nan_to_num(), 0.0).pow(2)
    return err.flatten(1).sum(1), valid.flatten(1).sum(1)


def _loss(out: torch.Tensor, target: torch.Tensor, task: str, reduction: str = "mean"):
    """Cross-entropy for classification, MSE for regression.

    Classification pairs labels ``(batch,)`` with pooled logits ``(batch, C)``, and per-token
    labels ``(batch, M)`` with the last ``M`` steps of per-step logits ``(batch, L, C)``.
    Regression targets that are NaN (the padded steps of variable-length sequences) are left
    out of the loss and of the mean's count.
    """
    if task == "classification":
        logits = _scored(out, target)  # (batch, C) or (batch, M, C)
        return F.cross_entropy(logits.flatten(0, -2), target.flatten(), reduction=reduction)
    valid = ~torch.isnan(target)  # (batch, L, d_output)
    err = torch.where(valid, out - target.nan_to_num(), 0.0).pow(2)  # no NaN, even in grads
    total = err.sum()
    return total if reduction == "sum" else total / valid.sum().clamp_min(1)


def distill_loss(out: torch.Tensor, teacher_out: torch.Tensor, target: torch.Tensor,
                 weight: float) -> torch.Tensor:
    """``(1 - weight) * cross-entropy + weight * KL(teacher || student)`` at temperature 1.

    The knowledge-distillation loss of a classification student (e.g. a model just cut to
    fewer states) against a teacher's logits on the same inputs (the uncut model): the KL
    term is the mean over the scored positions (those :func:`_loss` scores against
    ``target``) of ``sum_c p_teacher(c) (log p_teacher(c) - log p_student(c))``. The teacher's
    full distribution carries what one label per position does not, which is why it recovers
    a pruned model faster than the labels alone. ``weight=0`` is :func:`_loss`.
    """
    ce = _loss(out, target, "classification")
    if weight == 0:
        return ce
    log_p = F.log_softmax(_scored(out, target).flatten(0, -2), -1)  # (positions, C)
    log_q = F.log_softmax(_scored(teacher_out, target).flatten(0, -2).detach(), -1)
    kl = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)  # mean over positions
    return (1 - weight) * ce + weight * kl


def _scored(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The logits that classification labels are scored against (see ``_loss``)."""
    if target.ndim == 1:
        return out  # (batch, C)
    if out.ndim != 3:
        raise ConfigError(f"per-token labels {tuple(target.shape)} need per-step outputs "
                          f"(pooling 'none'), got outputs {tuple(out.shape)}")
    return out[:, -target.shape[1]:]  # (batch, M, C)


def score(metrics: dict[str, float]) -> float:
    """Higher is better: accuracy for classification, minus the loss otherwise."""
    return metrics["accuracy"] if "accuracy" in metrics else -metrics["loss"]


def _parameter_count(c: SSMConfig) -> int:
    h = c.d_model
    return sum(4 * n * h + 4 * n for n in c.state_dims) + len(c.state_dims) * (
        2 * h * h + 4 * h) + h * (c.d_input + c.d_output)


def training_memory_bytes(model_config: SSMConfig, batch_size: int, seq_len: int,
                          eval_batch_size: int, teacher: SSMConfig | None = None) -> int:
    """A rough upper estimate of what training ``model_config`` holds at its peak, in bytes.

    Parameters with their gradients and two Adam moments (16 bytes each); per block, the
    scan's float32 ``(B, L, N, 2)`` drive, states and their gradients (about five such
    tensors), and about ten ``(B, L, H)`` activations; evaluation batches hold the forward
    tensors only. A distillation ``teacher`` adds its parameters (4 bytes each, no gradient),
    its forward tensors on the training batch and two ``(B, L, C)`` copies of its logits.
    Rough on purpose: it exists to refuse, before allocating, a width the machine cannot
    hold, rather than let the kernel kill the process."""
    h, n_sum = model_config.d_model, sum(model_config.state_dims)
    per_sample = 5 * 8 * n_sum + 10 * 4 * h * len(model_config.state_dims)  # bytes per step
    train = batch_size * seq_len * per_sample
    if teacher is not None:
        train += 4 * _parameter_count(teacher) + batch_size * seq_len * (
            2 * 8 * max(teacher.state_dims) + 2 * 4 * teacher.d_output)
    evaluation = eval_batch_size * seq_len * 2 * 8 * max(model_config.state_dims)
    return 16 * _parameter_count(model_config) + max(train, evaluation)


def check_training_memory(model_config: SSMConfig, batch_size: int, seq_len: int,
                          eval_batch_size: int, device: torch.device,
                          teacher: SSMConfig | None = None) -> None:
    """Refuse in one line, naming the numbers, what :func:`training_memory_bytes` says the
    device cannot hold (90% of its available memory)."""
    need = training_memory_bytes(model_config, batch_size, seq_len, eval_batch_size, teacher)
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        available = psutil.virtual_memory().available
    if need > 0.9 * available:
        raise ConfigError(
            f"training {len(model_config.state_dims)} block(s) of up to "
            f"{max(model_config.state_dims)} states (H={model_config.d_model}, batch "
            f"{batch_size}, length {seq_len}"
            f"{', with its distillation teacher' if teacher is not None else ''}) needs "
            f"about {need / 2**30:.1f} GiB; "
            f"{available / 2**30:.1f} GiB is available on {device.type}: use smaller state "
            "widths, --hidden or --batch-size")
