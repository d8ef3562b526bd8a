"""Hankel-singular-value balanced truncation of diagonal SSM layers, data-driven state
selection for selective layers, and rank policies.

Numpy arrays or torch tensors in (``lam`` (N,), ``B`` (N, H) including gamma, ``C`` (H, N),
complex); results come back in the same kind, complex128. See ``DESIGN.md``, "The method,
precisely".
"""

from compressm_tune.reduction._gramians import gramians, hankel_singular_values
from compressm_tune.reduction._policies import (
    ReductionPolicy,
    plan_rank,
    rank_for_tolerance,
    round_up_to,
)
from compressm_tune.reduction._selective import select_states, state_importance
from compressm_tune.reduction._surgery import (
    find_reducible,
    input_covariance,
    is_reducible,
    is_selective,
    layer_hsv,
    layer_width,
    reduce_layer,
    state_scores,
    truncate_layer,
)
from compressm_tune.reduction._truncation import (
    balanced_truncation,
    from_lru_params,
    to_lru_params,
)

__all__ = [
    "ReductionPolicy",
    "balanced_truncation",
    "find_reducible",
    "from_lru_params",
    "gramians",
    "hankel_singular_values",
    "input_covariance",
    "is_reducible",
    "is_selective",
    "layer_hsv",
    "layer_width",
    "plan_rank",
    "rank_for_tolerance",
    "reduce_layer",
    "round_up_to",
    "select_states",
    "state_importance",
    "state_scores",
    "to_lru_params",
    "truncate_layer",
]
