"""The selective (Mamba-style S6) layer and its data-driven state reduction.

References are independent of the package: the S6 equations in a float64 numpy loop, the
time-varying observability Gramian as an explicit double sum, and network outputs before and
after surgery.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import small_trainer

from compressm_tune.errors import ConfigError, ReductionError
from compressm_tune.models import SelectiveLayer, SSMConfig, SSMModel, _triton, selective_scan
from compressm_tune.models.selective import selective_scan_reference
from compressm_tune.reduction import (
    ReduceConfig,
    Reducer,
    ReductionPolicy,
    reduce_layer,
    select_states,
    state_importance,
)
from compressm_tune.training import model_from_checkpoint, read_metrics


def _layer(h=5, n=7, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return SelectiveLayer(d_model=h, state_dim=n, dtype=dtype)


def _numpy_s6(layer: SelectiveLayer, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The module docstring's equations as a float64 loop: outputs (B, L, H), states."""
    p = {name: v.detach().double().numpy() for name, v in layer.named_parameters()}
    a_cont = -np.exp(p["A_log"])  # (H, N)
    batch, length, h = u.shape
    x = np.zeros((batch, h, a_cont.shape[1]))
    ys, xs = [], []
    for t in range(length):
        ut = u[:, t]  # (B, H)
        delta = np.logaddexp(0.0, ut @ p["dt_down"].T @ p["dt_up"].T + p["dt_bias"])  # (B, H)
        b_t, c_t = ut @ p["B_proj"].T, ut @ p["C_proj"].T  # (B, N)
        x = np.exp(delta[:, :, None] * a_cont) * x + (delta * ut)[:, :, None] * b_t[:, None]
        ys.append(np.einsum("bhn,bn->bh", x, c_t) + p["D"] * ut)
        xs.append(x.copy())
    return np.stack(ys, 1), np.stack(xs, 1)


# ----------------------------------------------------------------------------- the scan


@pytest.mark.parametrize("length", [1, 2, 7, 8, 9, 40, 133])
def test_scan_and_its_gradients_match_the_time_loop(length):
    torch.manual_seed(length)
    a = torch.rand(2, length, 3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, length, 3, 4, dtype=torch.float64, requires_grad=True)
    x, ref = selective_scan(a, b), selective_scan_reference(a, b)
    torch.testing.assert_close(x, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(x)
    got = torch.autograd.grad((x * g).sum(), (a, b))
    want = torch.autograd.grad((ref * g).sum(), (a, b))
    for gg, gw in zip(got, want, strict=True):
        torch.testing.assert_close(gg, gw, rtol=1e-10, atol=1e-12)


def test_scan_stays_finite_for_decays_at_zero_and_one():
    """exp(delta A) underflows to exactly 0 for strong decays and is 1 for no decay; a
    log-space scan would produce -inf/NaN there, products of decays do not."""
    a = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0]).repeat(1, 20)[..., None]  # (1, 100, 1)
    b = torch.ones_like(a)
    torch.testing.assert_close(selective_scan(a, b), selective_scan_reference(a, b))


