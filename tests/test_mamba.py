"""The Mamba block (``--arch mamba``): its equations, streaming, state reduction and export.

The reference is independent of the package: the Mamba-1 mixer written out as a float64 numpy
loop over time (in_proj, causal depthwise conv as an explicit window, SiLU, x_proj/dt_proj,
softplus, zero-order-hold S6, D skip, SiLU gate, out_proj) from the raw parameters.
"""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import small_trainer

from compressm_tune.errors import ExportError
from compressm_tune.exporter import (
    EdgeBundle,
    build_sequence_model,
    build_step_model,
    export_bundle,
    extract_weights,
    run_parity,
    script_model,
    verify_bundle,
)
from compressm_tune.models import MambaLayer, SSMConfig, SSMModel
from compressm_tune.reduction import (
    ReduceConfig,
    Reducer,
    ReductionPolicy,
    reduce_layer,
    state_scores,
)
from compressm_tune.training import model_from_checkpoint, save_checkpoint


def _layer(h=6, n=5, seed=0, dtype=torch.float64, **kw) -> MambaLayer:
    torch.manual_seed(seed)
    layer = MambaLayer(d_model=h, state_dim=n, dtype=dtype, **kw)
    with torch.no_grad():  # move every parameter off its structured init
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def _silu(v):
    return v / (1 + np.exp(-v))


def _numpy_mamba(layer: MambaLayer, u: np.ndarray) -> np.ndarray:
    """Mamba-1's mixer as a float64 loop: ``u (B, L, H) -> (B, L, H)``."""
    p = {k: v.detach().double().numpy() for k, v in layer.named_parameters()}
    e, n, k = layer.d_inner, layer.state_dim, layer.d_conv
    r = p["s6.dt_down"].shape[0]
    # the three row blocks of Mamba's x_proj, and dt_proj, as one matrix each
    x_proj = np.concatenate([p["s6.dt_down"], p["s6.B_proj"], p["s6.C_proj"]])  # (R+2N, E)
    a = -np.exp(p["s6.A_log"])  # (E, N)
    batch, length, _ = u.shape
    out = np.zeros_like(u)
    for b in range(batch):
        h = np.zeros((e, n))
        xs = []  # pre-conv inputs seen so far
        for t in range(length):
            xz = p["in_proj.weight"] @ u[b, t] + p.get("in_proj.bias", 0)  # (2E,)
            x, z = xz[:e], xz[e:]
            xs.append(x)
            conv = p.get("conv1d.bias", np.zeros(e)).copy()
            for j in range(k):  # weight[:, 0, j] multiplies x_{t - (k - 1) + j}
                s = t - (k - 1) + j
                if s >= 0:
                    conv += p["conv1d.weight"][:, 0, j] * xs[s]
            xc = _silu(conv)  # (E,)
            proj = x_proj @ xc  # (R + 2N,)
            dt = np.logaddexp(0, p["s6.dt_up"] @ proj[:r] + p["s6.dt_bias"])  # softplus, (E,)
            bt, ct = proj[r:r + n], proj[r + n:]
            h = np.exp(dt[:, None] * a) * h + (dt * xc)[:, None] * bt[None, :]  # (E, N)
            y = h @ ct + p["s6.D"] * xc  # (E,)
            out[b, t] = p["out_proj.weight"] @ (y * _silu(z)) + p.get("out_proj.bias", 0)
    return out


# ----------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("kw", [{}, {"d_conv": 2, "bias": True, "conv_bias": False, "expand": 3}])
def test_layer_matches_the_plain_loop_reference(kw):
    layer = _layer(**kw)
    u = torch.randn(2, 11, 6, dtype=torch.float64)
    want = _numpy_mamba(layer, u.numpy())
    np.testing.assert_allclose(layer(u).detach().numpy(), want, rtol=1e-9, atol=1e-10)
    # float32 takes the fused scan (the C kernel where built); same equations
    got32 = layer.float()(u.float()).detach().numpy()
    np.testing.assert_allclose(got32, want, rtol=1e-4, atol=1e-5)


