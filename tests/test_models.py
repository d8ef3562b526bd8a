"""LRU layer, block and network against the DESIGN.md equations, written here in numpy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import lru_reference, lru_system_np
from scipy import stats

from compressm_tune.errors import CompressmError, ConfigError
from compressm_tune.models import SSM_PARAMETERS, LRULayer, SSMConfig, SSMModel

# ----------------------------------------------------------------------------- the layer


def _layer(h=4, n=6, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    return LRULayer(d_model=h, state_dim=n, dtype=dtype, **kw)


def _step_through(layer, u):
    state = layer.allocate_state(u.shape[0])
    assert state.shape == (u.shape[0], layer.state_dim, 2) and not state.any()
    ys = []
    for t in range(u.shape[1]):
        y, state = layer.step(u[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("length", [1, 70, 300])
def test_sequence_step_and_reference_agree(length, dtype, tol):
    """float32 runs the C kernel, float64 the chunked torch scan; both equal the equations."""
    layer = _layer(h=5, n=7, seed=length, dtype=dtype)
    u = torch.randn(3, length, 5, dtype=dtype)
    want = lru_reference(layer, u.numpy())
    scale = np.abs(want).max()
    with torch.no_grad():
        seq = layer(u)
        step, last_state = _step_through(layer, u)
    assert seq.shape == u.shape and seq.dtype == dtype
    assert np.abs(seq.double().numpy() - want).max() <= tol * scale
    assert np.abs(step.double().numpy() - want).max() <= tol * scale
    # the streaming state is x_{L-1} of the equations
    lam, b, _, _ = lru_system_np(layer)
    x = np.zeros((3, 7), np.complex128)
    for k in range(length):
        x = lam * x + u[:, k].double().numpy() @ b.T
    got = last_state.double().numpy()
    assert np.abs(got[..., 0] + 1j * got[..., 1] - x).max() <= tol * np.abs(x).max()


def test_step_continues_from_a_given_state():
    """Splitting a sequence and carrying the state equals running it whole."""
    layer = _layer(seed=3)
    u = torch.randn(2, 30, 4)
    with torch.no_grad():
        whole = layer(u)
        first, state = _step_through(layer, u[:, :12])
        rest = []
        for t in range(12, 30):
            y, state = layer.step(u[:, t], state)
            rest.append(y)
    torch.testing.assert_close(torch.cat([first, torch.stack(rest, 1)], 1), whole,
                               rtol=1e-4, atol=1e-5)


def test_init_statistics_follow_the_paper():
    n, h = 4000, 8
    layer = _layer(h=h, n=n, seed=1, r_min=0.9, r_max=0.999)
    lam, b, c, d = lru_system_np(layer)
    radius = np.abs(lam)
    assert radius.min() >= 0.9 - 1e-6 and radius.max() <= 0.999 + 1e-6
    # uniform on the ring = uniform in the squared radius (area), as the paper's code draws it
    r2 = (radius**2 - 0.9**2) / (0.999**2 - 0.9**2)
    assert stats.kstest(r2, "uniform").pvalue > 1e-3
    phase = np.exp(layer.theta_log.detach().double().numpy())
    assert phase.min() >= 0.0 and phase.max() < 2 * np.pi
    assert stats.kstest(phase / (2 * np.pi), "uniform").pvalue > 1e-3
    gamma = np.exp(layer.gamma_log.detach().double().numpy())
    np.testing.assert_allclose(gamma, np.sqrt(1 - radius**2), rtol=1e-5)
    b_raw = layer.B_re.detach().numpy()
    c_raw = layer.C_re.detach().numpy()
    assert abs(b_raw.std() * math.sqrt(2 * h) - 1) < 0.05  # B ~ N(0,1)/sqrt(2H)
    assert abs(layer.B_im.detach().numpy().std() * math.sqrt(2 * h) - 1) < 0.05
    assert abs(c_raw.std() * math.sqrt(n) - 1) < 0.05  # C ~ N(0,1)/sqrt(N)
    assert abs(b_raw.mean()) < 0.01 and abs(c_raw.mean()) < 0.01
    assert np.all(np.isfinite(d))


def test_init_respects_custom_ring_and_phase():
    layer = _layer(n=500, seed=2, r_min=0.3, r_max=0.5, max_phase=0.1)
    lam, _, _, _ = lru_system_np(layer)
    assert np.abs(lam).min() >= 0.3 - 1e-6 and np.abs(lam).max() <= 0.5 + 1e-6
    assert np.angle(lam).min() >= 0 and np.angle(lam).max() < 0.1


def test_system_matches_the_equations():
    layer = _layer(h=3, n=5, seed=4)
    with torch.no_grad():  # move away from init so gamma is not tied to |lambda|
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    lam, b, c, d = layer.system()
    assert lam.dtype == torch.complex128 and b.dtype == torch.complex128
    assert c.dtype == torch.complex128 and d.dtype == torch.float64
    assert lam.shape == (5,) and b.shape == (5, 3) and c.shape == (3, 5) and d.shape == (3,)
    want = lru_system_np(layer)
    for got, ref in zip((lam, b, c, d), want, strict=True):
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-7)
    assert not any(t.requires_grad for t in (lam, b, c, d))
    assert (np.abs(lam.numpy()) < 1).all()
    # the system's transfer function reproduces the layer: impulse response of input j
    u = torch.zeros(1, 6, 3)
    u[0, 0, 1] = 1.0
    with torch.no_grad():
        y = layer(u)[0].double().numpy()  # (6, 3)
    lam, b, c, d = (t.numpy() for t in (lam, b, c, d))
    markov = [(c @ (lam[:, None] ** k * b)).real[:, 1] for k in range(6)]  # C A^k B e_1
    markov[0] = markov[0] + d * np.eye(3)[1]
    np.testing.assert_allclose(y, np.stack(markov), rtol=1e-4, atol=1e-5)


def _new_params(layer, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = layer.d_model
    return {
        "nu_log": torch.randn(n, generator=g) - 2, "theta_log": torch.randn(n, generator=g),
        "gamma_log": -torch.rand(n, generator=g),
        "B_re": torch.randn(n, h, generator=g), "B_im": torch.randn(n, h, generator=g),
        "C_re": torch.randn(h, n, generator=g), "C_im": torch.randn(h, n, generator=g),
    }


@pytest.mark.parametrize("new_n", [2, 11])
def test_load_system_parameters_changes_width(new_n):
    layer = _layer(h=4, n=6, seed=5)
    d_before = layer.D.detach().clone()
    old_params = {name: p for name, p in layer.named_parameters()}
    params = _new_params(layer, new_n)
    layer.load_system_parameters(params)
    assert layer.state_dim == new_n
    assert layer.allocate_state(2).shape == (2, new_n, 2)
    for name, value in params.items():
        p = getattr(layer, name)
        assert isinstance(p, torch.nn.Parameter) and p.requires_grad
        assert p is not old_params[name]  # fresh parameters: the optimizer must be rebuilt
        assert torch.equal(p.detach(), value)
    assert torch.equal(layer.D.detach(), d_before)
    u = torch.randn(2, 40, 4)
    with torch.no_grad():
        y = layer(u)
        y_step, _ = _step_through(layer, u)
    want = lru_reference(layer, u.numpy())
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(y_step.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    layer(u).pow(2).sum().backward()  # and it still trains: every new parameter gets a gradient
    for name in params:
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def _bad_system_parameters(layer):
    good = _new_params(layer, 3)
    missing = dict(good)
    del missing["C_im"]
    return [
        (missing, "C_im"),
        (dict(good, B_re=torch.randn(3, 5)), r"B_re must have shape \(3, 4\)"),
        (dict(good, C_re=torch.randn(4, 2)), r"C_re must have shape \(4, 3\)"),
        (dict(good, gamma_log=torch.randn(4)), r"gamma_log must have shape \(3,\)"),
        (dict(good, C_im=torch.full((4, 3), float("nan"))), "C_im must be finite"),
    ]


def test_load_system_parameters_validates():
    for params, match in _bad_system_parameters(_layer(h=4, n=6)):
        with pytest.raises(ConfigError, match=match) as info:
            _layer(h=4, n=6).load_system_parameters(params)
        assert isinstance(info.value, ValueError)


def test_rejected_load_system_parameters_leaves_layer_unchanged():
    layer = _layer(h=4, n=6)
    before = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    for params, match in _bad_system_parameters(layer):
        with pytest.raises(ConfigError):
            layer.load_system_parameters(params)
        assert layer.state_dim == 6, match
        after = layer.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items()), match
        assert layer(torch.randn(1, 5, 4)).shape == (1, 5, 4)


@pytest.mark.parametrize("kw", [
    {"d_model": 0, "state_dim": 4}, {"d_model": 4, "state_dim": 0},
    {"d_model": 4, "state_dim": 4, "r_min": 0.9, "r_max": 0.9},
    {"d_model": 4, "state_dim": 4, "r_min": 0.5, "r_max": 1.0},
    {"d_model": 4, "state_dim": 4, "r_min": -0.1, "r_max": 0.5},
])
def test_layer_rejects_bad_sizes(kw):
    with pytest.raises(ConfigError):
        LRULayer(**kw)


# ----------------------------------------------------------------------------- the network


def _model(pooling="mean", dims=(6, 4), h=8, d_in=2, d_out=3, dropout=0.0, seed=0, arch="lru"):
    torch.manual_seed(seed)
    return SSMModel(SSMConfig(d_input=d_in, d_output=d_out, d_model=h, state_dims=list(dims),
                              pooling=pooling, dropout=dropout, arch=arch))


def _warm_batchnorm(model, x):
    """Train-mode passes so BatchNorm's running statistics are not the (0, 1) defaults."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x * 3 + 1)
    model.eval()


