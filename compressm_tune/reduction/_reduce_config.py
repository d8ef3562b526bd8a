"""What a reduction run is told: :class:`ReduceConfig` (when, how far and how safely to cut)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from compressm_tune.errors import ConfigError
from compressm_tune.reduction._adaptive import AdaptiveConfig
from compressm_tune.reduction._policies import ReductionPolicy
from compressm_tune.reduction._schedules import SCHEDULES, SettleConfig

__all__ = ["CALIBRATION", "MOMENT_POLICIES", "ReduceConfig"]

MOMENT_POLICIES = ("reset", "slice")
CALIBRATION = 128  # training sequences that score a selective layer's states


@dataclass
class ReduceConfig:
    """When and how to reduce during training.

    The window: with ``schedule="adaptive"`` (default) cuts are attempted from readiness on (the
    LR warm-up over and the validation metric out of its starting noise band and on a
    plateau, or ``adaptive.by`` of the steps done) for ``window * total_steps`` steps, and
    never after ``adaptive.latest * total_steps``; a run not ready by then is not cut. With
    ``"window"`` and ``"settle"`` the window is the first ``window * total_steps`` steps.
    """

    # the default scores LRU states on input-weighted Hankel singular values
    policy: ReductionPolicy = field(default_factory=lambda: ReductionPolicy(weighting="input"))
    window: float = field(default=0.1, metadata={
        "help": "share of steps in which cuts are attempted: from readiness on (adaptive) or "
                "from the start (window, settle)"})
    every: int | None = field(default=None, metadata={
        "flag": "--reduce-every",
        "help": "steps between cut attempts inside the window (default: the schedule's; "
                "window: every evaluation)"})
    max_drop: float = field(default=0.02, metadata={
        "help": "roll back a cut that loses more validation accuracy (or relative loss) than "
                "this beyond the measured noise of the per-sample change"})
    moments: str = field(default="reset", metadata={
        "choices": MOMENT_POLICIES, "help": "Adam moments of a cut layer (slice: the paper's)"})
    # Optional hook (r, N) -> r' that rounds ranks to widths a hardware profile runs fast.
    round_to: Callable[[int, int], int] | None = None
    # Optional budget check on the per-layer widths; when the window closes and it fails, the
    # weakest balanced states (smallest normalized HSVs, across layers) are cut until it holds.
    fits: Callable[[list[int]], bool] | None = None
    # Training sequences whose layer inputs score the states (selective layers, and LRU
    # layers under an input-weighted policy).
    calibration: int = CALIBRATION
    # "adaptive": cuts once the model is ready, widths from the spectrum and the measured
    # effect (AdaptiveTracker); "window": the paper's, a tau cut at every attempt in the
    # window; "settle": cut when the spectrum has settled (SettleTracker)
    schedule: str = field(default="adaptive", metadata={
        "choices": SCHEDULES,
        "help": "when and how far to cut: adaptive (once the LR warm-up is over and validation "
                "has left its starting noise band; widths from each layer's spectrum and the "
                "measured effect of the cut, bisecting after a rollback), window (the paper's: "
                "a tau cut at every attempt in the first steps) or settle (cut when the "
                "spectrum's target width has settled; see docs/cli.md)"})
    settle: SettleConfig = field(default_factory=SettleConfig)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)

    def __post_init__(self) -> None:
        if not 0.0 < self.window <= 1.0:
            raise ConfigError(f"0 < window <= 1 must hold, got window={self.window}")
        if self.every is not None and self.every < 1:
            raise ConfigError(f"every >= 1 must hold, got every={self.every}")
        if not self.max_drop >= 0:  # NaN fails too; inf: cuts are not checked
            raise ConfigError(f"max_drop >= 0 must hold, got max_drop={self.max_drop}")
        if self.calibration < 1:
            raise ConfigError(f"calibration >= 1 must hold, got calibration={self.calibration}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule in ("settle", "adaptive") and self.policy.kind == "fraction":
            raise ConfigError(f"schedule {self.schedule!r} needs a tau= or rank= policy: "
                              f"repeated fraction={self.policy.value:g} cuts have no fixed "
                              "point")
        if self.moments not in MOMENT_POLICIES:
            raise ConfigError(f"moments must be one of {MOMENT_POLICIES}, got {self.moments!r}")
