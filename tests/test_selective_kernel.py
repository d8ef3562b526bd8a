"""The fused kernels of the selective (S6) scan (C on CPU, Triton on CUDA or in Triton's
interpreter) against the torch path in float64.

The torch path (``discretize`` + ``selective_scan`` + the read-out) is the reference: it is what
runs on GPU, in float64 and without a compiler, and the selective-layer tests check it against a
plain time loop. Here the kernel's forward and every gradient must match it, on shapes that hit
the edges (L=1, N=1, batch 1, odd sizes, long sequences) and in three decay regimes.
"""

from __future__ import annotations

import math

import pytest
import torch

from compressm_tune.models import SelectiveLayer, _triton, selective
from compressm_tune.models.selective import selective_scan

needs_kernel = pytest.mark.skipif(
    selective._scan_kernel is None,
    reason="selective C kernel not built (no compiler at install time, or a stale extension)",
)
needs_triton = pytest.mark.skipif(not _triton.available(), reason="triton is not installed")
# Triton runs on CUDA where there is one, else in its interpreter (tests/conftest.py)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [pytest.param("c", marks=needs_kernel),
            pytest.param("triton", marks=[pytest.mark.triton, needs_triton])]

# (batch, L, H, N, regime): decays a = exp(delta A) in (0, 1)
#   "typical": delta log-uniform in [1e-3, 1e-1] (Mamba's init), A = -(1..N) (S4D-real init)
#   "strong":  delta in [0.1, 1], A = -(1..N): a down to exp(-N), underflowing for N >= 88
#   "near-1":  delta in [1e-3, 1e-2], A in [-1, -0.01]: a >= 0.99, states add up over L
SHAPES = [
    (2, 1, 3, 4, "typical"),  # L = 1: no recurrence at all
    (3, 17, 5, 1, "typical"),  # N = 1
    (1, 33, 7, 9, "strong"),  # batch 1, odd sizes
    (4, 40, 16, 128, "strong"),  # the benchmark's N, decays far below float32's range
    (2, 500, 3, 16, "strong"),  # long L
    (2, 500, 3, 16, "near-1"),  # long L, slowly decaying states
    (5, 64, 6, 13, "near-1"),
    (2, 257, 5, 12, "typical"),  # L not a multiple of any chunk, H and N not powers of 2
    (1, 1030, 3, 7, "near-1"),  # long, slowly decaying
]


def _inputs(batch, length, h, n, regime, seed=0):
    """float64 leaves: delta, u (B, L, H); A_log (H, N); Bt, Ct (B, L, N)."""
    g = torch.Generator().manual_seed(seed)

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)

    if regime == "typical":
        delta = torch.exp(uniform(math.log(1e-3), math.log(1e-1), batch, length, h))
        a_mag = torch.arange(1, n + 1, dtype=torch.float64).repeat(h, 1)  # (H, N)
    elif regime == "strong":
        delta = uniform(0.1, 1.0, batch, length, h)
        a_mag = torch.arange(1, n + 1, dtype=torch.float64).repeat(h, 1)  # (H, N)
    else:
        delta = uniform(1e-3, 1e-2, batch, length, h)
        a_mag = uniform(0.01, 1.0, h, n)
    leaves = {
        "delta": delta,
        "A_log": torch.log(a_mag),
        "Bt": torch.randn(batch, length, n, generator=g, dtype=torch.float64),
        "Ct": torch.randn(batch, length, n, generator=g, dtype=torch.float64),
        "u": torch.randn(batch, length, h, generator=g, dtype=torch.float64),
    }
    return {k: v.requires_grad_() for k, v in leaves.items()}


def _torch_path(delta, A_log, Bt, Ct, u):
    """The layer's torch path from its discretized quantities: ``y (B, L, H)``."""
    A = -torch.exp(A_log)  # (H, N)
    a = torch.exp(delta[..., None] * A)  # (B, L, H, N)
    b = (delta * u)[..., None] * Bt[..., None, :]  # (B, L, H, N)
    return (selective_scan(a, b) @ Ct[..., None]).squeeze(-1)  # (B, L, H)


def _kernel_path(backend):
    def path(delta, A_log, Bt, Ct, u):
        return selective._FusedSelectiveScan.apply(delta, -torch.exp(A_log), Bt, Ct, u, backend)
    return path


