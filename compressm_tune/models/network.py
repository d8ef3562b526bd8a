"""The deep SSM network: encoder -> blocks -> (final norm) -> (mean pool) -> head.

Each block holds one SSM layer, an :class:`LRULayer`, a :class:`SelectiveLayer`, a
:class:`MambaLayer` or a :class:`Mamba2Layer` as ``SSMConfig.arch`` says; all take ``(batch,
L, H)`` to ``(batch, L, H)`` and stream with ``allocate_state`` / ``step`` (one state tensor
each), so the network does not care which. LRU and selective layers sit in the paper's block
(:class:`SSMBlock`); a Mamba or Mamba-2 layer in Mamba's own (:class:`MambaBlock`), and the
network then ends with an RMSNorm (Mamba's ``norm_f``). Every block has its own state width
(``SSMConfig.state_dims``). With ``vocab_size`` the encoder is an embedding over token ids.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from compressm_tune.models.config import MAMBA_ARCHS, SSMConfig
from compressm_tune.models.lru import LRULayer
from compressm_tune.models.mamba import MambaLayer
from compressm_tune.models.mamba2 import Mamba2Layer
from compressm_tune.models.selective import SelectiveLayer

__all__ = ["MambaBlock", "SELECTIVE_LAYERS", "SSMBlock", "SSMModel", "SSM_PARAMETERS"]

SSMLayer = LRULayer | SelectiveLayer | MambaLayer | Mamba2Layer
# Layers whose states are scored from data and cut by keeping indices (their scan's).
SELECTIVE_LAYERS = (SelectiveLayer, MambaLayer, Mamba2Layer)
# Names of the recurrence parameters of either layer (the optimizer's SSM group).
SSM_PARAMETERS = LRULayer.recurrence_parameters + SelectiveLayer.recurrence_parameters


class GLU(nn.Module):
    """Gated linear unit ``a * sigmoid(b)`` with ``[a, b] = W x + c``, H -> H."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, 2 * d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.glu(self.proj(x), dim=-1)  # one kernel for a * sigmoid(b), forward and back


def _masked_batch_norm(rows: torch.Tensor, valid: torch.Tensor,
                       norm: nn.BatchNorm1d) -> torch.Tensor:
    """Training-mode ``norm(rows)`` with the statistics of the ``valid`` rows only (running
    statistics updated as ``nn.BatchNorm1d`` does: momentum, unbiased variance). Padded rows
    are normalized with the same statistics; the layers are causal, so they never reach a
    real step."""
    x = rows.float()  # (R, H); BatchNorm computes in float32 under autocast too
    w = valid.to(x.dtype)[:, None]  # (R, 1)
    count = w.sum()
    mean = (x * w).sum(dim=0) / count.clamp_min(1.0)  # (H,)
    centred = x - mean  # (R, H)
    var = (centred.square() * w).sum(dim=0) / count.clamp_min(1.0)  # (H,) biased
    with torch.no_grad():
        norm.running_mean.lerp_(mean, norm.momentum)
        norm.running_var.lerp_(var * count / (count - 1).clamp_min(1.0), norm.momentum)
        norm.num_batches_tracked.add_(1)
    return centred * torch.rsqrt(var + norm.eps)


