"""``--device`` and ``--precision``: resolution, one-line errors, mixed precision on CPU, and
(marked ``gpu``) the whole network on CUDA against the same network on the CPU."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from compressm_tune._device import check_device_spec, resolve_device
from compressm_tune.cli import main
from compressm_tune.errors import ConfigError
from compressm_tune.models import SSMConfig, SSMModel
from compressm_tune.search import TuneConfig
from compressm_tune.training import TrainConfig, model_from_checkpoint

has_cuda = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not has_cuda, reason="no CUDA device")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:-1", "CPU", "cuda:0,1", ""])
def test_malformed_device_is_refused_in_one_line(spec):
    with pytest.raises(ConfigError, match="--device must be auto, cpu, cuda or cuda:N"):
        check_device_spec(spec)
    with pytest.raises(ConfigError, match="--device"):
        TrainConfig(device=spec)
    with pytest.raises(ConfigError, match="--device"):
        TuneConfig(budget_ms=1.0, device=spec)


def test_auto_and_cpu_resolve_here():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if has_cuda else "cpu")


@pytest.mark.skipif(has_cuda, reason="a CUDA device is present")
@pytest.mark.parametrize("command", [
    ["train", "--dataset", "lti-sysid", "--steps", "2", "--device", "cuda"],
    ["--budget-ms", "5", "--device", "cuda:1"],
    ["train", "--dataset", "lti-sysid", "--steps", "2", "--device", "cpu", "--precision", "tf32"],
    ["train", "--dataset", "lti-sysid", "--steps", "2", "--device", "tpu"],
])
def test_cli_device_errors_are_one_line_exit_2(command, tmp_path, capsys):
    assert main([*command, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("--device" in err or "--precision" in err), err
    assert "Traceback" not in err


def test_bf16_autocast_on_cpu_changes_the_arithmetic_not_the_function(lti_sysid, tmp_path):
    """bf16 runs the projections in bfloat16 (so outputs differ from fp32 by more than float32
    rounding) while the scans stay float32 (so they differ by about bf16's 3 digits, not more)."""
    from compressm_tune._device import autocast

    torch.manual_seed(0)
    for arch in ("lru", "selective"):
        model = SSMModel(SSMConfig(arch=arch, d_input=1, d_output=1, d_model=16,
                                   state_dims=[24, 9], pooling="none")).eval()
        x = lti_sysid.x_test[:8]
        with torch.no_grad():
            ref = model(x)
            with autocast(torch.device("cpu"), "bf16"):
                low = model(x).float()
        rel = ((low - ref).norm() / ref.norm()).item()
        assert 1e-5 < rel < 5e-2, f"{arch}: relative difference {rel:.3g}"


def test_train_records_device_and_precision(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "lti-sysid", "--steps", "6", "--eval-every", "3",
                 "--blocks", "1", "--hidden", "8", "--state-dim", "6", "--device", "cpu",
                 "--precision", "bf16", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["precision"] == "bf16"
    assert summary["test_last"]["loss"] < float("inf")


# ----------------------------------------------------------------------------- on a GPU


def _pair(arch: str):
    torch.manual_seed(1)
    cpu = SSMModel(SSMConfig(arch=arch, d_input=3, d_output=5, d_model=24,
                             state_dims=[37, 12], dropout=0.0))
    return cpu, copy.deepcopy(cpu).cuda()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("arch", ["lru", "selective"])
def test_network_on_cuda_matches_cpu_values_and_gradients(arch):
    """Triton kernels (CUDA) against the C kernels (CPU): the same network, same weights."""
    cpu, gpu = _pair(arch)
    x = torch.randn(4, 257, 3)
    outs = []
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        y = model(x.to(dev))
        y.square().sum().backward()
        outs.append((y.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()}))
    (y_c, g_c), (y_g, g_g) = outs
    torch.testing.assert_close(y_g, y_c, rtol=1e-4, atol=1e-4)
    for name in g_c:
        scale = g_c[name].abs().max().item() + 1e-12
        err = (g_g[name] - g_c[name]).abs().max().item()
        assert err <= 2e-3 * scale, f"grad {name}: {err:.3g} vs max {scale:.3g}"


@pytest.mark.gpu
@needs_gpu
def test_train_on_cuda_with_reduction_and_load_on_cpu(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--steps", "200", "--eval-every", "10", "--blocks", "2",
                 "--hidden", "32", "--state-dim", "64", "--reduce", "tau=0.04",
                 "--device", "cuda", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"].startswith("cuda")
    assert summary["test_last"]["accuracy"] > 0.3  # 10 classes: chance is 0.1
    model = model_from_checkpoint(out / "last.pt")  # written on the GPU, loaded on the CPU
    assert next(model.parameters()).device.type == "cpu"
    assert model.state_dims == summary["final_state_dims"]
    x = torch.randn(2, 40, 1)
    torch.testing.assert_close(model.eval().cuda()(x.cuda()).cpu(),
                               model_from_checkpoint(out / "last.pt").eval()(x),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("arch,precision", [("lru", "fp32"), ("selective", "fp32"),
                                            ("lru", "bf16")])
def test_graph_replayed_steps_match_eager_steps_and_recapture_after_a_cut(arch, precision):
    """Replayed CUDA-graph steps update the weights as eager steps do, also after a cut gives
    the layer new (narrower) parameters, which must trigger a new capture."""
    from compressm_tune.reduction import reduce_layer, state_scores
    from compressm_tune.training.optim import build_optimizer
    from compressm_tune.training.step import TrainStep

    torch.manual_seed(3)
    eager = SSMModel(SSMConfig(arch=arch, d_input=2, d_output=4, d_model=16,
                               state_dims=[20, 11], dropout=0.0)).cuda()
    graph = copy.deepcopy(eager)
    runs = []
    for model, graphs in ((eager, False), (graph, True)):
        step = TrainStep(F.cross_entropy, torch.device("cuda"), precision, graphs=graphs)
        gen = torch.Generator().manual_seed(0)
        for phase in range(2):
            opt = build_optimizer(model, 1e-2, 0.05, 0.5, fused=True)
            for _ in range(4):
                x = torch.randn(8, 30, 2, generator=gen).cuda()
                y = torch.randint(0, 4, (8,), generator=gen).cuda()
                step(model, opt, x, y)
            if phase == 0:  # the same cut on both copies: new parameter objects
                layer = model.blocks[0].ssm
                u = torch.randn(4, 30, 16, generator=torch.Generator().manual_seed(1)).cuda()
                reduce_layer(layer, 6, scores=state_scores(layer, u), inputs=u)
        runs.append((model, step.captures))
    (m_e, n_e), (m_g, n_g) = runs
    assert n_e == 0 and n_g == 2
    assert m_g.state_dims == m_e.state_dims == [6, 11]
    tol = 1e-4 if precision == "fp32" else 2e-2
    for (name, a), b in zip(m_e.state_dict().items(), m_g.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol, msg=name)
