"""A TorchScript inference module rebuilt from the network's weights.

``LRULayer.forward`` calls a C kernel through an autograd Function, which TorchScript can
neither script nor trace into a length-independent graph, so the scripted module re-states the
inference arithmetic of :class:`~compressm_tune.exporter._weights.BlockWeights` with an explicit
time loop (dynamic length) and a ``step`` method in :meth:`SSMModel.allocate_state`'s layout.
The saved file needs only ``torch.jit.load``: no compressm_tune import on the loading side.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compressm_tune.exporter._weights import BlockWeights, ModelWeights

__all__ = ["ScriptedSSM", "script_model"]


def _buf(module: nn.Module, name: str, value: np.ndarray) -> None:
    module.register_buffer(name, torch.from_numpy(np.array(value, dtype=np.float32)))


class _ScriptedBlock(nn.Module):
    """One LRU block; see :class:`BlockWeights` for the equations."""

    def __init__(self, w: BlockWeights) -> None:
        super().__init__()
        for name in ("bn_scale", "bn_shift", "lam_re", "lam_im", "b_re", "b_im", "c_re", "c_im",
                     "d", "glu_a", "glu_a_bias", "glu_b", "glu_b_bias"):
            _buf(self, name, getattr(w, name))
        self.state_dim = w.state_dim

    def _tail(self, x: torch.Tensor, hn: torch.Tensor, s_re: torch.Tensor,
              s_im: torch.Tensor) -> torch.Tensor:
        y = s_re @ self.c_re + s_im @ self.c_im + self.d * hn  # (..., H)
        g = F.gelu(y)
        a = g @ self.glu_a + self.glu_a_bias  # (..., H)
        return x + a * torch.sigmoid(g @ self.glu_b + self.glu_b_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, L, H) -> (batch, L, H)``."""
        hn = x * self.bn_scale + self.bn_shift  # (B, L, H)
        v_re = hn @ self.b_re  # (B, L, N)
        v_im = hn @ self.b_im  # (B, L, N)
        s_re = torch.zeros_like(v_re[:, 0])  # (B, N)
        s_im = torch.zeros_like(v_im[:, 0])  # (B, N)
        out_re = torch.empty_like(v_re)  # (B, L, N)
        out_im = torch.empty_like(v_im)  # (B, L, N)
        for t in range(v_re.shape[1]):
            s_re, s_im = (self.lam_re * s_re - self.lam_im * s_im + v_re[:, t],
                          self.lam_re * s_im + self.lam_im * s_re + v_im[:, t])
            out_re[:, t] = s_re
            out_im[:, t] = s_im
        return self._tail(x, hn, out_re, out_im)

    def step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_t (batch, H)``, ``state (batch, N, 2)`` -> ``(out (batch, H), state)``."""
        hn = x_t * self.bn_scale + self.bn_shift  # (B, H)
        s_re, s_im = state[:, :, 0], state[:, :, 1]  # (B, N) each
        new_re = self.lam_re * s_re - self.lam_im * s_im + hn @ self.b_re  # (B, N)
        new_im = self.lam_re * s_im + self.lam_im * s_re + hn @ self.b_im  # (B, N)
        return self._tail(x_t, hn, new_re, new_im), torch.stack((new_re, new_im), -1)


class ScriptedSSM(nn.Module):
    """Inference-only twin of an :class:`~compressm_tune.models.SSMModel`, scriptable.

    ``forward(x (batch, L, d_input))`` returns ``(batch, d_output)`` with mean pooling or
    ``(batch, L, d_output)`` without; ``step(x_t (batch, d_input), state)`` returns
    ``(y_t, new_state)`` with ``state`` as from ``allocate_state(batch)``. Inputs are
    normalized as in the bundle's manifest.
    """

    def __init__(self, w: ModelWeights) -> None:
        super().__init__()
        _buf(self, "encoder", w.encoder)
        _buf(self, "encoder_bias", w.encoder_bias)
        _buf(self, "head", w.head)
        _buf(self, "head_bias", w.head_bias)
        self.blocks = nn.ModuleList(_ScriptedBlock(b) for b in w.blocks)
        self.mean_pool = w.pooling == "mean"
        self.d_model = w.d_model
        self.state_dims = list(w.state_dims)  # list[int], one width per block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.encoder + self.encoder_bias  # (B, L, H)
        for block in self.blocks:
            h = block(h)  # (B, L, H)
        if self.mean_pool:
            h = h.mean(dim=1)  # (B, H)
        return h @ self.head + self.head_bias

    @torch.jit.export
    def allocate_state(self, batch: int) -> list[torch.Tensor]:
        """Zero state: ``(batch, N_k, 2)`` per block, then (mean pooling) sum and count."""
        state = [torch.zeros(batch, n, 2) for n in self.state_dims]
        if self.mean_pool:
            state.append(torch.zeros(batch, self.d_model))
            state.append(torch.zeros(1))
        return state

    @torch.jit.export
    def step(self, x_t: torch.Tensor,
             state: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = x_t @ self.encoder + self.encoder_bias  # (B, H)
        new_state: list[torch.Tensor] = []
        for k, block in enumerate(self.blocks):
            h, s = block.step(h, state[k])
            new_state.append(s)
        if self.mean_pool:
            total = state[-2] + h  # (B, H)
            count = state[-1] + 1  # (1,)
            new_state.append(total)
            new_state.append(count)
            h = total / count
        return h @ self.head + self.head_bias, new_state


def script_model(w: ModelWeights) -> torch.jit.ScriptModule:
    """Script (not trace) a :class:`ScriptedSSM`, so the time loop keeps a dynamic length."""
    return torch.jit.script(ScriptedSSM(w).eval())
