"""The Mamba-2 block's mixer (as Hugging Face ``transformers``' ``Mamba2Mixer``).

For inputs ``u (batch, L, H)``, ``E = expand * H`` inner channels split into ``nh`` heads of
``P`` channels (``E = nh P``), ``G`` groups of heads sharing their ``B``/``C``, and ``N``
states::

    z, xBC, dt = split(in_proj(u))                  (B, L, E), (B, L, E + 2GN), (B, L, nh)
    x, B, C    = split(silu(causal_depthwise_conv1d(xBC)))   (B, L, E), (B, L, G, N) x2
    delta      = clamp(softplus(dt + dt_bias), *dt_limit)    (B, L, nh)
    A          = -exp(A_log)                                 (nh,)  one scalar per head
    h_t[k]     = exp(delta_t[k] A[k]) h_{t-1}[k] + delta_t[k] x_t[k] (x) B_t[g(k)]   (P, N)
    y_t[k]     = h_t[k] C_t[g(k)] + D[k] x_t[k]              (P,)   head k, its group g(k)
    out        = out_proj(rmsnorm_G(y * silu(z)) * norm_weight)   gate, then a norm per group

(``transformers``' gated RMSNorm, ``norm_before_gate=False``; no ``d_mlp`` split, which its
mixer does not have.) ``in_proj`` is held as the rows of ``z``, ``x`` and ``dt`` (an
``nn.Linear``) and, apart, ``bc_proj (2, G, N, H)``: the rows of ``B`` (index 0) and ``C``
(index 1), as the convolution's ``B``/``C`` channels are held in ``bc_conv (2, G, N, K)``: so
state ``n`` is index ``n`` of axis 2 of every ``bc_*`` parameter, what :meth:`keep_states`
slices (all groups keep the same states). Flattened, ``(2, G, N)`` is ``transformers``'
channel order, so its weights copy over unchanged.

The sequence forward runs one of two scans, as the layer's ``scan`` attribute says (``train
--mamba2-scan``; both differentiable w.r.t. ``x``, ``delta``, ``A_log``, ``B``, ``C``; the
``D x`` term, the gate and the norm stay around either):

* ``ssd`` (the default): the chunked SSD form (:func:`ssd_scan`, Mamba-2's "state space
  duality"): within chunks of ``T`` steps the scan is a masked ``(T, T)`` matrix product,
  between chunks a short recurrence over the chunks' end states, so training runs on matmuls,
  in torch on every device. Forward + backward on one CPU core it measured faster than
  ``fused`` from ``N = 32`` up (1.2-1.7x; about even at ``N = 16``) and faster than
  ``transformers``' own torch SSD at every width tried (``bench_results/mamba2_train.md``).
* ``fused``: the selective layer's scan (:func:`~compressm_tune.models.selective.scan_readout`:
  the Triton kernel on CUDA, the C kernel on CPU float32, its torch path elsewhere), which
  stores no ``(B, L, E, N)`` tensor, fed by :meth:`_fold`: the heads' channels are its
  channels, with the groups folded into the batch (each group's channels share
  ``B_t``/``C_t``) and each head's scalar decay moved into its step size and input:
  ``exp(delta A) = exp(-delta')`` and ``delta x = delta' x'`` with ``delta' = delta |A|``,
  ``x' = x / |A|``, so one ``A = -1`` serves every group. The transform is elementwise torch,
  so autograd carries the gradients through it into the kernel's backward. Which scan is
  faster on a GPU has not been measured yet (``benchmarks/gpu_check.sh`` times both:
  ``bench_mamba2_train.py --device cuda``), so ``ssd`` stays the default there too.

State importance always runs on the folded scan (:meth:`scan_inputs`, scored by the fused
kernels). :meth:`step` computes the recurrence as written above, and so checks both.

Streaming keeps the network's contract of one state tensor per layer: ``(batch, (E + 2GN)
(K - 1) + E N)``, flat: the last ``K - 1`` conv inputs of every ``xBC`` channel, ``(E + 2GN,
K - 1)``, then the SSM state ``(nh, P, N)``, both in ``transformers``' cache layout
(:meth:`split_state` returns the two views).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compressm_tune.errors import ConfigError
from compressm_tune.models.selective import SelectiveLayer, keep_state_indices, scan_readout

__all__ = ["MAMBA2_SCANS", "Mamba2Layer", "check_mamba2_scan", "ssd_scan"]

# how Mamba2Layer.forward runs its scan: the chunked SSD in torch, or the selective
# layer's fused kernel over the folded groups (module docstring)
MAMBA2_SCANS = ("ssd", "fused")


def check_mamba2_scan(scan: str, name: str = "scan") -> None:
    """A one-line :class:`ConfigError` naming ``name`` (the setting as the user wrote it)
    unless ``scan`` is one of :data:`MAMBA2_SCANS`."""
    if scan not in MAMBA2_SCANS:
        raise ConfigError(f"{name} must be one of {', '.join(MAMBA2_SCANS)}, got {scan!r}")

_SSD_CHUNK = 64  # steps per chunk: (T, T) products inside, L / T recurrence steps between


def ssd_scan(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, chunk: int = _SSD_CHUNK, return_state: bool = False,
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2's scan in chunked (SSD) form, from a zero state, without the ``D x`` term.

    ``h_t[k] = exp(delta_t[k] A[k]) h_{t-1}[k] + delta_t[k] x_t[k] (x) B_t[g(k)]`` and
    ``y_t[k] = h_t[k] C_t[g(k)]`` for ``x (b, L, nh, P)``, ``delta (b, L, nh)``, ``A (nh,)``
    (< 0), ``B, C (b, L, G, N)``; head ``k`` reads group ``g(k) = k // (nh / G)``. Returns ``y
    (b, L, nh, P)`` and, with ``return_state``, the last state ``h_L (b, nh, P, N)``.

    Inside a chunk ``y_t = sum_{s <= t} exp(cs_t - cs_s) (C_t . B_s) delta_s x_s`` with ``cs``
    the cumulative ``delta A`` (a masked matrix product), plus the chunk's start state decayed
    to ``t``; start states follow from each chunk's end state in a recurrence over ``L / T``
    chunks. Decays are formed in float32 at least (under autocast too).

    Examples
    --------
    >>> x, B = torch.ones(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    >>> ssd_scan(x, torch.ones(1, 3, 1), torch.tensor([-0.5]), B, B).flatten()
    tensor([1.0000, 1.6065, 1.9744])
    """
    b, length, nh, p = x.shape
    g, n = B.shape[2], B.shape[3]
    t = min(chunk, length)
    pad = -length % t
    if pad:  # zero steps: no drive, decay exp(0) = 1, so the last state is unchanged
        x, delta, B, C = (torch.cat((v, v.new_zeros(b, pad, *v.shape[2:])), 1)
                          for v in (x, delta, B, C))
    nc = x.shape[1] // t
    wide = torch.promote_types(delta.dtype, torch.float32)
    x = (x * delta[..., None]).reshape(b, nc, t, g, nh // g, p)  # delta x, (b, c, T, G, hg, P)
    B, C = (v.reshape(b, nc, t, g, n) for v in (B, C))
    cs = torch.cumsum((delta.to(wide) * A.to(wide)).reshape(b, nc, t, g, nh // g), 2)
    seg = cs.permute(0, 1, 3, 4, 2)  # (b, c, G, hg, T)
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp((seg[..., :, None] - seg[..., None, :]).masked_fill(~causal, -math.inf))
    scores = torch.einsum("bctgn,bcsgn->bcgts", C, B)[:, :, :, None] * decay  # (b,c,G,hg,T,T)
    y = torch.einsum("bcghts,bcsghp->bctghp", scores.to(x.dtype), x)  # within chunks
    to_end = torch.exp(cs[:, :, -1:] - cs)  # (b, c, T, G, hg) decay from step s to the end
    ends = torch.einsum("bcsgn,bcsghp->bcghpn", B, x * to_end[..., None].to(x.dtype))
    across = torch.exp(cs[:, :, -1])[..., None, None]  # (b, c, G, hg, 1, 1) a chunk's decay
    state = x.new_zeros(b, g, nh // g, p, n, dtype=torch.promote_types(x.dtype, wide))
    starts = []
    for c in range(nc):  # each chunk's start state
        starts.append(state)
        state = across[:, c] * state + ends[:, c]
    start = torch.stack(starts, 1).to(x.dtype)  # (b, c, G, hg, P, N)
    y = y + torch.einsum("bctgn,bcghpn->bctghp", C, start) * torch.exp(cs)[..., None].to(x.dtype)
    y = y.reshape(b, nc * t, nh, p)[:, :length]
    return (y, state.reshape(b, nh, p, n)) if return_state else y


class Mamba2Layer(nn.Module):
    """One Mamba-2 mixer, ``(batch, L, H) -> (batch, L, H)`` (see the module docstring).

    Parameters
    ----------
    d_model : int
        H, the input and output width.
    state_dim : int
        N, Mamba-2's ``d_state``.
    head_dim : int, optional
        P, channels per head; ``E = expand * H`` must be a multiple. Default ``min(64, E)``.
    n_groups : int
        G, groups of heads sharing ``B``/``C`` (and the gated norm's groups); divides the
        number of heads.
    expand, d_conv : int
        ``E = expand * H``; kernel of the causal depthwise convolution.
    bias, conv_bias : bool
        Biases of ``in_proj``/``out_proj`` and of the convolution.
    dt_limit : tuple of float, optional
        ``(low, high)`` clamp of the step size after softplus (``time_step_limit``).
    norm_eps : float
        The gated RMSNorm's epsilon.
    scan : {"ssd", "fused"}
        How :meth:`forward` runs the scan: ``ssd`` (:func:`ssd_scan`, matmuls in torch) or
        ``fused`` (the selective layer's fused kernel over the folded groups: Triton on CUDA,
        C on CPU); see the module docstring. An attribute: a trainer may set it.

    Examples
    --------
    >>> layer = Mamba2Layer(d_model=8, state_dim=4, head_dim=4, n_groups=2)
    >>> layer(torch.randn(2, 5, 8)).shape, layer.allocate_state(2).shape
    (torch.Size([2, 5, 8]), torch.Size([2, 160]))
    """

    # No weight decay and the SSM learning-rate factor, as the selective layer's.
    recurrence_parameters = SelectiveLayer.recurrence_parameters

    def __init__(
        self,
        d_model: int,
        state_dim: int,
        head_dim: int | None = None,
        n_groups: int = 1,
        expand: int = 2,
        d_conv: int = 4,
        bias: bool = False,
        conv_bias: bool = True,
        dt_limit: tuple[float, float] | None = None,
        norm_eps: float = 1e-5,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        scan: str = "ssd",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        e = expand * d_model
        p = head_dim or min(64, e)
        if min(d_model, state_dim, p, n_groups, expand, d_conv) < 1:
            raise ConfigError(f"d_model, state_dim, head_dim, n_groups, expand, d_conv >= 1 "
                              f"must hold, got {d_model=} {state_dim=} {p=} {n_groups=} "
                              f"{expand=} {d_conv=}")
        if e % p or (e // p) % n_groups:
            raise ConfigError(f"head_dim must divide expand * d_model = {e} and n_groups the "
                              f"number of heads, got head_dim={p} n_groups={n_groups}")
        if dt_limit is not None and not 0.0 <= dt_limit[0] < dt_limit[1]:
            raise ConfigError(f"dt_limit must be (low, high) with 0 <= low < high, got "
                              f"{dt_limit!r}")
        check_mamba2_scan(scan)
        kw = {"device": device, "dtype": dtype}
        nh, g, n, k = e // p, n_groups, state_dim, d_conv
        self.scan = scan
        self.d_model, self.d_inner, self.d_conv = d_model, e, d_conv
        self.n_heads, self.head_dim, self.n_groups = nh, p, g
        self.dt_limit = None if dt_limit is None else (float(dt_limit[0]), float(dt_limit[1]))
        self.norm_eps = norm_eps
        self.in_proj = nn.Linear(d_model, 2 * e + nh, bias=bias, **kw)  # z, x, dt rows
        bound = 1 / math.sqrt(d_model)  # nn.Linear's default init
        self.bc_proj = nn.Parameter(torch.empty(2, g, n, d_model, **kw).uniform_(-bound, bound))
        self.bc_bias = (nn.Parameter(torch.empty(2, g, n, **kw).uniform_(-bound, bound))
                        if bias else None)
        self.conv1d = nn.Conv1d(e, e, k, groups=e, padding=k - 1, bias=conv_bias, **kw)  # x
        bound = 1 / math.sqrt(k)  # nn.Conv1d's default init, depthwise
        self.bc_conv = nn.Parameter(torch.empty(2, g, n, k, **kw).uniform_(-bound, bound))
        self.bc_conv_bias = (nn.Parameter(torch.empty(2, g, n, **kw).uniform_(-bound, bound))
                             if conv_bias else None)
        dt = torch.exp(torch.rand(nh, **kw) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp_min(1e-4)  # (nh,) as transformers
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, nh + 1, **kw)))  # (nh,) A = -k
        self.D = nn.Parameter(torch.ones(nh, **kw))  # (nh,)
        self.norm_weight = nn.Parameter(torch.ones(e, **kw))  # the gated RMSNorm's
        self.out_proj = nn.Linear(e, d_model, bias=bias, **kw)
        # which axis of each state-sized parameter indexes the state: what a truncation slices
        self.state_axes = {name: 2 for name in ("bc_proj", "bc_bias", "bc_conv", "bc_conv_bias")
                           if getattr(self, name) is not None}

    @property
    def state_dim(self) -> int:
        """Current state width N (changes after a reduction)."""
        return self.bc_proj.shape[2]

    def _project(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z (..., E)``, ``xBC (..., E + 2GN)`` before the convolution, ``dt (..., nh)``."""
        e, nh = self.d_inner, self.n_heads
        z, x, dt = self.in_proj(u).split([e, e, nh], dim=-1)
        bc = u @ self.bc_proj.reshape(-1, self.d_model).T  # (..., 2GN)
        if self.bc_bias is not None:
            bc = bc + self.bc_bias.reshape(-1)
        return z, torch.cat((x, bc), -1), dt

    def _conv_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The depthwise kernel ``(E + 2GN, K)`` and bias over all ``xBC`` channels."""
        weight = torch.cat((self.conv1d.weight[:, 0], self.bc_conv.reshape(-1, self.d_conv)))
        if self.bc_conv_bias is None:
            return weight, None
        return weight, torch.cat((self.conv1d.bias, self.bc_conv_bias.reshape(-1)))

    def _split_xbc(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (..., E)``, ``B, C (..., G, N)`` out of the convolved ``xBC``."""
        gn = self.n_groups * self.state_dim
        x, b, c = xbc.split([self.d_inner, gn, gn], dim=-1)
        shape = (*xbc.shape[:-1], self.n_groups, self.state_dim)
        return x, b.reshape(shape), c.reshape(shape)

    def _delta(self, dt: torch.Tensor) -> torch.Tensor:
        """Step size per head, ``(..., nh)``."""
        delta = F.softplus(dt + self.dt_bias)
        if self.dt_limit is not None:
            delta = delta.clamp(*self.dt_limit)
        return delta

    def _ssm_inputs(self, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``z``, ``x (B, L, E)``, ``B, C (B, L, G, N)``, ``delta (B, L, nh)`` for ``u``."""
        z, xbc, dt = self._project(u)
        weight, bias = self._conv_parameters()
        length = u.shape[1]
        xbc = F.conv1d(xbc.transpose(1, 2), weight[:, None], bias, padding=self.d_conv - 1,
                       groups=len(weight))[..., :length]  # (B, E + 2GN, L) causal
        x, b, c = self._split_xbc(F.silu(xbc.transpose(1, 2)))
        return z, x, b, c, self._delta(dt)

    def _fold(self, x: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
              delta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The scan's ``delta', A, B_t, C_t, x'`` with the groups folded into the batch:
        ``(batch G, L, E / G)`` channels, ``A = -1 (E / G, N)`` (module docstring)."""
        batch, length = x.shape[:2]
        g, nh, p = self.n_groups, self.n_heads, self.head_dim
        rate = self.A_log.exp()  # (nh,) |A|

        def fold(t: torch.Tensor) -> torch.Tensor:  # (B, L, G, ...) -> (B G, L, ...)
            return t.transpose(1, 2).reshape(batch * g, length, -1)

        delta = (delta * rate)[..., None].expand(batch, length, nh, p)  # (B, L, nh, P)
        x = x.reshape(batch, length, nh, p) / rate[:, None]  # (B, L, nh, P)
        delta, x = (t.reshape(batch, length, g, -1) for t in (delta, x))
        A = x.new_full((self.d_inner // g, self.state_dim), -1.0)  # (E / G, N)
        return fold(delta), A, fold(b), fold(c), fold(x)

    def scan_inputs(self, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the scan receives for layer inputs ``u (batch, L, H)``: ``delta', A, B_t,
        C_t, x'`` with the groups folded into the batch (see :meth:`SelectiveLayer.scan_inputs`
        and the module docstring); state importance scores these."""
        _, x, b, c, delta = self._ssm_inputs(u)
        return self._fold(x, b, c, delta)

    def _gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``rmsnorm(y * silu(z))`` over each group's ``E / G`` channels, times the weight
        (``transformers``' ``Mamba2RMSNormGated``: in float32, or float64 for float64)."""
        dtype = y.dtype
        wide = torch.promote_types(dtype, torch.float32)
        h = y.to(wide) * F.silu(z.to(wide))
        h = h.reshape(*h.shape[:-1], self.n_groups, -1)
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.norm_eps)
        return self.norm_weight * h.reshape(y.shape).to(dtype)

    def _scan(self, x: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
              delta: torch.Tensor) -> torch.Tensor:
        """The scan's read-out ``y (B, L, E)``, without ``D x``, as :attr:`scan` says:
        :func:`ssd_scan`, or :func:`~compressm_tune.models.selective.scan_readout` over the
        folded groups (:meth:`_fold`; its fused kernel where one applies), unfolded."""
        batch, length = x.shape[:2]
        if self.scan == "ssd":
            return ssd_scan(x.reshape(batch, length, self.n_heads, self.head_dim), delta,
                            -self.A_log.exp(), b, c).reshape(x.shape)
        y = scan_readout(*self._fold(x, b, c, delta))  # (B G, L, E / G)
        return y.reshape(batch, self.n_groups, length, -1).transpose(1, 2).reshape(
            x.shape).to(x.dtype)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """``u (batch, L, H) -> (batch, L, H)``."""
        z, x, b, c, delta = self._ssm_inputs(u)
        y = self._scan(x, b, c, delta) + self.D.repeat_interleave(self.head_dim) * x
        return self.out_proj(self._gated_norm(y, z))

    def allocate_state(
        self, batch_size: int, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """A zero streaming state ``(batch, (E + 2GN)(K - 1) + E N)`` for :meth:`step`."""
        channels = self.d_inner + 2 * self.n_groups * self.state_dim
        width = channels * (self.d_conv - 1) + self.d_inner * self.state_dim
        ref = self.A_log
        return torch.zeros(batch_size, width, device=device or ref.device,
                           dtype=dtype or ref.dtype)

    def split_state(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of a streaming state: the conv window ``(batch, E + 2GN, K - 1)`` and the SSM
        state ``(batch, nh, P, N)``, ``transformers``' cache layouts."""
        channels = self.d_inner + 2 * self.n_groups * self.state_dim
        conv, ssm = state.split([channels * (self.d_conv - 1), self.d_inner * self.state_dim],
                                dim=-1)
        return (conv.reshape(-1, channels, self.d_conv - 1),
                ssm.reshape(-1, self.n_heads, self.head_dim, self.state_dim))

    def step(self, u_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance one token: ``u_t (batch, H)``, ``state`` as :meth:`allocate_state`."""
        window, ssm = self.split_state(state)  # (B, C, K - 1), (B, nh, P, N)
        z, xbc, dt = self._project(u_t)  # (B, E), (B, C), (B, nh)
        weight, bias = self._conv_parameters()
        window = torch.cat((window, xbc[:, :, None]), -1)  # (B, C, K)
        xbc = (window * weight).sum(-1)
        if bias is not None:
            xbc = xbc + bias
        x, b, c = self._split_xbc(F.silu(xbc))  # (B, E), (B, G, N) x2
        delta = self._delta(dt)  # (B, nh)
        heads = self.n_heads // self.n_groups
        b, c = (t.repeat_interleave(heads, dim=1) for t in (b, c))  # (B, nh, N) per head
        xh = x.reshape(-1, self.n_heads, self.head_dim)  # (B, nh, P)
        decay = torch.exp(-delta * self.A_log.exp())  # (B, nh)
        ssm = decay[..., None, None] * ssm + (delta[..., None] * xh)[..., None] * b[:, :, None]
        y = (ssm @ c[..., None]).squeeze(-1) + self.D[:, None] * xh  # (B, nh, P)
        out = self.out_proj(self._gated_norm(y.reshape(x.shape), z))
        return out, torch.cat((window[:, :, 1:].flatten(1), ssm.flatten(1)), -1)

    @torch.no_grad()
    def state_magnitude(self) -> torch.Tensor:
        """Weight magnitude of every state, ``|W_B[n]| |W_C[n]|`` over groups, ``(N,)``: what
        magnitude pruning ranks by, since all states of a head share its decay."""
        norms = self.bc_proj.square().sum((1, 3)).sqrt()  # (2, N)
        return norms[0] * norms[1]

    def keep_states(self, keep: torch.Tensor) -> None:
        """Model surgery: keep only the state indices ``keep`` (ascending, unique) in every
        group; new ``nn.Parameter`` objects, the kept states unchanged (see
        :meth:`SelectiveLayer.keep_states`)."""
        keep_state_indices(self, keep)
