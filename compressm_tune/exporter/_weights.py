"""Real-valued float32 weights of an :class:`~compressm_tune.models.SSMModel`, as graphs use them.

Both writers (ONNX and TorchScript) are built from this one extraction, so they compute the
same arithmetic. Every quantity torch derives from the raw parameters at run time (lambda,
``B * gamma``, the BatchNorm scale) is derived here *with torch's own float32 code*
(``LRULayer._lambda`` etc.), so the exported constants are bit-identical to what eager torch
uses. With |lambda| near 0.999 a one-ulp difference in lambda would otherwise grow ~1000x
over a long sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from compressm_tune.models import SSMModel

__all__ = ["BlockWeights", "ModelWeights", "extract_weights"]


@dataclass(frozen=True)
class BlockWeights:
    """One LRU block in real arithmetic (H = d_model, N = state width), all float32.

    The block computes, per token ``x`` (.., H)::

        h     = x * bn_scale + bn_shift                      BatchNorm with running statistics
        v_re  = h @ b_re ; v_im = h @ b_im                   (.., N) each, gamma folded in
        s_re' = lam_re * s_re - lam_im * s_im + v_re         diagonal complex recurrence
        s_im' = lam_re * s_im + lam_im * s_re + v_im
        y     = s_re' @ c_re + s_im' @ c_im + d * h          Re(C s) + D h, (.., H)
        g     = gelu(y)                                      exact (erf) GELU
        out   = x + (g @ glu_a + glu_a_bias) * sigmoid(g @ glu_b + glu_b_bias)
    """

    bn_scale: np.ndarray  # (H,)  1 / sqrt(running_var + eps)
    bn_shift: np.ndarray  # (H,)  -running_mean * bn_scale
    lam_re: np.ndarray  # (N,)
    lam_im: np.ndarray  # (N,)
    b_re: np.ndarray  # (H, N)  (B_re * gamma)^T
    b_im: np.ndarray  # (H, N)  (B_im * gamma)^T
    c_re: np.ndarray  # (N, H)  C_re^T
    c_im: np.ndarray  # (N, H)  -C_im^T  (so that Re(C s) = s_re @ c_re + s_im @ c_im)
    d: np.ndarray  # (H,)
    glu_a: np.ndarray  # (H, H)  first half of the GLU projection, transposed
    glu_a_bias: np.ndarray  # (H,)
    glu_b: np.ndarray  # (H, H)  gate half, transposed
    glu_b_bias: np.ndarray  # (H,)

    @property
    def state_dim(self) -> int:
        """N, the number of complex states."""
        return int(self.lam_re.shape[0])


@dataclass(frozen=True)
class ModelWeights:
    """The whole network: encoder -> blocks -> (mean pool) -> head, float32."""

    encoder: np.ndarray  # (d_input, H)  W^T
    encoder_bias: np.ndarray  # (H,)
    blocks: tuple[BlockWeights, ...]
    head: np.ndarray  # (H, d_output)  W^T
    head_bias: np.ndarray  # (d_output,)
    pooling: str  # "mean" or "none"

    @property
    def d_input(self) -> int:
        return int(self.encoder.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.encoder.shape[1])

    @property
    def d_output(self) -> int:
        return int(self.head.shape[1])

    @property
    def state_dims(self) -> list[int]:
        return [b.state_dim for b in self.blocks]


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())


def extract_weights(model: SSMModel) -> ModelWeights:
    """Read ``model``'s inference-time weights (eval mode semantics) as float32 numpy arrays.

    Examples
    --------
    >>> from compressm_tune.models import SSMConfig
    >>> config = SSMConfig(d_input=2, d_output=3, d_model=4, state_dims=[5, 2])
    >>> w = extract_weights(SSMModel(config))
    >>> w.state_dims, w.blocks[0].b_re.shape, w.head.shape
    ([5, 2], (4, 5), (4, 3))
    """
    blocks = []
    with torch.no_grad():
        for block in model.blocks:
            lru, norm = block.lru, block.norm
            scale = torch.rsqrt(norm.running_var + norm.eps)  # (H,)  as torch's CPU batch_norm
            lam = lru._lambda()  # (N, 2)
            gamma = torch.exp(lru.gamma_log)[:, None]  # (N, 1)
            h = lru.d_model
            w, b = block.glu.proj.weight, block.glu.proj.bias  # (2H, H), (2H,)
            blocks.append(BlockWeights(
                bn_scale=_np(scale), bn_shift=_np(-norm.running_mean * scale),
                lam_re=_np(lam[:, 0]), lam_im=_np(lam[:, 1]),
                b_re=_np((lru.B_re * gamma).T), b_im=_np((lru.B_im * gamma).T),
                c_re=_np(lru.C_re.T), c_im=_np(-lru.C_im.T), d=_np(lru.D),
                glu_a=_np(w[:h].T), glu_a_bias=_np(b[:h]),
                glu_b=_np(w[h:].T), glu_b_bias=_np(b[h:]),
            ))
        return ModelWeights(
            encoder=_np(model.encoder.weight.T), encoder_bias=_np(model.encoder.bias),
            blocks=tuple(blocks), head=_np(model.head.weight.T), head_bias=_np(model.head.bias),
            pooling=model.config.pooling,
        )
