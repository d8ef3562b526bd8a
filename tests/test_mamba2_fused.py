"""Mamba-2 on the selective layer's fused scan (``Mamba2Layer(scan="fused")``, ``train
--mamba2-scan fused``): the groups folded into the batch and each head's decay moved into its
step size, run by the C kernel (CPU), the Triton kernel (CUDA, or Triton's interpreter on CPU)
or the selective layer's torch path (float64), against the chunked SSD in float64, which
``test_mamba2`` checks against a plain loop over time and ``transformers``' forward.

Each check also asserts which implementation ran, so it fails where the path is not taken.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from compressm_tune.errors import ConfigError
from compressm_tune.models import MAMBA2_SCANS, Mamba2Layer, _triton, mamba2, selective
from compressm_tune.training import TrainConfig, model_from_checkpoint

needs_kernel = pytest.mark.skipif(selective._scan_kernel is None,
                                  reason="selective C kernel not built")
needs_triton = pytest.mark.skipif(not _triton.available(), reason="triton is not installed")
# Triton runs on CUDA where there is one, else in its interpreter (tests/conftest.py)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [pytest.param("torch"), pytest.param("c", marks=needs_kernel),
            pytest.param("triton", marks=[pytest.mark.triton, needs_triton])]
# where each backend's forward and backward live: both must run, once per scan
KERNELS = {"c": (selective, "_c_forward", "_c_backward"),
           "triton": (_triton, "selective_forward", "selective_backward")}
# batch 2, d_model 8 -> E 16 in 4 heads of 4 channels, 2 groups, N 6 (not a power of 2),
# L 21 (not a multiple of the SSD's chunk, 64, nor of the Triton kernel's, 16)
BATCH, LENGTH, HIDDEN, N = 2, 21, 8, 6


def _layer(seed: int = 0) -> Mamba2Layer:
    """A float32 layer with 2 groups, every parameter moved off its init (D = 1 at init would
    make D's gradient indistinguishable from x's)."""
    torch.manual_seed(seed)
    layer = Mamba2Layer(d_model=HIDDEN, state_dim=N, head_dim=4, n_groups=2, bias=True)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def _assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, name: str) -> None:
    """Max error relative to the reference's largest entry."""
    assert got.shape == want.shape, name
    scale = want.abs().max().item()
    err = (got.detach().cpu().double() - want).abs().max().item()
    assert err <= rtol * scale + 1e-30, f"{name}: max error {err:.3g} > {rtol} * {scale:.3g}"


def _counted(fn, calls: dict[str, int], key: str):
    """``fn``, counting its calls in ``calls[key]``."""
    def wrapper(*args, **kwargs):
        calls[key] = calls.get(key, 0) + 1
        return fn(*args, **kwargs)
    return wrapper


def _route(backend: str, monkeypatch: pytest.MonkeyPatch
           ) -> tuple[str, torch.dtype, dict[str, int]]:
    """Device and dtype for ``backend`` (float64 keeps the selective layer's torch path) and
    call counts of its kernels; the SSD fails, and with a kernel the torch path too."""
    calls: dict[str, int] = {}

    def ssd(*args, **kwargs):
        raise AssertionError("scan='fused' ran the chunked SSD")

    monkeypatch.setattr(mamba2, "ssd_scan", ssd)
    if backend == "torch":
        return "cpu", torch.float64, calls
    module, *names = KERNELS[backend]
    for name in names:
        monkeypatch.setattr(module, name, _counted(getattr(module, name), calls, name))
    monkeypatch.setattr(selective, "selective_scan", None)  # the torch path must not run
    if backend == "triton" and TRITON_DEVICE == "cpu":  # CPU picks the C kernel: route it
        monkeypatch.setattr(selective, "fused_backend", lambda *a: "triton")
    return ("cpu" if backend == "c" else TRITON_DEVICE), torch.float32, calls


