"""Reduce a live SSM layer in place: the model-surgery step of CompreSSM, for either layer kind.

* LRU (LTI): Hankel singular values and balanced truncation; the surviving states are a new,
  balanced-then-re-diagonalized basis. Given the layer's calibration inputs, both are
  input-weighted by their second moment (:func:`input_covariance`).
* Selective and Mamba (time-varying): data-driven state importance of the S6 core from
  calibration inputs (see :mod:`._selective`); the surviving states are a subset of the old
  ones, basis unchanged.
* Any other module that implements the **LTI protocol**: ``system()`` returns the diagonal
  discrete-time system ``(lam (N,), B (N, H_in), C (H_out, N), D)`` (torch tensors or numpy
  arrays; complex or real) with ``x_k = lam * x_{k-1} + B u_k``, ``y_k = Re(C x_k) + D u_k``,
  and ``load_system_parameters(lam, B, C, D)`` takes a reduced one (complex128 torch tensors on
  the CPU; ``D`` as ``system()`` gave it) and replaces the state-sized parameters, as new
  ``nn.Parameter`` objects or by assignment. It is reduced like an LRU, by balanced truncation.

Which kind a module is is read from what it offers (``keep_states`` + ``state_axes``: index
selection; ``system`` + ``load_system_parameters``: balanced truncation), not from its class,
so layers written elsewhere plug in. :func:`state_scores` and :func:`reduce_layer` hide the
difference from the reducer; :func:`find_reducible` finds the layers inside any module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from compressm_tune.errors import ReductionError
from compressm_tune.models import LRULayer
from compressm_tune.reduction._gramians import hankel_singular_values
from compressm_tune.reduction._selective import select_states, state_importance
from compressm_tune.reduction._truncation import balanced_truncation, to_lru_params

__all__ = ["find_reducible", "input_covariance", "is_reducible", "is_selective", "layer_hsv",
           "layer_width", "reduce_layer", "state_scores", "truncate_layer"]


def is_selective(module: nn.Module) -> bool:
    """Whether ``module`` is cut by keeping state indices (``keep_states`` and ``state_axes``,
    as :class:`~compressm_tune.models.SelectiveLayer`): scored on data, moments carried exactly."""
    return callable(getattr(module, "keep_states", None)) and hasattr(module, "state_axes")


def is_reducible(module: nn.Module) -> bool:
    """Whether ``module`` is a layer the reduction can cut: a selective layer
    (:func:`is_selective`) or one implementing the LTI protocol (module docstring)."""
    return is_selective(module) or (callable(getattr(module, "system", None)) and callable(
        getattr(module, "load_system_parameters", None)))


def find_reducible(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The reducible layers inside ``model`` as ``(qualified name, layer)``, in module order;
    a reducible layer's own submodules are not searched (the layer is cut as a whole)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(outer + ".") for outer, _ in found if outer):
            continue
        if is_reducible(module):
            found.append((name, module))
    return found


def layer_width(layer: nn.Module) -> int:
    """The current state width N of a reducible layer (``state_dim``, else ``len(lam)``)."""
    width = getattr(layer, "state_dim", None)
    return int(width) if width is not None else len(layer.system()[0])


def _complex_system(layer: nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
    """``layer.system()`` as complex128 numpy ``(lam, B, C)`` plus ``D`` as it came."""
    lam, b, c, d = layer.system()
    arrays = [np.asarray(t.detach().cpu() if isinstance(t, torch.Tensor) else t,
                         dtype=np.complex128) for t in (lam, b, c)]
    return arrays[0], arrays[1], arrays[2], d


def input_covariance(inputs: torch.Tensor) -> np.ndarray:
    """Second moment ``E[u u^T]`` of a layer's inputs ``(batch, L, H)`` over batch and time,
    (H, H) float64: the weight of input-weighted HSVs. Uncentered, because a constant input
    drives the states as much as a varying one."""
    u = inputs.detach().reshape(-1, inputs.shape[-1]).cpu().double()  # (B * L, H)
    return (u.T @ u / max(len(u), 1)).numpy()  # (H, H)


def layer_hsv(layer: nn.Module, inputs: torch.Tensor | None = None) -> np.ndarray:
    """Hankel singular values of ``layer`` as an (N,) float64 array, descending.

    With the layer's calibration ``inputs (batch, L, H)`` they are input-weighted
    (:func:`input_covariance`): states reached only through input directions the data does
    not excite score low.

    Examples
    --------
    >>> hsv = layer_hsv(LRULayer(d_model=4, state_dim=8))
    >>> hsv.shape, bool(np.all(np.diff(hsv) <= 0))
    ((8,), True)
    """
    lam, b, c, _ = _complex_system(layer)
    cov = None if inputs is None else input_covariance(inputs)
    return np.asarray(hankel_singular_values(lam, b, c, cov))


def truncate_layer(
    layer: nn.Module, rank: int, select: str = "largest", seed: int | None = None,
    inputs: torch.Tensor | None = None,
) -> None:
    """Reduce ``layer`` in place to ``rank`` states by balanced truncation.

    The reduced system is re-diagonalized and written back into the LRU parameters
    (``nu_log, theta_log, gamma_log, B_re, B_im, C_re, C_im``; ``D`` unchanged), or, for a
    layer of the LTI protocol, handed to its ``load_system_parameters(lam, B, C, D)``. The layer's
    parameters are new objects afterwards, so optimizers over it must be rebuilt.
    ``rank >= N`` leaves the layer unchanged. ``inputs`` (calibration, ``(batch, L, H)``)
    make the balancing input-weighted, as in :func:`layer_hsv`.

    Examples
    --------
    >>> layer = LRULayer(d_model=4, state_dim=8)
    >>> truncate_layer(layer, 3)
    >>> layer.state_dim
    3
    """
    lam, b, c, d = _complex_system(layer)
    if rank >= len(lam):
        return
    cov = None if inputs is None else input_covariance(inputs)
    lam_r, b_r, c_r = balanced_truncation(lam, b, c, rank, select=select, seed=seed,
                                          input_cov=cov)
    if not isinstance(layer, LRULayer):  # the LTI protocol
        layer.load_system_parameters(*(torch.from_numpy(np.ascontiguousarray(v))
                                       for v in (lam_r, b_r, c_r)), d)
        return
    params = to_lru_params(lam_r, b_r, c_r)
    layer.load_system_parameters(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}
    )


def state_scores(layer: nn.Module,
                 inputs: torch.Tensor | None = None) -> np.ndarray:
    """What the rank policy reads: one non-negative score per state, (N,) float64.

    LRU: the Hankel singular values (descending; they belong to balanced states, not to the
    layer's current ones), input-weighted when calibration ``inputs (batch, L, H)`` are given.
    Selective: the data importance of each current state index, in state order, from
    ``inputs`` (required). A layer of the LTI protocol: like the LRU.
    """
    if is_selective(layer):
        if inputs is None:
            raise ReductionError("a selective layer's state scores need calibration inputs")
        return state_importance(layer, inputs)
    return layer_hsv(layer, inputs)


def reduce_layer(
    layer: nn.Module, rank: int, select: str = "largest",
    seed: int | None = None, scores: np.ndarray | None = None,
    inputs: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Cut ``layer`` in place to ``rank`` states; ``rank >= N`` leaves it unchanged.

    Returns the kept state indices when the survivors keep their basis (selective, Mamba; their
    optimizer moments stay valid), None when the basis changed (LRU balanced truncation).
    ``scores`` are the selective layer's :func:`state_scores` (ignored for an LRU);
    ``inputs`` make an LRU's balancing input-weighted (ignored for a selective layer).
    """
    if is_selective(layer):
        if rank >= layer.state_dim:
            return None
        if scores is None:
            raise ReductionError("cutting a selective layer needs its state scores")
        keep = select_states(layer, scores, rank, select, seed)
        layer.keep_states(keep)
        return keep
    truncate_layer(layer, rank, select=select, seed=seed, inputs=inputs)
    return None


def carry_moments(moments: str, optimizer: torch.optim.Optimizer, old_state: dict,
                   layer: nn.Module, before: dict[str, torch.Tensor],
                   shapes: dict[str, torch.Size], rank: int,
                   keep: torch.Tensor | None) -> None:
    """Carry every untouched parameter's moments; for the cut ones, the kept states'
    moments (``keep``, exact) or, for an LRU with ``moments="slice"``, the first rows.

    A parameter of the cut layer counts as cut when it is a new object or changed shape
    (``before``/``shapes``: the layer's parameters before the cut); the rest of it (an
    LRU's ``D``) keeps its moments like every other parameter of the model."""
    cut = {id(p) for name, p in layer.named_parameters()
           if before.get(name) is not p or shapes.get(name) != p.shape}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in cut and p in old_state:
                optimizer.state[p] = old_state[p]
            elif id(p) in cut:
                optimizer.state.pop(p, None)
    axes = getattr(layer, "state_axes", None)
    if axes is None or (keep is None and moments != "slice"):
        return
    index = keep if keep is not None else torch.arange(rank)
    for name, axis in axes.items():
        old = old_state.get(before[name])
        if not old:
            continue
        optimizer.state[layer.get_parameter(name)] = {
            key: value.index_select(axis, index.to(value.device)).clone()
            if value.dim() > axis else value.clone()
            for key, value in old.items()
        }