def test_scan_gradcheck():
    a = torch.rand(1, 11, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 11, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(selective_scan, (a, b))


# ----------------------------------------------------------------------------- the layer


def test_layer_matches_the_numpy_equations_in_sequence_and_step_mode():
    layer = _layer()
    u = torch.randn(3, 25, 5, dtype=torch.float64)
    want, _ = _numpy_s6(layer, u.numpy())
    np.testing.assert_allclose(layer(u).detach().numpy(), want, rtol=1e-10, atol=1e-12)
    state, ys = layer.allocate_state(3), []
    assert state.shape == (3, 5, 7) and not state.any()
    for t in range(25):
        y, state = layer.step(u[:, t], state)
        ys.append(y)
    np.testing.assert_allclose(torch.stack(ys, 1).detach().numpy(), want, rtol=1e-10,
                               atol=1e-12)


def test_the_step_size_is_input_dependent():
    """Selectivity itself. B_t and C_t are linear in u, so with a fixed step size the SSM part
    of the output is exactly cubic in the input; the input-dependent step size breaks that."""
    layer = _layer()
    u = torch.randn(1, 10, 5, dtype=torch.float64)

    def ssm_part(scale):
        return (layer(scale * u) - layer.D * (scale * u)).detach()

    assert (ssm_part(2.0) - 8 * ssm_part(1.0)).abs().max() > 1e-3
    with torch.no_grad():
        layer.dt_up.zero_()  # delta = softplus(dt_bias) for every input
    torch.testing.assert_close(ssm_part(2.0), 8 * ssm_part(1.0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_network_sequence_equals_streaming(pooling):
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(arch="selective", d_input=2, d_output=3, d_model=8,
                               state_dims=[6, 4], pooling=pooling, dropout=0.0)).double()
    x = torch.randn(4, 17, 2, dtype=torch.float64)
    model.train()
    model(x)  # BatchNorm running statistics away from (0, 1)
    model.eval()
    want = model(x)
    state = model.allocate_state(4)
    outs = []
    for t in range(17):
        y, state = model.step(x[:, t], state)
        outs.append(y)
    got = outs[-1] if pooling == "mean" else torch.stack(outs, 1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert model.config.arch == "selective" and model.state_dims == [6, 4]


def test_unknown_arch_is_a_config_error():
    with pytest.raises(ConfigError, match="arch must be one of"):
        SSMConfig(arch="mamba3")


def test_keep_states_rejects_bad_indices_and_changes_nothing():
    layer = _layer(n=4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for keep in ([], [0, 0], [1, 4], [-1]):
        with pytest.raises(ConfigError, match="distinct state indices"):
            layer.keep_states(torch.tensor(keep, dtype=torch.long))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k])


# ----------------------------------------------------------------------------- importance


def test_importance_equals_the_explicit_gramian_sum():
    """sqrt(mean_{b,t} sum_h x_t^2 q_t) with q_t = sum_{s>=t} C_s^2 prod_{t<k<=s} a_k^2,
    written as the double sum it is."""
    layer = _layer(h=3, n=4, seed=3)
    u = torch.randn(2, 9, 3, dtype=torch.float64)
    _, xs = _numpy_s6(layer, u.numpy())  # (B, L, H, N)
    with torch.no_grad():
        a, _, c = (t.numpy() for t in layer.discretize(u))  # (B, L, H, N), _, (B, L, N)
    batch, length = u.shape[:2]
    q = np.zeros_like(xs)
    for t in range(length):
        for s in range(t, length):
            gain = np.prod(a[:, t + 1:s + 1] ** 2, axis=1)  # (B, H, N), empty product = 1
            q[:, t] += (c[:, s] ** 2)[:, None, :] * gain
    want = np.sqrt((xs**2 * q).sum(axis=(0, 1, 2)) / (batch * length))
    np.testing.assert_allclose(state_importance(layer, u), want, rtol=1e-10)


def test_unexcited_state_scores_zero_and_cutting_it_changes_nothing():
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(arch="selective", d_model=8, state_dims=[6, 5],
                               dropout=0.0)).double()
    layer = model.blocks[0].ssm
    with torch.no_grad():
        layer.B_proj[2] = 0.0  # the data can never drive state 2
    model.eval()
    x = torch.randn(4, 30, 1, dtype=torch.float64)
    before = model(x).detach()
    inputs = torch.randn(8, 30, 8, dtype=torch.float64)
    score = state_importance(layer, inputs)
    assert score[2] == 0.0 and (np.delete(score, 2) > 0).all()
    keep = reduce_layer(layer, 5, scores=score)
    assert keep.tolist() == [0, 1, 3, 4, 5] and model.state_dims == [5, 5]
    torch.testing.assert_close(model(x).detach(), before, rtol=0, atol=1e-12)


def test_cutting_the_most_important_state_changes_outputs():
    """The converse, so the test above cannot pass by the cut doing nothing."""
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(arch="selective", d_model=8, state_dims=[6],
                               dropout=0.0)).double()
    model.eval()
    layer = model.blocks[0].ssm
    x = torch.randn(4, 30, 1, dtype=torch.float64)
    before = model(x).detach()
    score = state_importance(layer, torch.randn(8, 30, 8, dtype=torch.float64))
    drop_best = np.argsort(score)[1:]  # keep all but the most important
    layer.keep_states(torch.from_numpy(np.sort(drop_best)))
    assert (model(x).detach() - before).abs().max() > 1e-4


def test_reduction_to_full_width_is_a_bit_exact_no_op():
    layer = _layer()
    u = torch.randn(2, 10, 5, dtype=torch.float64)
    before = layer(u).detach()
    params = dict(layer.named_parameters())
    assert reduce_layer(layer, 7, scores=np.ones(7)) is None
    assert reduce_layer(layer, 70, scores=np.ones(7)) is None
    assert all(p is params[n] for n, p in layer.named_parameters())
    layer.keep_states(torch.arange(7))  # keeping every index rebuilds, but the same values
    assert torch.equal(layer(u).detach(), before)


