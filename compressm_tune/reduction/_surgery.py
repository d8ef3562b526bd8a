"""Apply balanced truncation to a live LRU layer: the model-surgery step of CompreSSM."""

from __future__ import annotations

import numpy as np
import torch

from compressm_tune.models import LRULayer
from compressm_tune.reduction._gramians import hankel_singular_values
from compressm_tune.reduction._truncation import balanced_truncation, to_lru_params

__all__ = ["layer_hsv", "truncate_layer"]


def layer_hsv(layer: LRULayer) -> np.ndarray:
    """Hankel singular values of ``layer`` as an (N,) float64 array, descending.

    Examples
    --------
    >>> hsv = layer_hsv(LRULayer(d_model=4, state_dim=8))
    >>> hsv.shape, bool(np.all(np.diff(hsv) <= 0))
    ((8,), True)
    """
    lam, b, c, _ = layer.system()
    return np.asarray(hankel_singular_values(lam.numpy(), b.numpy(), c.numpy()))


def truncate_layer(
    layer: LRULayer, rank: int, select: str = "largest", seed: int | None = None
) -> None:
    """Reduce ``layer`` in place to ``rank`` states by balanced truncation.

    The reduced system is re-diagonalized and written back into the LRU parameters
    (``nu_log, theta_log, gamma_log, B_re, B_im, C_re, C_im``; ``D`` unchanged). The layer's
    parameters are new objects afterwards, so optimizers over it must be rebuilt.
    ``rank >= N`` leaves the layer unchanged.

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
    lam_r, b_r, c_r = balanced_truncation(
        lam.numpy(), b.numpy(), c.numpy(), rank, select=select, seed=seed
    )
    params = to_lru_params(lam_r, b_r, c_r)
    layer.load_system_parameters(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}
    )
