"""Reduce a live SSM layer in place: the model-surgery step of CompreSSM, for either layer kind.

* LRU (LTI): Hankel singular values and balanced truncation; the surviving states are a new,
  balanced-then-re-diagonalized basis. Given the layer's calibration inputs, both are
  input-weighted by their second moment (:func:`input_covariance`).
* Selective and Mamba (time-varying): data-driven state importance of the S6 core from
  calibration inputs (see :mod:`._selective`); the surviving states are a subset of the old
  ones, basis unchanged.

:func:`state_scores` and :func:`reduce_layer` hide the difference from the trainer.
"""

from __future__ import annotations

import numpy as np
import torch

from compressm_tune.errors import ReductionError
from compressm_tune.models import SELECTIVE_LAYERS, LRULayer, MambaLayer, SelectiveLayer
from compressm_tune.reduction._gramians import hankel_singular_values
from compressm_tune.reduction._selective import select_states, state_importance
from compressm_tune.reduction._truncation import balanced_truncation, to_lru_params

__all__ = ["input_covariance", "layer_hsv", "reduce_layer", "state_scores", "truncate_layer"]


def input_covariance(inputs: torch.Tensor) -> np.ndarray:
    """Second moment ``E[u u^T]`` of a layer's inputs ``(batch, L, H)`` over batch and time,
    (H, H) float64: the weight of input-weighted HSVs. Uncentered, because a constant input
    drives the states as much as a varying one."""
    u = inputs.detach().reshape(-1, inputs.shape[-1]).cpu().double()  # (B * L, H)
    return (u.T @ u / max(len(u), 1)).numpy()  # (H, H)


def layer_hsv(layer: LRULayer, inputs: torch.Tensor | None = None) -> np.ndarray:
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
    lam, b, c, _ = layer.system()
    cov = None if inputs is None else input_covariance(inputs)
    return np.asarray(hankel_singular_values(lam.numpy(), b.numpy(), c.numpy(), cov))


def truncate_layer(
    layer: LRULayer, rank: int, select: str = "largest", seed: int | None = None,
    inputs: torch.Tensor | None = None,
) -> None:
    """Reduce ``layer`` in place to ``rank`` states by balanced truncation.

    The reduced system is re-diagonalized and written back into the LRU parameters
    (``nu_log, theta_log, gamma_log, B_re, B_im, C_re, C_im``; ``D`` unchanged). The layer's
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
    if rank >= layer.state_dim:
        return
    lam, b, c, _ = layer.system()
    cov = None if inputs is None else input_covariance(inputs)
    lam_r, b_r, c_r = balanced_truncation(
        lam.numpy(), b.numpy(), c.numpy(), rank, select=select, seed=seed, input_cov=cov
    )
    params = to_lru_params(lam_r, b_r, c_r)
    layer.load_system_parameters(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}
    )


def state_scores(layer: LRULayer | SelectiveLayer | MambaLayer,
                 inputs: torch.Tensor | None = None) -> np.ndarray:
    """What the rank policy reads: one non-negative score per state, (N,) float64.

    LRU: the Hankel singular values (descending; they belong to balanced states, not to the
    layer's current ones), input-weighted when calibration ``inputs (batch, L, H)`` are given.
    Selective and Mamba: the data importance of each current state index, in state order, from
    ``inputs`` (required).
    """
    if isinstance(layer, SELECTIVE_LAYERS):
        if inputs is None:
            raise ReductionError("a selective layer's state scores need calibration inputs")
        return state_importance(layer, inputs)
    return layer_hsv(layer, inputs)


def reduce_layer(
    layer: LRULayer | SelectiveLayer | MambaLayer, rank: int, select: str = "largest",
    seed: int | None = None, scores: np.ndarray | None = None,
    inputs: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Cut ``layer`` in place to ``rank`` states; ``rank >= N`` leaves it unchanged.

    Returns the kept state indices when the survivors keep their basis (selective, Mamba; their
    optimizer moments stay valid), None when the basis changed (LRU balanced truncation).
    ``scores`` are the selective layer's :func:`state_scores` (ignored for an LRU);
    ``inputs`` make an LRU's balancing input-weighted (ignored for a selective layer).
    """
    if isinstance(layer, SELECTIVE_LAYERS):
        if rank >= layer.state_dim:
            return None
        if scores is None:
            raise ReductionError("cutting a selective layer needs its state scores")
        keep = select_states(layer, scores, rank, select, seed)
        layer.keep_states(keep)
        return keep
    truncate_layer(layer, rank, select=select, seed=seed, inputs=inputs)
    return None