def _np_forward(model, x):
    """encoder -> [BN(eval) -> LRU -> GELU -> GLU -> +residual] * K -> pool -> head, in numpy."""
    def lin(m, a):
        return a @ m.weight.detach().double().numpy().T + m.bias.detach().double().numpy()

    h = lin(model.encoder, x.double().numpy())
    for block in model.blocks:
        mean = block.norm.running_mean.double().numpy()
        var = block.norm.running_var.double().numpy()
        z = (h - mean) / np.sqrt(var + block.norm.eps)
        z = lru_reference(block.ssm, z)
        z = F.gelu(torch.from_numpy(z)).numpy()  # exact (erf) GELU
        a, b = np.split(lin(block.glu.proj, z), 2, axis=-1)
        h = h + a / (1 + np.exp(-b))
    if model.config.pooling == "mean":
        h = h.mean(1)
    return lin(model.head, h)


@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_network_matches_numpy_composition(pooling):
    model = _model(pooling=pooling, dropout=0.2)
    x = torch.randn(4, 25, 2)
    _warm_batchnorm(model, x)
    with torch.no_grad():
        got = model(x)
    want = _np_forward(model, x)
    assert got.shape == want.shape == ((4, 3) if pooling == "mean" else (4, 25, 3))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_network_step_equals_forward_in_eval(pooling):
    model = _model(pooling=pooling)
    x = torch.randn(3, 40, 2)
    _warm_batchnorm(model, x)
    with torch.no_grad():
        full = model(x)
        state = model.allocate_state(3)
        outs = []
        for t in range(x.shape[1]):
            y, state = model.step(x[:, t], state)
            outs.append(y)
    assert [s.shape[1] for s in state[:2]] == [6, 4]
    if pooling == "mean":
        torch.testing.assert_close(outs[-1], full, rtol=1e-4, atol=1e-5)
        # and the output after t tokens is the model on the prefix
        torch.testing.assert_close(outs[9], model(x[:, :10]), rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_parameter():
    model = _model(dims=(5, 3), dropout=0.1)
    model.train()
    x = torch.randn(6, 20, 2)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    F.cross_entropy(model(x), y).backward()
    names = [name for name, _ in model.named_parameters()]
    assert len(names) == 2 + 2 * (8 + 2) + 2  # encoder, 2 x (LRU 8 + GLU 2), head
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_state_dims_and_config_follow_surgery():
    model = _model(dims=(6, 4))
    assert model.state_dims == [6, 4]
    layer = model.ssm_layers()[0]
    layer.load_system_parameters(_new_params(layer, 2))
    assert model.state_dims == [2, 4]
    assert model.config.state_dims == [2, 4]
    rebuilt = SSMModel(model.config)
    rebuilt.load_state_dict(model.state_dict())  # shapes line up with the new config
    assert rebuilt.state_dims == [2, 4]


def test_model_does_not_alias_the_callers_config():
    cfg = SSMConfig(d_input=1, d_output=2, d_model=4, state_dims=[3, 3])
    model = SSMModel(cfg)
    cfg.state_dims.append(5)
    assert model.state_dims == [3, 3] and model.config.n_blocks == 2


# ----------------------------------------------------------------------------- the config


def test_config_json_round_trip():
    cfg = SSMConfig(d_input=2, d_output=5, d_model=16, state_dims=[8, 4, 2], pooling="none",
                    dropout=0.0, r_min=0.5, r_max=0.9, max_phase=1.0)
    text = json.dumps(cfg.to_dict())
    again = SSMConfig(**json.loads(text))
    assert again == cfg and again.n_blocks == 3


@pytest.mark.parametrize("kw,match", [
    ({"d_model": 0}, "d_model"), ({"d_input": -1}, "d_input"), ({"d_output": 2.5}, "d_output"),
    ({"state_dims": []}, "state_dims"), ({"state_dims": [4, 0]}, "state_dims"),
    ({"pooling": "max"}, "pooling"), ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"),
    ({"r_min": 0.99, "r_max": 0.9}, "r_min"), ({"r_max": 1.0}, "r_max"),
])
def test_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match) as info:
        SSMConfig(**kw)
    assert isinstance(info.value, ValueError) and isinstance(info.value, CompressmError)


