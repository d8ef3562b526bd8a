"""Which states of a selective (time-varying) SSM layer matter: empirical Gramians from data.

:class:`SelectiveLayer`, :class:`MambaLayer` and :class:`Mamba2Layer` are scored here: each
names what its scan receives for the layer's inputs (``scan_inputs``: ``delta, A, B_t, C_t``
and the scanned ``u``; for Mamba, the convolved, activated inner channels; for Mamba-2, its
heads with the groups folded into the batch), and the score is the scan's. The Mambas' gates,
norms and ``out_proj`` after the scan are left out of the observability side, as the selective
layer's GELU/GLU are.

A selective layer has no fixed ``(A, B, C)``: ``delta_t``, ``B_t`` and ``C_t`` depend on the
input, so the Hankel singular values of an LTI system do not exist. What does exist, for the
inputs the model actually sees, are the two halves of the Hankel picture per state index ``n``:

* **reachability** -- the energy the data drives into state ``n``: ``x_t[h, n]^2``, the
  diagonal of the empirical controllability Gramian at time ``t``;
* **observability** -- the output energy that one unit of state ``n`` at time ``t`` still
  produces from then on, the diagonal of the time-varying observability Gramian,
  ``q_t = C_t[n]^2 + a_{t+1}^2 q_{t+1}`` (exact, because ``A`` is diagonal).

Their product ``x_t^2 q_t`` is the output energy that state ``n``'s content at time ``t`` is
responsible for. The importance of ``n`` is the square root of its mean over the calibration
batch and time, summed over channels (a state index is shared by every channel, so it can only
be kept or cut for all of them). For an LTI diagonal system driven by white noise this is
``sqrt(P_nn Q_nn)``, the Hankel score of mode ``n`` alone, so the same ``tau`` rule reads the
same way on both layer kinds. States that the data never excites, or that never reach the
output, score exactly 0.

Truncation keeps whole state indices (slices ``A_log``, ``W_B``, ``W_C``): mixing states, as
balanced truncation does, would destroy the diagonal structure the parallel scan relies on.
"""

from __future__ import annotations

import numpy as np
import torch

from compressm_tune.errors import ReductionError
from compressm_tune.models import Mamba2Layer, MambaLayer, SelectiveLayer
from compressm_tune.models.selective import _scan, discretize, importance_sums
from compressm_tune.reduction._truncation import SELECTS

__all__ = ["select_states", "state_importance"]

_CALIBRATION_CHUNK = 16  # sequences per pass: bounds the (chunk, L, H, N) temporaries


@torch.no_grad()
def state_importance(layer: SelectiveLayer | MambaLayer | Mamba2Layer,
                     inputs: torch.Tensor) -> np.ndarray:
    """Importance of every state index of ``layer`` on calibration ``inputs (batch, L, H)``
    (the layer's own inputs).

    Returns an (N,) float64 array in state order (not sorted); see the module docstring.

    Examples
    --------
    >>> layer = SelectiveLayer(d_model=4, state_dim=6)
    >>> with torch.no_grad():
    ...     layer.B_proj[2] = 0.0  # state 2 is never driven
    >>> score = state_importance(layer, torch.randn(3, 20, 4))
    >>> score.shape, float(score[2]), bool((score[[0, 1, 3, 4, 5]] > 0).all())
    ((6,), 0.0, True)
    """
    if inputs.dim() != 3 or inputs.shape[-1] != layer.d_model or inputs.shape[0] < 1:
        raise ReductionError(
            f"calibration inputs must be (batch >= 1, L, {layer.d_model}), "
            f"got {tuple(inputs.shape)}")
    tokens = inputs.shape[0] * inputs.shape[1]
    inputs = inputs.to(device=layer.A_log.device, dtype=layer.A_log.dtype)
    delta, A, b_t, c_t, u = layer.scan_inputs(inputs)  # (batch', L, E) but A (E, N)
    total = importance_sums(delta, A, b_t, c_t, u)  # the C kernel: no 4-D tensors
    if total is None:  # no kernel here (GPU, float64): the same sums from 4-D torch tensors
        chunks = zip(*(t.split(_CALIBRATION_CHUNK) for t in (delta, b_t, c_t, u)), strict=True)
        total = sum(_importance_sums_torch(d, A, b, c, x) for d, b, c, x in chunks)
    score = (total.cpu() / tokens).sqrt().numpy()  # the mean over calibration tokens
    if not np.isfinite(score).all():
        raise ReductionError("state importance is not finite: the layer's weights diverged")
    return score


def _importance_sums_torch(delta: torch.Tensor, A: torch.Tensor, b_t: torch.Tensor,
                           c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``sum_{b,t,h} x_t^2 q_t`` per state, (N,) float64, from ``(b, L, H, N)`` tensors."""
    a, b = discretize(delta, A, b_t, u)  # (b, L, H, N) x2
    x = _scan(a, b)  # (b, L, H, N) states driven by the data
    a_next = torch.cat((a[:, 1:], torch.zeros_like(a[:, :1])), 1)  # a_{t+1}, 0 past the end
    q = _scan(a_next.square(), c.square()[:, :, None, :].expand_as(a).contiguous(),
              reverse=True)  # (b, L, H, N) future output energy per unit state
    return (x.square() * q).double().sum((0, 1, 2))


def select_states(
    layer: SelectiveLayer | MambaLayer | Mamba2Layer, importance: np.ndarray, rank: int,
    select: str = "largest", seed: int | None = None,
) -> torch.Tensor:
    """The ``rank`` state indices to keep (ascending), chosen by ``select``.

    ``largest`` keeps the most important states (the method); ``smallest`` the least (a
    sanity ablation); ``random`` a seeded random subset; ``magnitude`` the slowest-decaying
    states, smallest mean ``|A|`` over channels (the naive "long memory matters" heuristic),
    or, for a layer whose states share their decay (Mamba-2: one ``A`` per head), the largest
    ``layer.state_magnitude()`` (weight-magnitude pruning).

    Examples
    --------
    >>> layer = SelectiveLayer(d_model=4, state_dim=5)
    >>> select_states(layer, np.array([0.1, 3.0, 0.0, 2.0, 1.0]), 2).tolist()
    [1, 3]
    """
    n = layer.state_dim
    if not 1 <= rank <= n:
        raise ReductionError(f"1 <= rank <= N must hold, got {rank=} N={n}")
    if select not in SELECTS:
        raise ReductionError(f"select must be one of {SELECTS}, got {select!r}")
    importance = np.asarray(importance, dtype=np.float64)
    if importance.shape != (n,):
        raise ReductionError(f"importance must have shape ({n},), got {importance.shape}")
    if select == "largest":
        order = np.argsort(-importance, kind="stable")
    elif select == "smallest":
        order = np.argsort(importance, kind="stable")
    elif select == "random":
        order = np.random.default_rng(seed).permutation(n)
    elif hasattr(layer, "state_magnitude"):
        order = np.argsort(-layer.state_magnitude().cpu().numpy(), kind="stable")
    else:
        decay = layer.A_log.detach().exp().mean(0).cpu().numpy()  # (N,) mean |A| per state
        order = np.argsort(decay, kind="stable")
    return torch.from_numpy(np.sort(order[:rank]))