class SSMBlock(nn.Module):
    """BatchNorm (no affine) -> SSM layer -> GELU -> dropout -> GLU -> dropout -> residual."""

    def __init__(self, config: SSMConfig, state_dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(config.d_model, affine=False)
        if config.arch == "selective":
            self.ssm: SSMLayer = SelectiveLayer(config.d_model, state_dim)
        else:
            self.ssm = LRULayer(config.d_model, state_dim, config.r_min, config.r_max,
                                config.max_phase)
        self.glu = GLU(config.d_model)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``(batch, L, H) -> (batch, L, H)``; in training, ``valid (batch, L)`` (bool) keeps
        padded steps out of BatchNorm's statistics."""
        # statistics over batch and time per channel: BatchNorm1d on (B*L, H) rows computes
        # exactly what it computes on (B, H, L), without two transposed copies
        rows = x.reshape(-1, x.shape[-1])  # (B*L, H)
        if valid is not None and self.training:
            h = _masked_batch_norm(rows, valid.reshape(-1), self.norm).view_as(x)
        else:
            h = self.norm(rows).view_as(x)  # (B, L, H)
        h = self.drop(F.gelu(self.ssm(h)))  # (B, L, H)
        return x + self.drop(self.glu(h))

    def step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token ``(batch, H)``; inference only (BatchNorm uses its running statistics)."""
        h = F.batch_norm(x_t, self.norm.running_mean, self.norm.running_var,
                         training=False, eps=self.norm.eps)  # (B, H)
        h, state = self.ssm.step(h, state)
        return x_t + self.glu(F.gelu(h)), state


class MambaBlock(nn.Module):
    """Mamba's residual block: RMSNorm -> :class:`MambaLayer` (``arch="mamba"``) or
    :class:`Mamba2Layer` (``arch="mamba2"``) -> dropout -> residual."""

    def __init__(self, config: SSMConfig, state_dim: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        if config.arch == "mamba2":
            self.ssm: MambaLayer | Mamba2Layer = Mamba2Layer(
                config.d_model, state_dim, config.head_dim, config.n_groups, config.expand,
                config.d_conv, config.proj_bias, config.conv_bias,
                None if config.dt_limit is None else tuple(config.dt_limit), config.norm_eps)
        else:
            self.ssm = MambaLayer(config.d_model, state_dim, config.expand, config.d_conv,
                                  config.dt_rank, config.proj_bias, config.conv_bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, L, H) -> (batch, L, H)``."""
        return x + self.drop(self.ssm(self.norm(x)))

    def step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token ``(batch, H)`` and the layer's state."""
        y, state = self.ssm.step(self.norm(x_t), state)
        return x_t + y, state


class SSMModel(nn.Module):
    """A stack of SSM blocks for sequence classification or per-step regression.

    ``model(x)``: ``x (batch, L, d_input)`` -> ``(batch, d_output)`` with mean pooling, or
    ``(batch, L, d_output)`` with ``pooling="none"``. With ``config.vocab_size`` the input is
    token ids, ``x (batch, L)`` int64.

    Examples
    --------
    >>> model = SSMModel(SSMConfig(d_input=1, d_output=10, d_model=8, state_dims=[6, 4]))
    >>> model(torch.randn(3, 12, 1)).shape, model.state_dims
    (torch.Size([3, 10]), [6, 4])
    """

    def __init__(self, config: SSMConfig) -> None:
        super().__init__()
        self._config = replace(config, state_dims=list(config.state_dims))
        self.encoder: nn.Module = (nn.Linear(config.d_input, config.d_model)
                                   if config.vocab_size is None
                                   else nn.Embedding(config.vocab_size, config.d_model))
        block = MambaBlock if config.arch in MAMBA_ARCHS else SSMBlock
        self.blocks = nn.ModuleList(block(config, n) for n in config.state_dims)
        # Mamba's norm_f; an Identity (no parameters) keeps other checkpoints' keys unchanged
        self.norm_f: nn.Module = (nn.RMSNorm(config.d_model, eps=config.norm_eps)
                                  if config.arch in MAMBA_ARCHS else nn.Identity())
        self.head = nn.Linear(config.d_model, config.d_output)
        # set (by the Trainer) when inputs may end in NaN padding: training-mode BatchNorm
        # then takes its statistics over real steps only, at the cost of a few extra ops
        self.padded_inputs = False

    @property
    def state_dims(self) -> list[int]:
        """Current state width of every block (read from the layers, so always up to date)."""
        return [block.ssm.state_dim for block in self.blocks]

    @property
    def config(self) -> SSMConfig:
        """The configuration that rebuilds this model as it is now (widths after any cuts)."""
        return replace(self._config, state_dims=self.state_dims)

    def ssm_layers(self) -> list[SSMLayer]:
        """The SSM layer of every block, in order."""
        return [block.ssm for block in self.blocks]

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, L, d_input)`` -> ``(B, d_output)`` (mean pooling) or ``(B, L, d_output)``.

        Variable-length batches: ``lengths (B,)`` gives each sequence's true length, or,
        without it, steps whose inputs are all NaN count as padding (trailing NaNs, as
        ``load_dataset`` keeps them). Padded steps are fed as zeros and never pooled: the
        layers are causal, so the mean over a sequence's first ``lengths[b]`` steps equals the
        model run on that sequence unpadded (in eval mode; in training only with ``lengths`` or
        ``padded_inputs`` set, which keep padded steps out of BatchNorm's batch statistics).
        Per-step outputs at padded steps are left to the caller to ignore (the trainer's loss
        masks them).
        """
        tokens = not x.is_floating_point()  # (B, L) token ids of an embedding encoder
        if lengths is not None:
            steps = torch.arange(x.shape[1], device=x.device)  # (L,)
            valid = steps[None, :] < lengths.to(x.device)[:, None]  # (B, L)
        elif tokens:
            valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)  # (B, L)
        else:
            valid = ~torch.isnan(x).all(dim=-1)  # (B, L) padded steps are all-NaN
        x = x.masked_fill(~valid, 0) if tokens else x.masked_fill(~valid[..., None], 0.0)
        h = self.encoder(x)  # (B, L, H)
        # BatchNorm's batch statistics skip padded steps when the data can hold any (Mamba's
        # RMSNorm normalizes each token alone and needs no mask)
        masked = ((self.padded_inputs or lengths is not None) and self.training and not tokens
                  and self._config.arch not in MAMBA_ARCHS)
        for block in self.blocks:
            h = block(h, valid) if masked else block(h)  # (B, L, H)
        h = self.norm_f(h)  # (B, L, H)
        if self._config.pooling == "mean":
            weight = valid.to(h.dtype)[..., None]  # (B, L, 1)
            h = (h * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)  # (B, H)
        return self.head(h)

    def allocate_state(self, batch_size: int) -> list[torch.Tensor]:
        """Zero streaming state: one tensor per block (LRU ``(batch, N_k, 2)``, selective
        ``(batch, H, N_k)``, Mamba ``(batch, E, d_conv - 1 + N_k)``, Mamba-2 ``(batch,
        (E + 2 G N_k)(d_conv - 1) + E N_k)``, see :meth:`Mamba2Layer.split_state`), then,
        with mean pooling, the running sum ``(batch, H)`` and the token count ``(1,)``."""
        ref = self.head.weight
        state = [layer.allocate_state(batch_size) for layer in self.ssm_layers()]
        if self._config.pooling == "mean":
            state.append(torch.zeros(batch_size, self._config.d_model, device=ref.device,
                                     dtype=ref.dtype))
            state.append(torch.zeros(1, device=ref.device, dtype=ref.dtype))
        return state

    def step(
        self, x_t: torch.Tensor, state: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Consume one token ``x_t (batch, d_input)`` (token ids: ``(batch,)``); return the
        output so far and the state.

        With mean pooling the output is the head applied to the mean of the features seen so
        far, so after the last token it equals ``forward`` on the whole sequence.
        """
        h = self.encoder(x_t)  # (B, H)
        new_state = []
        for block, s in zip(self.blocks, state, strict=False):
            h, s = block.step(h, s)
            new_state.append(s)
        h = self.norm_f(h)  # (B, H)
        if self._config.pooling == "mean":
            total = state[-2] + h  # (B, H)
            count = state[-1] + 1  # (1,)
            new_state += [total, count]
            h = total / count
        return self.head(h), new_state
