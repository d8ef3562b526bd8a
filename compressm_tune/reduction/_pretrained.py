"""Post-training reduction of a trained model from calibration data, and a data-free baseline.

:func:`compress_pretrained` cuts every reducible layer of a model that has finished training
(e.g. one imported with :func:`~compressm_tune.models.from_hf_folder`) to a per-layer width:
given (``widths``), the same for every layer (``keep``), or chosen by the ``tau`` rule on each
layer's scores. Layers are cut in order, and each layer is scored on what it receives from the
layers before it *as already cut*, so a later layer's scores account for the earlier cuts.

Scores (``score=``):

* ``"data"`` (the method): the input-weighted state importance on the calibration inputs
  (:func:`state_importance`; for an LTI layer, input-weighted Hankel singular values and
  balanced truncation);
* ``"magnitude"``: a data-free per-state magnitude in the style of LAST (layer-adaptive state
  pruning, which ranks the states of a diagonal SSM by the H-infinity norm of each state's own
  subsystem): :func:`magnitude_importance`. A baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compressm_tune.errors import ReductionError
from compressm_tune.reduction._host import _default_layers, layer_inputs
from compressm_tune.reduction._policies import rank_for_tolerance
from compressm_tune.reduction._surgery import (
    is_selective,
    layer_width,
    reduce_layer,
    state_scores,
)
from compressm_tune.reduction._truncation import SELECTS

__all__ = ["SCORES", "compress_pretrained", "layer_scores", "magnitude_importance", "plan_widths",
           "widths_for_budget"]

SCORES = ("data", "magnitude")


@torch.no_grad()
def magnitude_importance(layer: nn.Module) -> np.ndarray:
    """A data-free score per state of a selective layer, (N,) float64, in state order.

    Mamba / S6: per channel ``h`` and state ``n`` the H-infinity norm of the scalar subsystem
    ``x_t = a x_{t-1} + delta b u_t, y_t = c x_t`` at the layer's resting step size
    ``delta_h = softplus(dt_bias_h)``: ``delta_h |b_n| |c_n| / (1 - exp(-delta_h
    exp(A_log[h, n])))``, with ``|b_n|``, ``|c_n|`` the norms of the rows of the input-dependent
    ``B``/``C`` projections (the input's scale is unknown without data), summed over channels:
    LAST's per-state H-infinity score with the data replaced by weight norms. Mamba-2, whose
    states share each head's decay: that factor is the same for every state, so the score is
    the layer's ``state_magnitude()``, ``|W_B[n]| |W_C[n]|``.
    """
    if hasattr(layer, "state_magnitude"):
        return layer.state_magnitude().double().cpu().numpy()
    core = getattr(layer, "s6", layer)
    if not is_selective(layer) or not hasattr(core, "B_proj"):
        raise ReductionError(f"magnitude scores are defined for selective layers, not "
                             f"{type(layer).__name__}")
    delta = F.softplus(core.dt_bias.double())[:, None]  # (E, 1)
    a = torch.exp(-delta * core.A_log.double().exp())  # (E, N)
    gain = core.B_proj.double().norm(dim=1) * core.C_proj.double().norm(dim=1)  # (N,)
    return (delta * gain[None, :] / (1 - a).clamp_min(1e-12)).sum(0).cpu().numpy()


def plan_widths(scores: Sequence[np.ndarray], *, keep: int | None = None,
                tau: float | None = None, widths: Sequence[int] | None = None) -> list[int]:
    """The width of every layer from its scores and exactly one of ``keep`` (every layer keeps
    ``min(keep, N)``), ``tau`` (per layer, the smallest width holding ``1 - tau`` of the score
    sum, :func:`rank_for_tolerance`) or ``widths`` (one per layer, each ``<= N``).

    Examples
    --------
    >>> plan_widths([np.array([4.0, 3.0, 2.0, 1.0]), np.array([9.0, 1.0])], tau=0.15)
    [3, 1]
    """
    given = [v is not None for v in (keep, tau, widths)]
    if sum(given) != 1:
        raise ReductionError("give exactly one of keep=, tau= or widths=")
    sizes = [len(s) for s in scores]
    if keep is not None:
        if isinstance(keep, bool) or int(keep) != keep or keep < 1:
            raise ReductionError(f"keep must be an integer >= 1, got {keep!r}")
        return [min(int(keep), n) for n in sizes]
    if tau is not None:
        return [rank_for_tolerance(s, tau) for s in scores]
    widths = list(widths)
    if len(widths) != len(sizes):
        raise ReductionError(f"widths must list one width per layer ({len(sizes)}), got "
                             f"{len(widths)}")
    for w, n in zip(widths, sizes, strict=True):
        if isinstance(w, bool) or int(w) != w or not 1 <= w <= n:
            raise ReductionError(f"each width must be an integer in [1, N]: got {w} for a "
                                 f"layer of {n} states")
    return [int(w) for w in widths]


def widths_for_budget(scores: Sequence[np.ndarray], cost: Callable[[list[int]], float],
                      budget: float, steps: int = 40) -> tuple[list[int], float]:
    """The widths of the smallest ``tau`` whose per-layer :func:`rank_for_tolerance` widths
    cost at most ``budget`` (``cost(widths)``, e.g. a latency model's prediction in ms), and
    that ``tau``: one rule for every layer, so the cut falls where the scores are smallest.

    Raises
    ------
    ReductionError
        Even one state per layer costs more than ``budget``.
    """
    full = [len(s) for s in scores]
    if cost(full) <= budget:
        return full, 0.0
    floor = [1] * len(full)
    if cost(floor) > budget:
        raise ReductionError(f"even one state per layer costs {cost(floor):.4g}, over the "
                             f"budget {budget:.4g}")
    lo, hi, best = 0.0, 1.0, floor
    for _ in range(steps):  # widths shrink as tau grows: bisect for the smallest tau that fits
        mid = (lo + hi) / 2
        widths = [rank_for_tolerance(s, mid) for s in scores]
        if cost(widths) <= budget:
            hi, best = mid, widths
        else:
            lo = mid
    return best, hi


def _scores(layer: nn.Module, inputs: torch.Tensor | None, score: str) -> np.ndarray:
    if score == "magnitude":
        return magnitude_importance(layer)
    return state_scores(layer, inputs)


def layer_scores(model: nn.Module, calibration: Any, score: str = "data") -> list[np.ndarray]:
    """Every reducible layer's state scores on ``calibration`` (model inputs), one pass."""
    layers = _default_layers(model)
    inputs = layer_inputs(model, calibration, lru=True, layers=layers) if score == "data" \
        else [None] * len(layers)
    return [_scores(layer, x, score) for layer, x in zip(layers, inputs, strict=True)]


@torch.no_grad()
def compress_pretrained(
    model: nn.Module, calibration: Any, *, keep: int | None = None, tau: float | None = None,
    widths: Sequence[int] | None = None, score: str = "data", select: str = "largest",
    seed: int | None = None,
) -> dict[str, Any]:
    """Cut every reducible layer of a trained ``model`` in place, scored on ``calibration``.

    Parameters
    ----------
    model : nn.Module
        An :class:`~compressm_tune.models.SSMModel` or any module with reducible layers.
    calibration : tensor, tuple or dict
        Model inputs the scores are computed on (e.g. token ids ``(batch, L)``), passed as
        :func:`run_model` does; a few dozen sequences of the data the model will see.
    keep, tau, widths
        Exactly one: every layer keeps ``keep`` states; or per layer the ``tau`` rule on its
        scores; or ``widths``, one per layer.
    score : {"data", "magnitude"}
        ``"data"``: input-weighted importance (the method); ``"magnitude"``: the data-free
        :func:`magnitude_importance` baseline.
    select : {"largest", "smallest", "random", "magnitude"}
        Which states a layer keeps at its width (``"largest"`` scores: the method); ``seed``
        seeds ``"random"``.

    Returns
    -------
    dict
        ``state_dims_before``, ``state_dims_after`` and ``kept`` (per layer, the kept state
        indices of a selective layer, None for a balanced-truncated LTI layer).

    Examples
    --------
    >>> from compressm_tune.models import SSMConfig, SSMModel
    >>> model = SSMModel(SSMConfig(arch="mamba", d_output=20, d_model=8, state_dims=[16, 16],
    ...                            pooling="none", vocab_size=20))
    >>> ids = torch.randint(20, (4, 12))  # calibration token ids
    >>> compress_pretrained(model, ids, widths=[4, 6])["state_dims_after"]
    [4, 6]
    """
    if score not in SCORES:
        raise ReductionError(f"score must be one of {SCORES}, got {score!r}")
    if select not in SELECTS:
        raise ReductionError(f"select must be one of {SELECTS}, got {select!r}")
    layers = _default_layers(model)
    if not layers:
        raise ReductionError("the model has no reducible layer")
    before = [layer_width(layer) for layer in layers]
    if widths is not None:  # checked against the widths before any scoring
        targets = plan_widths([np.zeros(n) for n in before], widths=widths)
    elif keep is not None:
        targets = plan_widths([np.zeros(n) for n in before], keep=keep)
    else:
        if tau is None or not 0.0 <= tau < 1.0:
            raise ReductionError(f"give exactly one of keep=, tau= (0 <= tau < 1) or widths=; "
                                 f"got tau={tau!r}")
        targets = None
    kept: list[list[int] | None] = []
    for k, layer in enumerate(layers):
        inputs = None
        if score == "data":  # what this layer receives with the layers before it cut
            inputs = layer_inputs(model, calibration, lru=True, layers=[layer])[0]
        scores = _scores(layer, inputs, score)
        width = targets[k] if targets is not None else rank_for_tolerance(scores, tau)
        keep_idx = reduce_layer(layer, width, select=select,
                                seed=None if seed is None else seed + k, scores=scores,
                                inputs=inputs)
        kept.append(None if keep_idx is None else keep_idx.tolist())
        if keep_idx is None and is_selective(layer) and width >= before[k]:
            kept[-1] = list(range(before[k]))
    return {"state_dims_before": before,
            "state_dims_after": [layer_width(layer) for layer in layers], "kept": kept}