def test_fused_gradients_match_the_torch_path():
    layer = _layer(dtype=torch.float32)
    ref = copy.deepcopy(layer).double()  # the same weights, torch (reference) path
    u = torch.randn(3, 17, 6)
    layer(u).square().sum().backward()
    ref(u.double()).square().sum().backward()
    for (name, p), q in zip(layer.named_parameters(), ref.parameters(), strict=True):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-3,
                                   atol=1e-4 * float(q.grad.abs().max()), err_msg=name)


@pytest.mark.parametrize("vocab", [None, 13])
def test_streaming_equals_the_sequence(vocab):
    torch.manual_seed(1)
    cfg = SSMConfig(arch="mamba", d_input=2, d_output=3, d_model=8, state_dims=[6, 4],
                    vocab_size=vocab, pooling="none" if vocab else "mean")
    model = SSMModel(cfg).double().eval()
    x = torch.randint(13, (2, 9)) if vocab else torch.randn(2, 9, 2, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        state = model.allocate_state(2)
        assert state[0].shape == (2, 16, 3 + 6)  # (batch, E, d_conv - 1 + N)
        ys = []
        for t in range(9):
            y, state = model.step(x[:, t], state)
            ys.append(y)
    got = ys[-1] if cfg.pooling == "mean" else torch.stack(ys, 1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_model_has_mambas_block_and_final_norm():
    model = SSMModel(SSMConfig(arch="mamba", d_model=8, state_dims=[4]))
    block = model.blocks[0]
    assert isinstance(block.norm, torch.nn.RMSNorm) and isinstance(model.norm_f, torch.nn.RMSNorm)
    assert not hasattr(block, "glu")
    with torch.no_grad():
        block.ssm.out_proj.weight.zero_()  # the mixer adds nothing: residual + final norm only
    x = torch.randn(1, 5, 1)
    h = model.encoder(x)
    want = model.head(torch.nn.functional.rms_norm(h, (8,), model.norm_f.weight, 1e-5).mean(1))
    torch.testing.assert_close(model.eval()(x), want)


# ----------------------------------------------------------------------------- reduction


def _restricted(layer: MambaLayer, keep: torch.Tensor) -> MambaLayer:
    """A fresh layer of width len(keep) with the kept states' parameters copied by hand."""
    small = MambaLayer(layer.d_model, len(keep), dtype=torch.float64)
    with torch.no_grad():
        for name, p in small.named_parameters():
            src = layer.get_parameter(name)
            if name == "s6.A_log":
                src = src[:, keep]
            elif name in ("s6.B_proj", "s6.C_proj"):
                src = src[keep]
            p.copy_(src)
    return small


def test_reduction_keeps_the_kept_states_outputs():
    layer = _layer(n=8, seed=3)
    with torch.no_grad():
        layer.s6.B_proj[5] = 0.0  # state 5 is never driven
    u = torch.randn(4, 20, 6, dtype=torch.float64)
    scores = state_scores(layer, u)
    assert scores.shape == (8,) and scores[5] == 0.0 and (np.delete(scores, 5) > 0).all()
    small = _restricted(layer, torch.from_numpy(np.sort(np.argsort(-scores)[:3])))
    keep = reduce_layer(layer, 3, scores=scores)
    assert layer.state_dim == 3 and 5 not in keep.tolist()
    assert keep.tolist() == sorted(np.argsort(-scores)[:3].tolist())
    torch.testing.assert_close(layer(u), small(u))
    with pytest.raises(ValueError, match="distinct state indices"):
        layer.keep_states(torch.tensor([0, 0]))


def _trainer(data, tmp_path, reducer=None, steps=20):
    return small_trainer(data, tmp_path, "mamba", 8, [8, 8], reducer, steps)


def test_in_training_reduction_and_reload(mnist1d, tmp_path):
    reducer = Reducer(ReduceConfig(policy=ReductionPolicy("fraction", 0.5), window=0.5,
                                   max_drop=1.0, calibration=32, schedule="window"))
    summary = _trainer(mnist1d, tmp_path, reducer).fit()
    assert summary["final_state_dims"] == [4, 4]
    reloaded = model_from_checkpoint(tmp_path / "last.pt")
    assert reloaded.config.arch == "mamba" and reloaded.state_dims == [4, 4]


def test_kept_states_carry_their_adam_moments_exactly(mnist1d, tmp_path):
    trainer = _trainer(mnist1d, tmp_path, steps=3)
    trainer.fit()
    layer = trainer.model.blocks[0].ssm
    old = {name: trainer.optimizer.state[layer.get_parameter(name)]["exp_avg_sq"].clone()
           for name in layer.state_axes}
    untouched = trainer.optimizer.state[layer.in_proj.weight]
    Reducer(ReduceConfig(policy=ReductionPolicy("rank", 3), max_drop=1.0, schedule="window"))._cut(
        trainer, 0, 3, trainer.validate(), {}, scores=np.arange(8.0))
    keep = torch.arange(5, 8)
    for name, axis in layer.state_axes.items():
        new = trainer.optimizer.state[layer.get_parameter(name)]["exp_avg_sq"]
        assert torch.equal(new, old[name].index_select(axis, keep)), name
    assert trainer.optimizer.state[layer.in_proj.weight] is untouched


# ----------------------------------------------------------------------------- export


def _session(proto):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("cfg", [
    SSMConfig(arch="mamba", d_input=2, d_output=3, d_model=8, state_dims=[6, 3]),
    SSMConfig(arch="mamba", d_output=11, d_model=8, state_dims=[5], pooling="none",
              vocab_size=11, proj_bias=True, conv_bias=False, d_conv=3),
], ids=["floats-mean", "tokens-none"])
def test_export_parity_in_onnxruntime_and_torchscript(cfg):
    torch.manual_seed(0)
    model = SSMModel(cfg).eval()
    reduce_layer(model.blocks[0].ssm, 2, scores=np.arange(model.state_dims[0], dtype=float))
    w = extract_weights(model)
    assert w.arch == "mamba" and w.state_shapes[0] == (16, cfg.d_conv - 1 + 2)
    report = run_parity(model, onnx_sequence=_session(build_sequence_model(w)),
                        onnx_step=_session(build_step_model(w)), torchscript=script_model(w),
                        lengths=(1, 9, 60), batches=(1, 2))
    assert report["max_abs_error"] <= 1e-5
    assert {(c["engine"], c["mode"]) for c in report["checks"]} == {
        ("onnxruntime", "sequence"), ("onnxruntime", "step"), ("torchscript", "sequence"),
        ("torchscript", "step")}


def test_export_parity_fails_on_a_wrong_graph():
    model = SSMModel(SSMConfig(arch="mamba", d_model=8, state_dims=[4])).eval()
    other = SSMModel(SSMConfig(arch="mamba", d_model=8, state_dims=[4])).eval()
    with pytest.raises(ExportError, match="parity check failed"):
        run_parity(model, onnx_sequence=_session(build_sequence_model(extract_weights(other))),
                   lengths=(5,), batches=(1,))


def test_bundle_of_a_mamba_checkpoint_runs_on_the_edge_runner(tmp_path):
    torch.manual_seed(2)
    model = SSMModel(SSMConfig(arch="mamba", d_output=4, d_model=8, state_dims=[6, 3])).eval()
    save_checkpoint(tmp_path / "m.pt", model)
    manifest = export_bundle(tmp_path / "m.pt", tmp_path / "b", parity_lengths=(1, 30))
    assert manifest["sequence_graph"]["variant"] == "scan"  # chunk="auto" keeps the Scan
    assert manifest["model"]["state_shapes"] == [["batch", 16, 9], ["batch", 16, 6]]
    verify_bundle(tmp_path / "b")
    x = torch.randn(2, 25, 1)
    with torch.no_grad():
        want = model(x).numpy()
    edge = EdgeBundle(tmp_path / "b")
    np.testing.assert_allclose(edge.predict(x.numpy(), normalized=True), want, atol=1e-5)
    streamed = edge.streamer(batch=2).run(x.numpy(), normalized=True)[:, -1]
    np.testing.assert_allclose(streamed, want, atol=1e-5)
