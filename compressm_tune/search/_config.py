"""Settings of the budgeted search job (``compressm-tune --budget-ms``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from compressm_tune.data import Dataset
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

    budget_ms: float  # per-sample latency of the exported model (onnxruntime, batch 1)
    budget_mj: float | None = None  # per-sample energy, where it can be measured or estimated
    latency_mode: str = "sequence"  # "sequence": per sequence; "step": per streamed token
    arch: str = "lru"  # SSM layer of every trial: "lru", "selective" or "mamba"
    dataset: str = "mnist1d"
    data_path: str | None = None
    data_dir: str | None = None
    val_fraction: float = 0.1  # share of train held out to rank trials and pick checkpoints
    trials: int = 8  # trials completed (or pruned) in the study, summed over all workers
    steps: int = 300  # training steps per trial
    blocks: int = 2
    hidden: int = 32  # H; the profile is measured at this width
    state_dims: tuple[int, ...] = (64, 128, 256)  # initial widths the search may start from
    batch_size: int = 64
    profile: str | None = None  # a profile JSON; default: cached for this device, or measured
    drift_check: bool = True  # re-time an older profile of this machine, rescale if it moved
    storage: str | None = None  # SQLAlchemy URL or journal:PATH; default: OUT/study.db
    study: str = "compressm-tune"
    out: str = "runs/tune"
    seed: int = 0
    pareto: bool = False  # multi-objective (accuracy vs latency, NSGA-II) instead
    threads: int | None = None  # torch threads for training (None: torch's default)
    ort_threads: int = 1  # onnxruntime intra-op threads for the latency the budget is about
    device: str = "cpu"  # where trials train (auto | cpu | cuda[:N]); export and latency
    # measurement stay on the deployment runtime the profile describes
    precision: str = "fp32"  # training arithmetic: fp32 | tf32 | bf16
    cuda_graphs: bool = True  # on CUDA, replay each training step from a captured graph
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
