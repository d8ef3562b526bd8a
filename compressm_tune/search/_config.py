"""Settings of the budgeted search job (``compressm-tune --budget-ms``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from compressm_tune._device import PRECISIONS
from compressm_tune.data import DATASETS, Dataset
from compressm_tune.errors import ConfigError
from compressm_tune.models import ARCHS, SSMConfig, dropout_for
from compressm_tune.training import TrainConfig

__all__ = ["TuneConfig", "LATENCY_MODES"]

LATENCY_MODES = ("sequence", "step")


@dataclass
class TuneConfig:
    """What to search for, on which data, and where to keep the study.

    The model and training settings of every trial are built from these by
    :meth:`model_config` and :meth:`train_config` (``SSMConfig`` and ``TrainConfig`` check
    them). The defaults finish in a few minutes on two CPU cores on MNIST-1D.
    """

    budget_ms: float = field(metadata={
        "help": "per-sample latency budget in ms (onnxruntime, batch 1; per sequence, or per "
                "token with --latency-mode step)"})
    budget_mj: float | None = field(default=None, metadata={
        "help": "per-sample energy budget, mJ (where it can be measured or estimated)"})
    latency_mode: str = field(default="sequence", metadata={
        "choices": LATENCY_MODES,
        "help": "what the budget bounds: sequence (per sequence) or step (per streamed token)"})
    arch: str = field(default="lru", metadata={
        "choices": ARCHS, "help": "SSM layer of every trial: lru, selective or mamba"})
    dataset: str = field(default="mnist1d", metadata={
        "choices": DATASETS, "help": "built-in or user dataset"})
    data_path: str | None = field(default=None, metadata={
        "flag": "--data", "help": "path of the .npz file for --dataset npz"})
    data_dir: str | None = field(default=None, metadata={
        "help": "directory with MNIST IDX files for --dataset smnist"})
    val_fraction: float = field(default=0.1, metadata={  # ranks trials, picks checkpoints
        "help": "share of train held out for validation"})
    trials: int = field(default=8, metadata={  # completed or pruned, summed over all workers
        "help": "trials in the study, summed over all workers"})
    steps: int = field(default=300, metadata={"help": "steps per trial"})
    blocks: int = field(default=2, metadata={"help": "SSM blocks"})
    hidden: int = field(default=32, metadata={  # the profile is measured at this width
        "help": "H, model width"})
    state_dims: tuple[int, ...] = field(default=(64, 128, 256), metadata={
        "help": "initial widths the search may start from"})
    batch_size: int = field(default=64, metadata={"cli": False})
    profile: str | None = field(default=None, metadata={
        "help": "profile JSON (default: this device's, cached or measured)"})
    drift_check: bool = field(default=True, metadata={
        "help": "predict from the profile as stored: skip re-timing three of its models and "
                "rescaling when this machine has drifted from it"})
    storage: str | None = field(default=None, metadata={
        "help": "Optuna storage: SQLAlchemy URL or journal:PATH (default: OUT/study.db); "
                "rerunning resumes the study"})
    study: str = field(default="compressm-tune", metadata={"help": "study name"})
    out: str = field(default="runs/tune", metadata={"help": "run directory"})
    seed: int = field(default=0, metadata={"help": "seed of the search and of every trial"})
    pareto: bool = field(default=False, metadata={
        "help": "multi-objective search (accuracy vs latency, NSGA-II)"})
    threads: int | None = field(default=None, metadata={
        "help": "torch threads for training (default: torch's)"})
    ort_threads: int = field(default=1, metadata={  # for the latency the budget is about
        "cli": False, "help": "onnxruntime intra-op threads"})
    # export and latency measurement stay on the deployment runtime the profile describes
    device: str = field(default="cpu", metadata={
        "help": "where trials train: auto (a CUDA GPU if there is one), cpu, cuda or cuda:N"})
    precision: str = field(default="fp32", metadata={
        "choices": PRECISIONS,
        "help": "training arithmetic: fp32; tf32 (CUDA: float32 products on the tensor "
                "cores); bf16 (autocast projections, scans in float32)"})
    cuda_graphs: bool = field(default=True, metadata={
        "help": "on CUDA, launch every kernel of every step from Python instead of replaying "
                "a captured graph (slower; for debugging)"})
    max_drop: float = field(default=0.05, metadata={
        "help": "roll back a trial's cut that loses more validation score than this "
                "(accuracy points, or relative loss)"})

    def __post_init__(self) -> None:
        if not 0 < self.budget_ms < math.inf:
            raise ConfigError(f"--budget-ms must be > 0 and finite, got budget_ms={self.budget_ms}")
        if self.budget_mj is not None and not 0 < self.budget_mj < math.inf:
            raise ConfigError(f"--budget-mj must be > 0 and finite, got budget_mj={self.budget_mj}")
        if self.arch not in ARCHS:
            raise ConfigError(f"--arch must be one of {ARCHS}, got arch={self.arch!r}")
        if self.latency_mode not in LATENCY_MODES:
            raise ConfigError(
                f"latency mode must be one of {LATENCY_MODES}, got {self.latency_mode!r}")
        for name in ("trials", "steps", "blocks", "hidden", "batch_size", "ort_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {name}={getattr(self, name)}")
        if not self.state_dims or min(self.state_dims) < 1:
            raise ConfigError(f"state_dims must be positive widths, got {self.state_dims}")
        if not self.max_drop >= 0:
            raise ConfigError(f"max_drop >= 0 must hold, got max_drop={self.max_drop}")
        self.train_config()  # TrainConfig checks the training settings (device, precision...)

    def train_config(self, **settings) -> TrainConfig:
        """Training settings shared by every trial and the full reference, plus ``settings``."""
        return TrainConfig(steps=self.steps, batch_size=self.batch_size,
                           eval_every=max(1, self.steps // 10), seed=self.seed,
                           threads=self.threads, device=self.device, precision=self.precision,
                           cuda_graphs=self.cuda_graphs, **settings)

    def model_config(self, data: Dataset, width: int) -> SSMConfig:
        """The model every trial and the full reference train: ``width`` states per block,
        shaped for ``data``, with the dropout ``train`` uses for its task."""
        return SSMConfig(arch=self.arch, d_input=data.d_input, d_output=data.d_output,
                         d_model=self.hidden, state_dims=[width] * self.blocks,
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