def _run(path, leaves, grad_y):
    """Output and the gradients of ``sum(y * grad_y)`` with respect to every leaf."""
    y = path(**leaves)
    grads = torch.autograd.grad(y, list(leaves.values()), grad_y)
    return y, dict(zip(leaves, grads, strict=True))


def _assert_close(got, want, rtol, name):
    """Max error relative to the reference's largest entry (float32 has ~7 digits of range)."""
    scale = want.abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert err <= rtol * scale + 1e-30, f"{name}: max error {err:.3g} > {rtol} * {scale:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,length,h,n,regime", SHAPES)
def test_kernel_forward_and_gradients_match_torch_path(batch, length, h, n, regime, backend):
    ref_leaves = _inputs(batch, length, h, n, regime)
    grad_y = torch.randn(batch, length, h, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    y_ref, g_ref = _run(_torch_path, ref_leaves, grad_y)
    device = "cpu" if backend == "c" else TRITON_DEVICE
    leaves = {k: v.detach().float().to(device).requires_grad_() for k, v in ref_leaves.items()}
    y, g = _run(_kernel_path(backend), leaves, grad_y.float().to(device))
    assert y.dtype == torch.float32 and y.shape == (batch, length, h)
    # on a GPU, tl.exp is the hardware's approximate exp2: a few ulp more than libm
    rtol = 2e-6 if backend == "c" else 1e-5
    _assert_close(y.cpu(), y_ref, rtol, "y")
    for name in ref_leaves:
        assert g[name].shape == g_ref[name].shape
        _assert_close(g[name].cpu(), g_ref[name], 10 * rtol, f"grad {name}")


@needs_kernel
def test_decay_matches_exp_over_float32_range():
    """``a = exp(delta A)`` over the whole range: an impulse at t=0 read out at t=1 is
    ``exp(delta_1 A)`` per channel; below exp(-87.3) (under FLT_MIN) it is 0."""
    exponents = torch.cat((-torch.logspace(-6, math.log10(87.0), 500, dtype=torch.float64),
                           torch.tensor([-88.0, -100.0, -1e4], dtype=torch.float64)))  # (H,)
    h = len(exponents)
    delta = torch.ones(1, 2, h)  # (B, L, H)
    A = exponents.float()[:, None]  # (H, N=1)
    ones = torch.ones(1, 2, 1)  # (B, L, N)
    u = torch.zeros(1, 2, h)  # (B, L, H)
    u[:, 0] = 1.0  # impulse: x_0 = 1, x_1 = a_1
    y = selective._FusedSelectiveScan.apply(delta, A, ones, ones, u, "c")[0, 1].double()  # (H,)
    want = torch.exp(exponents.float().double())
    normal = want > 1.2e-38
    rel = ((y - want).abs() / want)[normal]
    assert rel.max() < 5e-7, f"exp error {rel.max():.3g} relative (float32 eps 1.2e-7)"
    assert (y[~normal].abs() <= 1.2e-38).all()


@needs_kernel
def test_threads_give_identical_results_except_summation_order_of_grad_A():
    """Parallel over the batch: per-sequence outputs and gradients are bit-identical for 1 and
    2 threads; grad A sums per-thread accumulators, so only its rounding may differ."""
    leaves = {k: v.detach().float() for k, v in _inputs(5, 70, 6, 13, "typical").items()}
    grad_y = torch.randn(5, 70, 6, generator=torch.Generator().manual_seed(2))
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            run = {k: v.clone().requires_grad_() for k, v in leaves.items()}
            results.append(_run(_kernel_path("c"), run, grad_y))
    finally:
        torch.set_num_threads(old)
    (y1, g1), (y2, g2) = results
    assert torch.equal(y1, y2)
    for name in ("delta", "Bt", "Ct", "u"):
        assert torch.equal(g1[name], g2[name]), name
    torch.testing.assert_close(g1["A_log"], g2["A_log"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the layer


def _layer_grads(layer, u, grad_y):
    u = u.clone().requires_grad_()
    y = layer(u)
    names = [name for name, _ in layer.named_parameters()]
    grads = torch.autograd.grad(y, [*layer.parameters(), u], grad_y)
    return y, dict(zip([*names, "u"], grads, strict=True))


@needs_kernel
@pytest.mark.parametrize("batch,length,h,n", [(3, 1, 4, 8), (2, 45, 5, 1), (1, 30, 17, 33),
                                              (4, 200, 8, 16)])
def test_layer_uses_kernel_and_matches_float64_torch_path(batch, length, h, n, monkeypatch):
    """Every parameter's gradient (the projections, dt_bias, A_log, D) and the input's, with a
    non-contiguous input as the block passes it (BatchNorm over a transposed view)."""
    torch.manual_seed(length)
    layer = SelectiveLayer(d_model=h, state_dim=n)
    with torch.no_grad():
        layer.D.normal_()  # D = 1 at init: make its gradient distinguishable from u's
    ref = SelectiveLayer(d_model=h, state_dim=n, dtype=torch.float64)
    ref.load_state_dict(layer.state_dict())
    u64 = torch.randn(batch, h, length, dtype=torch.float64).transpose(1, 2)  # (B, L, H) strided
    grad_y = torch.randn(batch, length, h, dtype=torch.float64)
    y_ref, g_ref = _layer_grads(ref, u64, grad_y)

    def boom(*args):
        raise AssertionError("float32 on CPU ran the torch scan with the kernel built")

    monkeypatch.setattr(selective, "selective_scan", boom)
    y, g = _layer_grads(layer, u64.float(), grad_y.float())
    _assert_close(y, y_ref, 2e-6, "y")
    for name in g_ref:
        _assert_close(g[name], g_ref[name], 2e-5, f"grad {name}")


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("batch,length,h,n", [(2, 1, 4, 8), (3, 77, 6, 23)])
def test_layer_triton_path_matches_float64_torch_path(batch, length, h, n, monkeypatch):
    """The layer on the Triton path (CUDA, or the interpreter on CPU), every gradient."""
    torch.manual_seed(length)
    layer = SelectiveLayer(d_model=h, state_dim=n).to(TRITON_DEVICE)
    ref = SelectiveLayer(d_model=h, state_dim=n, dtype=torch.float64)
    ref.load_state_dict(layer.state_dict())
    u64 = torch.randn(batch, length, h, dtype=torch.float64)
    grad_y = torch.randn(batch, length, h, dtype=torch.float64)
    y_ref, g_ref = _layer_grads(ref, u64, grad_y)
    if TRITON_DEVICE == "cpu":  # the layer picks the C kernel on CPU: route it to Triton
        monkeypatch.setattr(selective, "fused_backend", lambda *a: "triton")
    monkeypatch.setattr(selective, "selective_scan", None)  # the torch path must not run
    y, g = _layer_grads(layer, u64.float().to(TRITON_DEVICE), grad_y.float().to(TRITON_DEVICE))
    _assert_close(y.cpu(), y_ref, 1e-5, "y")
    for name in g_ref:
        _assert_close(g[name].cpu(), g_ref[name], 1e-4, f"grad {name}")


@needs_kernel
def test_layer_without_kernel_gives_same_outputs(monkeypatch):
    """An install without a compiler (``_scan_kernel = None``) runs the torch path instead."""
    torch.manual_seed(0)
    layer = SelectiveLayer(d_model=6, state_dim=10)
    u = torch.randn(3, 50, 6)
    grad_y = torch.randn(3, 50, 6)
    y_kernel, g_kernel = _layer_grads(layer, u, grad_y)

    def boom(*args):
        raise AssertionError("the kernel ran although it is disabled")

    monkeypatch.setattr(selective, "_scan_kernel", None)
    monkeypatch.setattr(selective._FusedSelectiveScan, "apply", boom)
    y_torch, g_torch = _layer_grads(layer, u, grad_y)
    torch.testing.assert_close(y_kernel, y_torch, rtol=1e-5, atol=1e-5)
    for name in g_torch:
        torch.testing.assert_close(g_kernel[name], g_torch[name], rtol=1e-4, atol=1e-4)


def test_float64_uses_torch_path(monkeypatch):
    def boom(*args):
        raise AssertionError("C kernel used for float64")

    monkeypatch.setattr(selective._FusedSelectiveScan, "apply", boom)
    layer = SelectiveLayer(d_model=3, state_dim=4, dtype=torch.float64)
    assert layer(torch.randn(2, 5, 3, dtype=torch.float64)).shape == (2, 5, 3)
