"""What, how and when to cut: Hankel-singular-value balanced truncation of diagonal SSM layers,
data-driven state selection for selective layers, rank policies, the reduction schedules, the
in-training :class:`Reducer`, the :class:`Compressor` for any PyTorch loop, and
:func:`compress_pretrained` for a model that has finished training.

Numpy arrays or torch tensors in (``lam`` (N,), ``B`` (N, H) including gamma, ``C`` (H, N),
complex); results come back in the same kind, complex128. See ``DESIGN.md``, "The method,
precisely".
"""

from compressm_tune.reduction._adaptive import AdaptiveConfig, paired_verdict
from compressm_tune.reduction._compressor import Compressor
from compressm_tune.reduction._gramians import gramians, hankel_singular_values
from compressm_tune.reduction._host import (
    ReductionHost,
    layer_inputs,
    run_model,
    spectrum_record,
)
from compressm_tune.reduction._policies import (
    WEIGHTINGS,
    ReductionPolicy,
    plan_rank,
    rank_for_tolerance,
    round_up_to,
)
from compressm_tune.reduction._pretrained import (
    SCORES,
    compress_pretrained,
    layer_scores,
    magnitude_importance,
    plan_widths,
    widths_for_budget,
)
from compressm_tune.reduction._reduce_config import CALIBRATION, MOMENT_POLICIES, ReduceConfig
from compressm_tune.reduction._reducer import Reducer
from compressm_tune.reduction._schedules import SCHEDULES, SettleConfig, SettleTracker, target_rank
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
    SELECTS,
    balanced_truncation,
    from_lru_params,
    to_lru_params,
)

__all__ = [
    "AdaptiveConfig",
    "CALIBRATION",
    "Compressor",
    "MOMENT_POLICIES",
    "ReduceConfig",
    "ReductionHost",
    "ReductionPolicy",
    "Reducer",
    "SCHEDULES",
    "SCORES",
    "SELECTS",
    "SettleConfig",
    "SettleTracker",
    "WEIGHTINGS",
    "balanced_truncation",
    "compress_pretrained",
    "find_reducible",
    "from_lru_params",
    "gramians",
    "hankel_singular_values",
    "input_covariance",
    "is_reducible",
    "is_selective",
    "layer_hsv",
    "layer_inputs",
    "layer_scores",
    "layer_width",
    "magnitude_importance",
    "paired_verdict",
    "plan_rank",
    "plan_widths",
    "rank_for_tolerance",
    "reduce_layer",
    "round_up_to",
    "run_model",
    "select_states",
    "state_importance",
    "spectrum_record",
    "state_scores",
    "target_rank",
    "to_lru_params",
    "truncate_layer",
    "widths_for_budget",
]
