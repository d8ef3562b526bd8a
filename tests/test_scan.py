"""The diagonal complex scan: C kernel, Triton kernel (CUDA, or Triton's interpreter on CPU) and
chunked torch path against a numpy loop, and its hand-written backward against autograd through
a plain torch loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import np_scan, to_complex

from compressm_tune.models import _scan, _triton
from compressm_tune.models._scan import kernel_available, linear_scan

needs_kernel = pytest.mark.skipif(
    not kernel_available(), reason="C scan kernel not built (no compiler at install time)"
)

LENGTHS = [1, 63, 64, 65, 1000]  # around the torch path's chunk length (64) and a long one

needs_triton = pytest.mark.skipif(not _triton.available(), reason="triton is not installed")
# Triton runs on CUDA where there is one, else in its interpreter (tests/conftest.py)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# around the Triton kernel's chunk (32 steps) and the 257 and 1030
TRITON_LENGTHS = [1, 31, 32, 33, 257, 1030]


def _inputs(length, batch=3, n=5, dtype=torch.float32, seed=0, with_x0=False):
    """Random lam with |lam| in [0.5, 0.999] (incl. a real and a near-unit pole), v, x0."""
    g = torch.Generator().manual_seed(seed)
    radius = 0.5 + 0.499 * torch.rand(n, generator=g, dtype=torch.float64)
    radius[0] = 0.999
    phase = 2 * np.pi * torch.rand(n, generator=g, dtype=torch.float64)
    phase[1] = 0.0  # a real eigenvalue
    lam = torch.stack((radius * torch.cos(phase), radius * torch.sin(phase)), -1).to(dtype)
    v = torch.randn(batch, length, n, 2, generator=g, dtype=torch.float64).to(dtype)
    x0 = torch.randn(batch, n, 2, generator=g, dtype=torch.float64).to(dtype) if with_x0 else None
    return lam, v, x0


def _expected(lam, v, x0, reverse):
    return np_scan(to_complex(lam), to_complex(v), None if x0 is None else to_complex(x0), reverse)


def _assert_close(got, want, rtol):
    got = to_complex(got)
    scale = np.abs(want).max()
    err = np.abs(got - want).max()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} * max|x| ({scale:.3g})"


# ----------------------------------------------------------------------------- forward


@needs_kernel
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_x0", [False, True])
@pytest.mark.parametrize("length", LENGTHS)
def test_c_kernel_matches_numpy_loop(length, with_x0, reverse):
    lam, v, x0 = _inputs(length, with_x0=with_x0, seed=length)
    got = _scan._scan_c(lam, v, x0, reverse)
    assert got.shape == v.shape and got.dtype == torch.float32
    _assert_close(got, _expected(lam, v, x0, reverse), rtol=2e-5)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-11), (torch.float32, 5e-5)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_x0", [False, True])
@pytest.mark.parametrize("length", LENGTHS)
def test_torch_chunked_matches_numpy_loop(length, with_x0, reverse, dtype, rtol):
    lam, v, x0 = _inputs(length, with_x0=with_x0, seed=length, dtype=dtype)
    got = _scan._scan_torch(lam, v, x0, reverse)
    assert got.shape == v.shape and got.dtype == dtype
    _assert_close(got, _expected(lam, v, x0, reverse), rtol=rtol)


@needs_kernel
def test_c_kernel_uses_all_threads_consistently():
    """The kernel is parallel over the batch: 1 thread and 2 threads give identical bits."""
    lam, v, x0 = _inputs(300, batch=7, n=33, with_x0=True)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _scan._scan_c(lam, v, x0, False)
        torch.set_num_threads(2)
        two = _scan._scan_c(lam, v, x0, False)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_c_kernel_accepts_non_contiguous_inputs():
    """A strided v (e.g. a transposed view) must be read in logical order, not memory order."""
    lam, v, _ = _inputs(70, batch=4)
    v_strided = v.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not v_strided.is_contiguous()
    want = _expected(lam, v, None, False)
    _assert_close(linear_scan(lam, v_strided), want, rtol=2e-5)
    _assert_close(linear_scan(lam.double(), v_strided.double()), want, rtol=1e-6)


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_x0", [False, True])
@pytest.mark.parametrize("length", TRITON_LENGTHS)
def test_triton_kernel_matches_numpy_loop(length, with_x0, reverse):
    # 45 states: one full block of 32 and a ragged one; fewer on the longest sequence
    n = 5 if length > 500 else 45
    lam, v, x0 = _inputs(length, n=n, with_x0=with_x0, seed=length)
    dev = [None if t is None else t.to(TRITON_DEVICE) for t in (lam, v, x0)]
    got = _triton.lru_scan(*dev, reverse)
    assert got.shape == v.shape and got.dtype == torch.float32
    _assert_close(got.cpu(), _expected(lam, v, x0, reverse), rtol=2e-5)


@pytest.mark.triton
@needs_triton
def test_triton_kernel_poles_near_zero_and_one():
    """|lam| = 0 (the state forgets at once), 1e-4, and 0.9999 over 1030 steps."""
    lam, v, x0 = _inputs(1030, n=4, with_x0=True, seed=4)
    lam[0] = torch.tensor([0.0, 0.0])
    lam[1] = torch.tensor([1e-4, 0.0])
    lam[2] = torch.tensor([0.9999 * np.cos(0.3), 0.9999 * np.sin(0.3)])
    got = _triton.lru_scan(lam.to(TRITON_DEVICE), v.to(TRITON_DEVICE), x0.to(TRITON_DEVICE),
                           False)
    _assert_close(got.cpu(), _expected(lam, v, x0, False), rtol=2e-5)


@needs_kernel
def test_dispatch_float32_cpu_uses_kernel(monkeypatch):
    lam, v, x0 = _inputs(65, with_x0=True)

    def boom(*args):
        raise AssertionError("torch path used for float32 on CPU with the kernel built")

    monkeypatch.setattr(_scan, "_scan_torch", boom)
    _assert_close(linear_scan(lam, v, x0), _expected(lam, v, x0, False), rtol=2e-5)


def test_dispatch_float64_uses_torch_path(monkeypatch):
    lam, v, x0 = _inputs(65, with_x0=True, dtype=torch.float64)

    def boom(*args):
        raise AssertionError("C kernel used for float64")

    monkeypatch.setattr(_scan, "_scan_c", boom)
    _assert_close(linear_scan(lam, v, x0), _expected(lam, v, x0, False), rtol=1e-11)


def test_fallback_without_kernel_gives_same_result(monkeypatch):
    """An install without a compiler (``_scan_kernel = None``) still computes the scan."""
    lam, v, x0 = _inputs(130, with_x0=True)
    monkeypatch.setattr(_scan, "_scan_kernel", None)
    assert not _scan.kernel_available()
    _assert_close(linear_scan(lam, v, x0), _expected(lam, v, x0, False), rtol=5e-5)


def test_docstring_example():
    lam = torch.tensor([[0.5, 0.0]])
    v = torch.ones(1, 3, 1, 2)
    assert linear_scan(lam, v)[0, :, 0, 0].tolist() == [1.0, 1.5, 1.75]


# ----------------------------------------------------------------------------- gradients


def _loop_scan(lam, v, x0):
    """Plain real-arithmetic torch loop of the complex recurrence (autograd does the rest)."""
    re = torch.zeros_like(v[:, 0, :, 0]) if x0 is None else x0[..., 0]
    im = torch.zeros_like(v[:, 0, :, 1]) if x0 is None else x0[..., 1]
    out = []
    for t in range(v.shape[1]):
        re, im = (lam[:, 0] * re - lam[:, 1] * im + v[:, t, :, 0],
                  lam[:, 0] * im + lam[:, 1] * re + v[:, t, :, 1])
        out.append(torch.stack((re, im), -1))
    return torch.stack(out, 1)


def _grads(fn, lam, v, x0, weight):
    leaves = [t.detach().clone().requires_grad_(True) for t in (lam, v, x0)]
    x = fn(*leaves)
    loss = (x * weight).sum() + (x**2).mean()  # a linear and a quadratic term in x
    return torch.autograd.grad(loss, leaves)


@needs_kernel
@pytest.mark.parametrize("length", [1, 65, 300])
def test_c_path_gradients_match_loop_autograd(length):
    lam, v, x0 = _inputs(length, batch=2, n=6, with_x0=True, seed=10 + length)
    weight = torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
    got = _grads(linear_scan, lam, v, x0, weight)  # float32 -> C kernel forward and backward
    want = _grads(_loop_scan, lam.double(), v.double(), x0.double(), weight.double())
    for name, g, w in zip(("lam", "v", "x0"), got, want, strict=True):
        assert g.dtype == torch.float32
        err = (g.double() - w).abs().max().item()
        assert err <= 1e-4 * w.abs().max().item(), f"d/d{name}: max error {err:.3g}"


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("length", [1, 257, 1030])
def test_triton_path_gradients_match_loop_autograd(length):
    lam, v, x0 = _inputs(length, batch=2, n=37, with_x0=True, seed=20 + length)
    weight = torch.randn(v.shape, generator=torch.Generator().manual_seed(1))

    def triton_scan(lam, v, x0):
        return linear_scan(lam, v, x0, backend="triton")

    dev = [t.to(TRITON_DEVICE) for t in (lam, v, x0, weight)]
    got = _grads(triton_scan, *dev)
    want = _grads(_loop_scan, lam.double(), v.double(), x0.double(), weight.double())
    for name, g, w in zip(("lam", "v", "x0"), got, want, strict=True):
        assert g.dtype == torch.float32
        err = (g.cpu().double() - w).abs().max().item()
        assert err <= 1e-4 * w.abs().max().item(), f"d/d{name}: max error {err:.3g}"


def test_dispatch_rejects_an_unknown_backend():
    lam, v, _ = _inputs(3)
    with pytest.raises(ValueError, match="backend"):
        linear_scan(lam, v, backend="cuda")


def test_torch_path_gradients_match_loop_autograd_across_chunks():
    lam, v, x0 = _inputs(130, batch=2, n=4, with_x0=True, seed=3, dtype=torch.float64)
    weight = torch.randn(v.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = _grads(linear_scan, lam, v, x0, weight)
    want = _grads(_loop_scan, lam, v, x0, weight)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("with_x0", [False, True])
def test_torch_path_gradcheck(with_x0):
    lam, v, x0 = _inputs(7, batch=2, n=3, with_x0=with_x0, seed=5, dtype=torch.float64)
    lam.requires_grad_(True)
    v.requires_grad_(True)
    if x0 is not None:
        x0.requires_grad_(True)
    assert torch.autograd.gradcheck(linear_scan, (lam, v, x0), eps=1e-6, atol=1e-7)


def test_gradient_without_x0_grad_request():
    """x0 given but not requiring grad: lam and v still get the x0 term in their gradient."""
    lam, v, x0 = _inputs(20, batch=2, n=3, with_x0=True, seed=8, dtype=torch.float64)
    lam_a, v_a = lam.clone().requires_grad_(True), v.clone().requires_grad_(True)
    linear_scan(lam_a, v_a, x0).sum().backward()
    lam_b, v_b = lam.clone().requires_grad_(True), v.clone().requires_grad_(True)
    _loop_scan(lam_b, v_b, x0).sum().backward()
    torch.testing.assert_close(lam_a.grad, lam_b.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(v_a.grad, v_b.grad, rtol=1e-10, atol=1e-10)


def test_torch_path_handles_a_pole_at_zero():
    lam, v, x0 = _inputs(70, n=3, with_x0=True, seed=9)
    lam[2] = 0.0
    _assert_close(_scan._scan_torch(lam, v, x0, False), _expected(lam, v, x0, False), rtol=5e-5)


@needs_kernel
def test_double_backward_through_c_path_is_correct_or_refused():
    lam, v, _ = _inputs(10, batch=1, n=2, seed=4)

    def second_derivative(fn, lam, v):
        leaf = lam.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(leaf, v).pow(2).sum(), leaf, create_graph=True)
        return torch.autograd.grad(g.sum(), leaf)[0]

    want = second_derivative(lambda a, b: _loop_scan(a, b, None), lam.double(), v.double())
    try:
        got = second_derivative(linear_scan, lam, v)  # float32: C kernel
    except RuntimeError:
        return  # refusing double backward is fine
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)
