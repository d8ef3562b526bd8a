"""Configuration of the SSM network, JSON-serializable so a checkpoint rebuilds the model."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from compressm_tune.errors import ConfigError

__all__ = ["ARCHS", "MAMBA_ARCHS", "SSMConfig", "dropout_for"]

POOLINGS = ("mean", "none")
ARCHS = ("lru", "selective", "mamba", "mamba2")
MAMBA_ARCHS = ("mamba", "mamba2")  # Mamba's residual block and final RMSNorm


@dataclass
class SSMConfig:
    """Shape and initialization of an :class:`~compressm_tune.models.SSMModel`.

    ``state_dims`` holds one width per block and is rewritten after every reduction, so
    ``asdict(config)`` in a checkpoint always describes the model as it is now.

    Examples
    --------
    >>> SSMConfig(d_input=1, d_output=10, d_model=8, state_dims=[16, 16]).n_blocks
    2
    """

    # "lru": diagonal complex LTI (CompreSSM); "selective": a bare S6 layer in the LRU's block;
    # "mamba": Mamba's own block (RMSNorm -> MambaLayer -> residual) and a final RMSNorm;
    # "mamba2": the same block around a Mamba2Layer (heads, groups, scalar A per head)
    arch: str = field(default="lru", metadata={
        "choices": ARCHS,
        "help": "SSM layer: lru (LTI, complex diagonal), selective (a bare S6 layer), mamba "
                "(Mamba's block: expansion, conv, gate, S6) or mamba2 (Mamba-2's: heads "
                "with one decay each, grouped B/C, gated RMSNorm)"})
    d_input: int = 1
    d_output: int = 10
    d_model: int = field(default=64, metadata={"flag": "--hidden", "help": "H, model width"})
    state_dims: list[int] = field(default_factory=lambda: [256, 256, 256, 256])  # N per block
    pooling: str = "mean"  # "mean": one output per sequence; "none": one output per step
    dropout: float = 0.1  # regression: 0 (see dropout_for; `train` picks by task)
    # LRU only: |lambda| is drawn uniformly on the ring [r_min, r_max] (paper's init)
    r_min: float = 0.9
    r_max: float = 0.999
    max_phase: float = 2 * math.pi  # phase uniform in [0, max_phase)
    # Mamba only (defaults as Mamba / transformers' MambaConfig)
    expand: int = 2  # inner width E = expand * d_model
    d_conv: int = 4  # kernel of the causal depthwise convolution
    dt_rank: int | None = None  # rank of the step-size projection; None: ceil(d_model / 16)
    proj_bias: bool = False  # biases of in_proj and out_proj
    conv_bias: bool = True
    norm_eps: float = 1e-5  # RMSNorm epsilon
    # Mamba-2 only (the rest as Mamba: expand, d_conv, proj_bias, conv_bias, norm_eps)
    head_dim: int | None = field(default=None, metadata={
        "help": "Mamba-2: P, channels per head; expand * hidden must be a multiple "
                "(default: min(64, expand * hidden))"})
    n_groups: int = field(default=1, metadata={
        "help": "Mamba-2: groups of heads sharing B and C (and the gated norm's groups); "
                "divides the number of heads"})
    dt_limit: list[float] | None = None  # [low, high] clamp of delta (time_step_limit)
    # Token models: an nn.Embedding over ids (batch, L) instead of a Linear over floats
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if any(isinstance(n, bool) or int(n) != n for n in self.state_dims):
            raise ConfigError(f"state_dims must be integers, got {self.state_dims!r}")
        self.state_dims = [int(n) for n in self.state_dims]
        for name in ("d_input", "d_output", "d_model"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {name}={value!r}")
        if not self.state_dims or min(self.state_dims) < 1:
            raise ConfigError(
                f"state_dims must list at least one positive width, got {self.state_dims!r}"
            )
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"0 <= dropout < 1 must hold, got dropout={self.dropout}")
        if not 0.0 <= self.r_min < self.r_max < 1.0:
            raise ConfigError(
                f"0 <= r_min < r_max < 1 must hold, got r_min={self.r_min} r_max={self.r_max}"
            )
        for name in ("expand", "d_conv", "dt_rank", "vocab_size", "head_dim", "n_groups"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value
                                      or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {name}={value!r}")
        if self.dt_limit is not None:
            if len(self.dt_limit) != 2 or not 0.0 <= self.dt_limit[0] < self.dt_limit[1]:
                raise ConfigError(f"dt_limit must be [low, high] with 0 <= low < high, got "
                                  f"{self.dt_limit!r}")
            self.dt_limit = [float(v) for v in self.dt_limit]
        if self.arch == "mamba2":
            inner = self.expand * self.d_model
            head_dim = self.head_dim or min(64, inner)
            if inner % head_dim or (inner // head_dim) % self.n_groups:
                raise ConfigError(
                    f"mamba2: head_dim must divide expand * d_model = {inner} and n_groups the "
                    f"number of heads, got head_dim={head_dim} n_groups={self.n_groups}")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps > 0 must hold, got norm_eps={self.norm_eps}")
        if not 0.0 < self.max_phase <= 2 * math.pi:
            raise ConfigError(f"0 < max_phase <= 2*pi must hold, got max_phase={self.max_phase}")

    @property
    def n_blocks(self) -> int:
        """Number of SSM blocks."""
        return len(self.state_dims)

    def to_dict(self) -> dict:
        """Plain-JSON form (``SSMConfig(**d)`` rebuilds it)."""
        return asdict(self)


def dropout_for(task: str) -> float:
    """The dropout the command line trains a task with: 0.1 for classification, 0 for
    regression.

    Why not 0.1 everywhere (``SSMConfig``'s default): on a real-valued target dropout's noise
    outweighs the error that is left to learn (on a system-identification task it held the
    test MSE an order of magnitude above the data's noise floor), while on classification it
    made no measurable difference, so classification keeps the paper's 0.1.
    """
    return 0.0 if task == "regression" else 0.1
