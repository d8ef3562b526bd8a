"""Linear Recurrent Unit (LRU): a MIMO, complex, diagonal, discrete-time LTI layer.

    lambda = exp(-exp(nu_log) + i*exp(theta_log))          (N,)
    B      = (B_re + i*B_im) * exp(gamma_log)[:, None]     (N, H)
    C      =  C_re + i*C_im                                (H, N)
    x_k    = lambda * x_{k-1} + B u_k
    y_k    = Re(C x_k) + D * u_k

Every parameter is a real tensor; complex numbers appear only as (re, im) pairs in a trailing
dimension, so the same forward exports to ONNX/TorchScript without complex dtypes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compressm_tune.errors import ConfigError
from compressm_tune.models._scan import linear_scan

__all__ = ["LRULayer"]


class LRULayer(nn.Module):
    """One LRU layer, ``(batch, L, H) -> (batch, L, H)``.

    Parameters
    ----------
    d_model : int
        H, the input and output width.
    state_dim : int
        N, the number of complex states.
    r_min, r_max : float
        Ring on which ``|lambda|`` is initialized uniformly (in the squared radius, as the
        paper's code).
    max_phase : float
        Phases are initialized uniformly in ``[0, max_phase)``.

    Examples
    --------
    >>> layer = LRULayer(d_model=4, state_dim=8)
    >>> layer(torch.randn(2, 5, 4)).shape
    torch.Size([2, 5, 4])
    """

    # The recurrence's own parameters: they get the SSM learning-rate factor and no weight
    # decay (as in the paper's code).
    recurrence_parameters = ("nu_log", "theta_log", "gamma_log", "B_re", "B_im")
    # Which axis of each parameter indexes the state: what a reduction rewrites.
    state_axes = {"nu_log": 0, "theta_log": 0, "gamma_log": 0, "B_re": 0, "B_im": 0,
                  "C_re": 1, "C_im": 1}

    def __init__(
        self,
        d_model: int,
        state_dim: int,
        r_min: float = 0.9,
        r_max: float = 0.999,
        max_phase: float = 2 * math.pi,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if d_model < 1 or state_dim < 1:
            raise ConfigError(
                f"d_model >= 1 and state_dim >= 1 must hold, got {d_model=} {state_dim=}"
            )
        if not 0.0 <= r_min < r_max < 1.0:
            raise ConfigError(f"0 <= r_min < r_max < 1 must hold, got {r_min=} {r_max=}")
        kw = {"device": device, "dtype": dtype}
        h, n = d_model, state_dim
        u1 = torch.rand(n, **kw)  # (N,)
        u2 = torch.rand(n, **kw)  # (N,)
        nu_log = torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2))  # (N,)
        theta_log = torch.log(max_phase * u2.clamp(min=1e-6))  # (N,)
        gamma_log = 0.5 * torch.log1p(-torch.exp(-2 * torch.exp(nu_log)))  # (N,) sqrt(1-|lam|^2)
        self.d_model = h
        self.nu_log = nn.Parameter(nu_log)
        self.theta_log = nn.Parameter(theta_log)
        self.gamma_log = nn.Parameter(gamma_log)
        self.B_re = nn.Parameter(torch.randn(n, h, **kw) / math.sqrt(2 * h))  # (N, H)
        self.B_im = nn.Parameter(torch.randn(n, h, **kw) / math.sqrt(2 * h))  # (N, H)
        self.C_re = nn.Parameter(torch.randn(h, n, **kw) / math.sqrt(n))  # (H, N)
        self.C_im = nn.Parameter(torch.randn(h, n, **kw) / math.sqrt(n))  # (H, N)
        self.D = nn.Parameter(torch.randn(h, **kw))  # (H,)

    @property
    def state_dim(self) -> int:
        """Current number of complex states N (changes after a reduction)."""
        return self.nu_log.shape[0]

    def _lambda(self) -> torch.Tensor:
        modulus = torch.exp(-torch.exp(self.nu_log))  # (N,)
        phase = torch.exp(self.theta_log)  # (N,)
        return torch.stack((modulus * torch.cos(phase), modulus * torch.sin(phase)), -1)  # (N, 2)

    def _input_matrix(self) -> torch.Tensor:
        """B with gamma folded in, rows interleaved (re_0, im_0, re_1, ...): (2N, H)."""
        gamma = torch.exp(self.gamma_log)[:, None]  # (N, 1)
        return torch.stack((self.B_re * gamma, self.B_im * gamma), 1).reshape(-1, self.d_model)

    def _output_matrix(self) -> torch.Tensor:
        """[C_re, -C_im] interleaved so that Re(C x) = W @ x_interleaved: (H, 2N)."""
        return torch.stack((self.C_re, -self.C_im), -1).reshape(self.d_model, -1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Run the layer over whole sequences: ``u (batch, L, H) -> y (batch, L, H)``."""
        batch, length, _ = u.shape
        v = (u @ self._input_matrix().T).view(batch, length, -1, 2)  # (B, L, N, 2)
        lam = self._lambda()  # (N, 2) in the parameters' dtype, also under autocast
        x = linear_scan(lam, v.to(lam.dtype))  # (B, L, N, 2): the scan accumulates in fp32+
        return x.view(batch, length, -1) @ self._output_matrix().T + self.D * u  # (B, L, H)

    def allocate_state(
        self, batch_size: int, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """A zero streaming state ``(batch, N, 2)`` for :meth:`step`."""
        return torch.zeros(
            batch_size, self.state_dim, 2,
            device=device or self.nu_log.device, dtype=dtype or self.nu_log.dtype,
        )

    def step(self, u_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance one token: ``u_t (batch, H)``, ``state (batch, N, 2)`` -> ``(y_t, state)``."""
        lam = self._lambda()  # (N, 2)
        v = (u_t @ self._input_matrix().T).view(u_t.shape[0], -1, 2)  # (B, N, 2)
        re = lam[:, 0] * state[..., 0] - lam[:, 1] * state[..., 1] + v[..., 0]  # (B, N)
        im = lam[:, 0] * state[..., 1] + lam[:, 1] * state[..., 0] + v[..., 1]  # (B, N)
        state = torch.stack((re, im), -1)  # (B, N, 2)
        y = state.view(u_t.shape[0], -1) @ self._output_matrix().T + self.D * u_t  # (B, H)
        return y, state

    def system(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer as an LTI system, detached, in complex128/float64, on the CPU (the
        reduction's Gramian algebra is float64 numpy wherever the layer trains).

        Returns
        -------
        lam : (N,) complex   B : (N, H) complex, gamma included   C : (H, N) complex   D : (H,) real
        """
        with torch.no_grad():
            p = {name: t.detach().cpu().double() for name, t in self.named_parameters()}
            lam = torch.view_as_complex(self._lambda().cpu().double().contiguous())  # (N,)
            gamma = torch.exp(p["gamma_log"])[:, None]  # (N, 1)
            b = torch.complex(p["B_re"], p["B_im"]) * gamma  # (N, H)
            c = torch.complex(p["C_re"], p["C_im"])  # (H, N)
            return lam, b, c, p["D"].clone()

    def load_system_parameters(self, params: dict[str, torch.Tensor]) -> None:
        """Model surgery: replace the recurrence's parameters with ones of a new width.

        ``params`` holds ``nu_log, theta_log, gamma_log`` (N',), ``B_re, B_im`` (N', H) and
        ``C_re, C_im`` (H, N'); ``D`` is untouched. New ``nn.Parameter`` objects are created,
        so any optimizer over the old ones must be rebuilt.
        """
        missing = set(self.state_axes) - set(params)
        if missing:
            raise ConfigError(f"load_system_parameters needs {sorted(missing)}")
        n = int(params["nu_log"].shape[0])
        expected = {"nu_log": (n,), "theta_log": (n,), "gamma_log": (n,),
                    "B_re": (n, self.d_model), "B_im": (n, self.d_model),
                    "C_re": (self.d_model, n), "C_im": (self.d_model, n)}
        ref = self.nu_log
        values = {name: torch.as_tensor(params[name]) for name in expected}
        for name, shape in expected.items():  # validate everything before changing anything
            if tuple(values[name].shape) != shape:
                raise ConfigError(
                    f"{name} must have shape {shape}, got {tuple(values[name].shape)}")
            if not torch.isfinite(values[name]).all():
                raise ConfigError(f"{name} must be finite")
        for name, value in values.items():
            setattr(self, name, nn.Parameter(value.to(device=ref.device, dtype=ref.dtype)))