def _check_calls(backend: str, calls: dict[str, int]) -> None:
    if backend != "torch":
        _, *names = KERNELS[backend]
        assert calls == dict.fromkeys(names, 1), calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_scan_matches_the_ssd_with_gradients(backend, monkeypatch):
    """The scan alone: ``y`` and the gradients w.r.t. ``x``, ``delta``, ``B``, ``C`` and
    ``A_log`` (through the folded step size and input) against :func:`ssd_scan` in float64."""
    ref = _layer().double()
    gen = torch.Generator().manual_seed(1)
    e, nh = ref.d_inner, ref.n_heads
    leaves = {"x": torch.randn(BATCH, LENGTH, e, generator=gen, dtype=torch.float64),
              "b": torch.randn(BATCH, LENGTH, 2, N, generator=gen, dtype=torch.float64),
              "c": torch.randn(BATCH, LENGTH, 2, N, generator=gen, dtype=torch.float64),
              "delta": torch.exp(math.log(0.02) + 4 * torch.rand(BATCH, LENGTH, nh, generator=gen,
                                                                 dtype=torch.float64))}
    grad_y = torch.randn(BATCH, LENGTH, e, generator=gen, dtype=torch.float64)

    def run(layer, tensors):
        tensors = {k: v.clone().requires_grad_() for k, v in tensors.items()}
        y = layer._scan(**tensors)
        grads = torch.autograd.grad(y, [*tensors.values(), layer.A_log],
                                    grad_y.to(y.device, y.dtype))
        return y, dict(zip([*tensors, "A_log"], grads, strict=True))

    y_ref, g_ref = run(ref, leaves)  # the SSD, before the patches
    device, dtype, calls = _route(backend, monkeypatch)
    layer = copy.deepcopy(ref).to(device, dtype)
    layer.scan = "fused"
    y, g = run(layer, {k: v.to(device, dtype) for k, v in leaves.items()})
    _check_calls(backend, calls)
    assert y.dtype == dtype
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    _assert_close(y, y_ref, rtol, "y")
    for name, want in g_ref.items():
        _assert_close(g[name], want, 10 * rtol, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_on_the_fused_scan_matches_the_ssd_layer(backend, monkeypatch):
    """The whole layer (projections, convolution, D, gate, group norm around the scan): its
    output and the gradient of every parameter and of the input."""
    ref = _layer(seed=3).double()
    gen = torch.Generator().manual_seed(4)
    u = torch.randn(BATCH, LENGTH, HIDDEN, generator=gen, dtype=torch.float64)
    grad_y = torch.randn(BATCH, LENGTH, HIDDEN, generator=gen, dtype=torch.float64)

    def run(layer, u):
        u = u.clone().requires_grad_()
        y = layer(u)
        grads = torch.autograd.grad(y, [*layer.parameters(), u], grad_y.to(y.device, y.dtype))
        return y, dict(zip([n for n, _ in layer.named_parameters()] + ["u"], grads,
                           strict=True))

    y_ref, g_ref = run(ref, u)
    device, dtype, calls = _route(backend, monkeypatch)
    layer = copy.deepcopy(ref).to(device, dtype)
    layer.scan = "fused"
    y, g = run(layer, u.to(device, dtype))
    _check_calls(backend, calls)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    _assert_close(y, y_ref, rtol, "y")
    for name, want in g_ref.items():
        _assert_close(g[name], want, 20 * rtol, f"grad {name}")


@pytest.mark.parametrize("scan", ["ssd", "fused"])
def test_train_runs_the_scan_it_is_told(scan, mnist1d, tmp_path, monkeypatch):
    """``train --mamba2-scan``: every forward (training, evaluation, after the cut) takes the
    chosen path and only that one."""
    from compressm_tune.cli import main

    calls = {"ssd": 0, "fused": 0}
    for name, key in (("ssd_scan", "ssd"), ("scan_readout", "fused")):
        monkeypatch.setattr(mamba2, name, _counted(getattr(mamba2, name), calls, key))
    code = main(["-q", "train", "--dataset", "mnist1d", "--arch", "mamba2", "--hidden", "8",
                 "--head-dim", "4", "--n-groups", "2", "--blocks", "1", "--state-dim", "8",
                 "--steps", "4", "--eval-every", "2", "--reduce", "rank=4", "--window", "0.5",
                 "--schedule", "window", "--max-drop", "inf", "--threads", "1",
                 "--mamba2-scan", scan, "--no-progress", "--out", str(tmp_path / "run")])
    assert code == 0
    assert model_from_checkpoint(tmp_path / "run" / "last.pt").state_dims == [4]  # cut
    other = "fused" if scan == "ssd" else "ssd"
    assert calls[scan] > 4 and calls[other] == 0, calls


def test_bad_scan_is_refused(capsys):
    from compressm_tune.cli import main
    from compressm_tune.cli._flags import fields_of

    flag = fields_of("compressm_tune.training:TrainConfig")["mamba2_scan"]
    assert flag.meta["choices"] == MAMBA2_SCANS == ("ssd", "fused") and flag.default == "ssd"
    with pytest.raises(SystemExit) as info:
        main(["train", "--arch", "mamba2", "--mamba2-scan", "triton"])
    assert info.value.code == 2
    assert "--mamba2-scan: invalid choice: 'triton'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="mamba2-scan must be one of ssd, fused"):
        TrainConfig(mamba2_scan="triton")
    with pytest.raises(ConfigError, match="scan must be one of ssd, fused"):
        Mamba2Layer(d_model=8, state_dim=4, scan="triton")