def test_selection_ablations():
    layer = _layer(n=6)
    with torch.no_grad():  # state 4 decays slowest in every channel, state 1 fastest
        layer.A_log[:, 4] = -3.0
        layer.A_log[:, 1] = 3.0
    importance = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    assert select_states(layer, importance, 2, "largest").tolist() == [0, 1]
    assert select_states(layer, importance, 2, "smallest").tolist() == [4, 5]
    assert select_states(layer, importance, 1, "magnitude").tolist() == [4]
    assert 1 not in select_states(layer, importance, 5, "magnitude").tolist()
    r1 = select_states(layer, importance, 3, "random", seed=1)
    assert torch.equal(r1, select_states(layer, importance, 3, "random", seed=1))
    assert len(set(r1.tolist())) == 3
    with pytest.raises(ReductionError, match="rank"):
        select_states(layer, importance, 0)
    with pytest.raises(ReductionError, match="shape"):
        select_states(layer, importance[:3], 2)
    with pytest.raises(ReductionError, match="calibration inputs"):
        state_importance(layer, torch.randn(2, 5, 3, dtype=torch.float64))


# ----------------------------------------------------------------------------- in training


def _trainer(data, tmp_path, reducer=None, steps=20):
    return small_trainer(data, tmp_path, "selective", 16, [32, 32], reducer, steps)


def test_in_training_reduction_of_a_selective_model(mnist1d, tmp_path):
    reducer = Reducer(ReduceConfig(policy=ReductionPolicy("fraction", 0.5), window=0.5,
                                   max_drop=1.0, calibration=32, schedule="window"))
    summary = _trainer(mnist1d, tmp_path, reducer).fit()
    assert summary["final_state_dims"] == [16, 16]
    records = read_metrics(tmp_path / "metrics.jsonl")
    scores = records[0]["reduction"][0]["hsv"]
    assert len(scores) == 32 and scores == sorted(scores, reverse=True)
    reloaded = model_from_checkpoint(tmp_path / "last.pt")
    assert reloaded.config.arch == "selective" and reloaded.state_dims == [16, 16]


def test_kept_states_carry_their_adam_moments_exactly(mnist1d, tmp_path):
    trainer = _trainer(mnist1d, tmp_path, steps=5)
    trainer.fit()
    layer = trainer.model.blocks[0].ssm
    old = {name: trainer.optimizer.state[getattr(layer, name)]["exp_avg_sq"].clone()
           for name in layer.state_axes}
    untouched = trainer.optimizer.state[layer.dt_up]
    score = np.arange(32.0)  # keep the 12 highest indices
    Reducer(ReduceConfig(policy=ReductionPolicy("rank", 12), max_drop=1.0, schedule="window"))._cut(
        trainer, 0, 12, trainer.validate(), {}, scores=score)
    keep = torch.arange(20, 32)
    for name, axis in layer.state_axes.items():
        new = trainer.optimizer.state[getattr(layer, name)]["exp_avg_sq"]
        assert torch.equal(new, old[name].index_select(axis, keep)), name
    assert trainer.optimizer.state[layer.dt_up] is untouched


def test_fused_importance_matches_the_float64_sums():
    """The C kernel's importance (float32 CPU) against the torch path in float64."""
    from compressm_tune.models.selective import _scan_kernel

    if _scan_kernel is None:
        pytest.skip("the C extension is not built: the torch path is the only path")
    layer = _layer(h=6, n=9, seed=2, dtype=torch.float32)
    with torch.no_grad():
        layer.B_proj[3] = 0.0
    u = torch.randn(5, 33, 6)
    got = state_importance(layer, u)
    want = state_importance(copy.deepcopy(layer).double(), u.double())  # torch path
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7 * want.max())
    assert got[3] == 0.0


@pytest.mark.triton
@pytest.mark.skipif(not _triton.available(), reason="triton is not installed")
@pytest.mark.parametrize("batch,length,h,n", [(5, 33, 6, 9), (2, 257, 3, 20)])
def test_triton_importance_matches_the_float64_sums(batch, length, h, n):
    """The Triton kernel's importance sums (CUDA, or the interpreter on CPU) against the torch
    path in float64; a state that is never driven scores exactly 0."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = _layer(h=h, n=n, seed=3, dtype=torch.float32)
    with torch.no_grad():
        layer.B_proj[3] = 0.0
    u = torch.randn(batch, length, h)
    got = _triton.selective_importance(*(t.to(device) for t in layer.to(device).projections(
        u.to(device))), u.to(device)).cpu()
    layer = layer.cpu()
    want = state_importance(copy.deepcopy(layer).double(), u.double())  # torch path
    got = (got / (batch * length)).sqrt().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7 * want.max())
    assert got[3] == 0.0