@pytest.mark.parametrize("arch", ["lru", "selective"])
def test_ssm_parameter_names_are_the_recurrence(arch):
    layer = _model(arch=arch).ssm_layers()[0]
    names = {name for name, _ in layer.named_parameters()}
    assert set(layer.recurrence_parameters) <= names
    assert set(layer.recurrence_parameters) <= set(SSM_PARAMETERS)
    # read-outs, skips and the selective layer's input projections are ordinary weights
    assert {"C_re", "C_im", "D", "B_proj", "C_proj", "dt_down", "dt_up"}.isdisjoint(
        SSM_PARAMETERS)


@pytest.mark.parametrize("arch", ["lru", "selective"])
def test_padding_is_never_pooled_and_equals_running_each_sequence_unpadded(arch):
    """Zero padding used to be mean-pooled into the features; the reference runs each
    sequence alone at its true length."""
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(arch=arch, d_input=2, d_output=3, d_model=8,
                               state_dims=[6, 5])).eval()
    lengths = torch.tensor([9, 3, 1, 6])
    x = torch.randn(4, 9, 2)
    with torch.no_grad():
        alone = torch.cat([model(x[i:i + 1, :n]) for i, n in enumerate(lengths.tolist())])
        padded = x.clone()
        padded[torch.arange(9)[None, :] >= lengths[:, None]] = float("nan")  # NaN steps
        torch.testing.assert_close(model(padded), alone, rtol=1e-5, atol=1e-6)
        zeros = x.clone()
        zeros[torch.arange(9)[None, :] >= lengths[:, None]] = 0.0
        torch.testing.assert_close(model(zeros, lengths=lengths), alone, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(model(zeros), alone, atol=1e-3)  # unmasked: padding pooled


@pytest.mark.parametrize("arch", ["lru", "selective"])
def test_padded_training_batch_statistics_count_real_steps_only(arch):
    """Reference: ``nn.BatchNorm1d`` fed only the real steps' rows."""
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(arch=arch, d_input=2, d_output=3, d_model=8, state_dims=[6, 5],
                               dropout=0.0)).train()
    model.padded_inputs = True
    lengths = torch.tensor([9, 3, 1, 6])
    x = torch.randn(4, 9, 2)
    real = torch.arange(9)[None, :] < lengths[:, None]  # (4, 9)
    reference = torch.nn.BatchNorm1d(8, affine=False)
    with torch.no_grad():
        reference(model.encoder(x)[real])  # (sum(lengths), 8) rows
    padded = torch.full((4, 20, 2), float("nan"))
    padded[:, :9][real] = x[real]
    out = model(padded)
    norm = model.blocks[0].norm
    torch.testing.assert_close(norm.running_mean, reference.running_mean)
    torch.testing.assert_close(norm.running_var, reference.running_var)
    # the outputs of training mode do not depend on how far the batch was padded
    torch.testing.assert_close(model(padded[:, :9]), out, rtol=1e-5, atol=1e-6)


def test_per_step_outputs_at_real_steps_do_not_depend_on_padding():
    torch.manual_seed(1)
    model = SSMModel(SSMConfig(d_input=1, d_output=2, d_model=8, state_dims=[4],
                               pooling="none")).eval()
    x = torch.randn(1, 7, 1)
    padded = torch.cat([x, torch.full((1, 5, 1), float("nan"))], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded)[:, :7], model(x), rtol=1e-5, atol=1e-6)
        assert torch.isfinite(model(padded)).all()
