"""Settings of the budgeted search job (``compressm-tune --budget 0.4x`` or ``--budget-ms``)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from compressm_tune.data import DATASETS, Dataset
from compressm_tune.errors import ConfigError
from compressm_tune.models import ARCHS, SSMConfig, dropout_for
from compressm_tune.reduction import AdaptiveConfig
from compressm_tune.search._artifacts import check_artifacts
from compressm_tune.training import RunSettings, TrainConfig

__all__ = ["TuneConfig", "LATENCY_MODES", "parse_relative_budget"]

LATENCY_MODES = ("sequence", "step")


def parse_relative_budget(value: str | float) -> float:
    """The fraction in a relative latency budget: ``"0.4x"`` (or ``"0.4"``, ``0.4``) -> 0.4.

    The fraction is of the full model's latency on this machine (the search aims at it as the
    profile predicts it; the chosen model is measured against the full model), so it must lie
    strictly between 0 and 1.

    Raises
    ------
    ConfigError
        ``value`` is not a number (with an optional trailing ``x``) in (0, 1).

    Examples
    --------
    >>> parse_relative_budget("0.4x")
    0.4
    """
    text = str(value).strip()
    try:
        fraction = float(text[:-1] if text.lower().endswith("x") else text)
    except ValueError:
        fraction = math.nan
    if not 0 < fraction < 1:  # NaN fails too
        raise ConfigError(f"a relative budget is a fraction of the full model's latency in "
                          f"(0, 1), e.g. 0.4x; got budget={value!r}")
    return fraction


@dataclass
class TuneConfig(RunSettings):
    """What to search for, on which data, and where to keep the study.

    The latency budget is absolute (``budget_ms``) or relative to the full model
    (``budget="0.4x"``: 40% of the full width's latency here, which binds on any machine);
    exactly one is given. :meth:`with_budget_ms` resolves a relative one to the milliseconds
    the trials aim at (from the profile's prediction); the finalizer judges the chosen model
    against the full model measured in the same rounds.
    Every trial starts at the full width, ``max(state_dims)``, and the search explores how to cut
    it; more ``state_dims`` let it also start narrower. The model and training settings of every
    trial are built by :meth:`model_config` and :meth:`train_config` (``SSMConfig`` and
    ``TrainConfig`` check them); the settings shared with training (seed, threads, device,
    precision, cuda_graphs, batch_size, mamba2_scan) are :class:`RunSettings`'. The device is
    where trials train: export and latency measurement stay on the runtime the profile
    describes. The defaults finish in about three minutes on two quiet CPU cores on lti-sysid.
    """

    budget_ms: float | None = field(default=None, metadata={
        "help": "per-sample latency budget in ms (onnxruntime, batch 1; per sequence, or per "
                "token with --latency-mode step)"})
    budget: str | None = field(default=None, metadata={  # resolved by with_budget_ms
        "metavar": "FRACTIONx",
        "help": "latency budget relative to the full model on this machine, e.g. 0.4x (40% "
                "of its latency; trials aim at the profile's prediction, the chosen model is "
                "measured against the full one); in (0, 1); binds on any machine"})
    budget_mj: float | None = field(default=None, metadata={
        "help": "per-sample energy budget, mJ (where it can be measured or estimated)"})
    latency_mode: str = field(default="sequence", metadata={
        "choices": LATENCY_MODES,
        "help": "what the budget bounds: sequence (per sequence) or step (per streamed token)"})
    arch: str = field(default="lru", metadata={
        "choices": ARCHS, "help": "SSM layer of every trial: lru, selective, mamba or mamba2"})
    dataset: str = field(default="lti-sysid", metadata={  # the state width matters on it
        "choices": DATASETS, "help": "built-in or user dataset"})
    data_path: str | None = field(default=None, metadata={
        "flag": "--data", "help": "path of the .npz file for --dataset npz"})
    data_dir: str | None = field(default=None, metadata={
        "help": "directory with MNIST IDX files for --dataset smnist"})
    val_fraction: float = field(default=0.1, metadata={  # ranks trials, picks checkpoints
        "help": "share of train held out for validation"})
    trials: int = field(default=8, metadata={  # completed or pruned, summed over all workers
        "help": "trials in the study, summed over all workers"})
    steps: int = field(default=600, metadata={"help": "steps per trial"})
    blocks: int = field(default=1, metadata={"help": "SSM blocks"})
    hidden: int = field(default=16, metadata={  # the profile is measured at this width
        "help": "H, model width"})
    state_dims: tuple[int, ...] = field(default=(256,), metadata={
        "help": "initial widths the search may start from; the largest is the full model "
                "(by default the full width only: every trial is cut from it)"})
    batch_size: int = 32
    profile: str | None = field(default=None, metadata={
        "help": "profile JSON (default: this device's, cached or measured)"})
    drift_check: bool = field(default=True, metadata={
        "help": "predict from the profile as stored: skip re-timing three of its models and "
                "rescaling when this machine has drifted from it"})
    storage: str | None = field(default=None, metadata={
        "help": "Optuna storage: SQLAlchemy URL or journal:PATH (default: OUT/study.db); "
                "rerunning resumes the study"})
    artifacts: str | None = field(default=None, metadata={
        "metavar": "DIR|URL",
        "help": "artifact store of trial checkpoints and the chosen bundle, one every worker "
                "reaches: a folder, file:///DIR or s3://BUCKET (boto3); default: the folder "
                "'artifacts' beside the storage's file; required with a database server"})
    study: str = field(default="compressm-tune", metadata={"help": "study name"})
    workers: int = field(default=1, metadata={
        "help": "local worker processes sharing the study; with CUDA GPUs each is pinned to "
                "one (CUDA_VISIBLE_DEVICES, round-robin); on CPU each trains with --threads"})
    out: str = field(default="runs/tune", metadata={"help": "run directory"})
    pareto: bool = field(default=False, metadata={
        "help": "multi-objective search (accuracy vs latency, NSGA-II)"})
    # One thread: the job's small models gain little from more, and on a busy 2-core machine
    # torch's default (2) spun more than it computed: the quickstart's 8 trials took ~21 min
    # with it and ~4-7 min with one thread, under the same load.
    threads: int | None = 1
    ort_threads: int = field(default=1, metadata={  # for the latency the budget is about
        "cli": False, "help": "onnxruntime intra-op threads"})
    baseline: bool = field(default=True, metadata={
        "help": "skip the scratch baseline: the chosen widths trained from the start with the "
                "chosen settings, which shows whether cutting beat training small"})
    # the adaptive schedule's readiness and noise settings, for every trial that uses it
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig, metadata={"cli": False})

    def __post_init__(self) -> None:
        if (self.budget_ms is None) == (self.budget is None):
            raise ConfigError("give one latency budget: budget_ms (milliseconds) or budget (a "
                              "fraction of the full model's latency, e.g. '0.4x'); got "
                              f"budget_ms={self.budget_ms}, budget={self.budget!r}")
        if self.budget is not None:
            self.budget = f"{parse_relative_budget(self.budget):g}x"
        elif not 0 < self.budget_ms < math.inf:
            raise ConfigError(f"--budget-ms must be > 0 and finite, got budget_ms={self.budget_ms}")
        if self.budget_mj is not None and not 0 < self.budget_mj < math.inf:
            raise ConfigError(f"--budget-mj must be > 0 and finite, got budget_mj={self.budget_mj}")
        if self.arch not in ARCHS:
            raise ConfigError(f"--arch must be one of {ARCHS}, got arch={self.arch!r}")
        if self.latency_mode not in LATENCY_MODES:
            raise ConfigError(
                f"latency mode must be one of {LATENCY_MODES}, got {self.latency_mode!r}")
        for name in ("trials", "steps", "blocks", "hidden", "batch_size", "ort_threads",
                     "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {name}={getattr(self, name)}")
        if not self.state_dims or min(self.state_dims) < 1:
            raise ConfigError(f"state_dims must be positive widths, got {self.state_dims}")
        check_artifacts(self.artifacts, self.storage)
        if self.workers > 1 and self.device.startswith("cuda:"):
            raise ConfigError(f"--workers {self.workers} pins each worker to one GPU: give "
                              f"--device auto or cuda, not {self.device}")
        self.train_config()  # TrainConfig checks the training settings (device, precision...)

    @property
    def budget_fraction(self) -> float | None:
        """The relative budget as a fraction of the full model's latency (None: absolute)."""
        return None if self.budget is None else parse_relative_budget(self.budget)

    @property
    def full_width(self) -> int:
        """The width every trial starts from unless the search is given narrower ones."""
        return max(self.state_dims)

    def with_budget_ms(self, budget_ms: float) -> TuneConfig:
        """A copy whose ``budget_ms`` is ``budget_ms``: a relative budget resolved on this
        machine (its relative form is kept, for the record)."""
        if not 0 < budget_ms < math.inf:
            raise ConfigError(f"budget_ms must be > 0 and finite, got {budget_ms=}")
        resolved = copy.copy(self)  # not through __post_init__: both budgets are set now
        resolved.budget_ms = budget_ms
        return resolved

    def train_config(self, **settings) -> TrainConfig:
        """Training settings shared by every trial and the full reference, plus ``settings``."""
        return TrainConfig(steps=self.steps, batch_size=self.batch_size,
                           eval_every=max(1, self.steps // 10), seed=self.seed,
                           threads=self.threads, device=self.device, precision=self.precision,
                           cuda_graphs=self.cuda_graphs, mamba2_scan=self.mamba2_scan,
                           **settings)

    def model_config(self, data: Dataset, width: int | list[int]) -> SSMConfig:
        """The model every trial and the references train: ``width`` states per block (or a
        width per block), shaped for ``data``, with the dropout ``train`` uses for its task."""
        widths = [width] * self.blocks if isinstance(width, int) else list(width)
        return SSMConfig(arch=self.arch, d_input=data.d_input, d_output=data.d_output,
                         d_model=self.hidden, state_dims=widths,
                         dropout=dropout_for(data.task), pooling=data.pooling)

    def profile_shape(self, d_input: int, d_output: int, seq_len: int) -> dict[str, Any]:
        """The model shape, widths and threads the latency profile must describe (the keywords
        of :func:`compressm_tune.hardware.latency_model_for`), and the profile file if given."""
        return {"arch": self.arch, "hidden": self.hidden, "blocks": self.blocks,
                "seq_len": seq_len, "d_input": d_input, "d_output": d_output,
                "widths": self.state_dims, "threads": self.ort_threads, "profile": self.profile}

    @property
    def metric(self) -> str:
        """The profile metric the latency budget is checked against."""
        return "latency_ms" if self.latency_mode == "sequence" else "step_ms"
