"""The Mamba block's mixer (Mamba-1, as Hugging Face ``transformers``' ``MambaMixer``).

For inputs ``u (batch, L, H)`` with ``E = expand * H`` inner channels::

    x, z  = split(in_proj(u))                         (B, L, E) each   in_proj: H -> 2E
    x     = silu(causal_depthwise_conv1d(x))          (B, L, E)        kernel d_conv, bias
    y     = S6(x) + D * x                             (B, L, E)        the selective scan
    out   = out_proj(y * silu(z))                     (B, L, H)        out_proj: E -> H

where ``S6`` is :class:`~compressm_tune.models.selective.SelectiveLayer` on ``E`` channels:
``delta = softplus(dt_proj(x_proj_dt(x)))``, ``B_t``/``C_t`` the other rows of ``x_proj``,
``A = -exp(A_log)`` of shape ``(E, N)``. Mamba's ``x_proj`` (E -> dt_rank + 2N, no bias) is
held as its three row blocks, ``s6.dt_down``, ``s6.B_proj`` and ``s6.C_proj``, and ``dt_proj``
as ``s6.dt_up`` + ``s6.dt_bias``: the same arithmetic, and the state index ``n`` is then row
``n`` of ``B_proj``/``C_proj`` and column ``n`` of ``A_log``, exactly what the selective
layer's reduction slices. So the S6 core (fused C kernel on CPU, Triton on CUDA, the torch
reference elsewhere), its state importance and its index-keeping truncation are shared, not
copied.

Streaming keeps the network's contract of one state tensor per layer: ``(batch, E, d_conv - 1
+ N)``, the last ``d_conv - 1`` conv inputs of every channel, then the S6 state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compressm_tune.errors import ConfigError
from compressm_tune.models.selective import SelectiveLayer

__all__ = ["MambaLayer"]


class MambaLayer(nn.Module):
    """One Mamba mixer, ``(batch, L, H) -> (batch, L, H)`` (see the module docstring).

    Parameters
    ----------
    d_model : int
        H, the input and output width.
    state_dim : int
        N, Mamba's ``d_state``.
    expand : int
        ``E = expand * H`` inner channels (Mamba: 2).
    d_conv : int
        Kernel of the causal depthwise convolution (Mamba: 4).
    dt_rank : int, optional
        Rank of the step-size projection; default ``ceil(H / 16)`` as Mamba.
    bias : bool
        Biases of ``in_proj`` and ``out_proj`` (Mamba: none).
    conv_bias : bool
        Bias of the convolution (Mamba: yes).

    Examples
    --------
    >>> layer = MambaLayer(d_model=4, state_dim=8)
    >>> layer(torch.randn(2, 5, 4)).shape, layer.allocate_state(2).shape
    (torch.Size([2, 5, 4]), torch.Size([2, 8, 11]))
    """

    # The S6 core's: no weight decay and the SSM learning-rate factor.
    recurrence_parameters = SelectiveLayer.recurrence_parameters
    # Which axis of each (dotted) parameter indexes the state: what a truncation slices.
    state_axes = {f"s6.{name}": axis for name, axis in SelectiveLayer.state_axes.items()}

    def __init__(
        self,
        d_model: int,
        state_dim: int,
        expand: int = 2,
        d_conv: int = 4,
        dt_rank: int | None = None,
        bias: bool = False,
        conv_bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if d_model < 1 or state_dim < 1 or expand < 1 or d_conv < 1:
            raise ConfigError(f"d_model, state_dim, expand, d_conv >= 1 must hold, got "
                              f"{d_model=} {state_dim=} {expand=} {d_conv=}")
        kw = {"device": device, "dtype": dtype}
        e = expand * d_model
        self.d_model, self.d_inner, self.d_conv = d_model, e, d_conv
        self.in_proj = nn.Linear(d_model, 2 * e, bias=bias, **kw)
        self.conv1d = nn.Conv1d(e, e, d_conv, groups=e, padding=d_conv - 1, bias=conv_bias, **kw)
        self.s6 = SelectiveLayer(e, state_dim, dt_rank or math.ceil(d_model / 16), **kw)
        self.out_proj = nn.Linear(e, d_model, bias=bias, **kw)

    @property
    def state_dim(self) -> int:
        """Current state width N (changes after a reduction)."""
        return self.s6.state_dim

    @property
    def A_log(self) -> torch.Tensor:  # noqa: N802 - Mamba's name
        """The S6 core's ``A_log (E, N)``."""
        return self.s6.A_log

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """Causal depthwise convolution over time, ``(B, L, E) -> (B, L, E)``."""
        y = self.conv1d(x.transpose(1, 2))  # (B, E, L + d_conv - 1), padded on both sides
        return y[..., :x.shape[1]].transpose(1, 2)

    def _split(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (..., E) each
        return x, z

    def scan_inputs(self, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the S6 core's scan receives for layer inputs ``u (batch, L, H)`` (see
        :meth:`SelectiveLayer.scan_inputs`): the core's ``delta, A, B_t, C_t`` and its input,
        the convolved, activated ``x (batch, L, E)`` (state importance scores the core on
        it)."""
        return self.s6.scan_inputs(F.silu(self._conv(self._split(u)[0])))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """``u (batch, L, H) -> (batch, L, H)``."""
        x, z = self._split(u)  # (B, L, E) each
        x = F.silu(self._conv(x))  # (B, L, E)
        y = self.s6(x) * F.silu(z)  # (B, L, E), D x included
        return self.out_proj(y)

    def allocate_state(
        self, batch_size: int, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """A zero streaming state ``(batch, E, d_conv - 1 + N)`` for :meth:`step`."""
        ref = self.s6.A_log
        return torch.zeros(batch_size, self.d_inner, self.d_conv - 1 + self.state_dim,
                           device=device or ref.device, dtype=dtype or ref.dtype)

    def step(self, u_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance one token: ``u_t (batch, H)``, ``state`` as :meth:`allocate_state`."""
        k = self.d_conv - 1
        x, z = self._split(u_t)  # (B, E) each
        window = torch.cat((state[:, :, :k], x[:, :, None]), -1)  # (B, E, d_conv)
        x = (window * self.conv1d.weight[:, 0]).sum(-1)  # (B, E)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        y, ssm = self.s6.step(F.silu(x), state[:, :, k:])  # (B, E), (B, E, N)
        return self.out_proj(y * F.silu(z)), torch.cat((window[:, :, 1:], ssm), -1)

    def keep_states(self, keep: torch.Tensor) -> None:
        """Model surgery: keep only the S6 state indices ``keep`` (see
        :meth:`SelectiveLayer.keep_states`)."""
        self.s6.keep_states(keep)
