"""The Mamba-2 block (``--arch mamba2``, ``from_hf_mamba2``): equations, streaming, import,
state reduction and training with in-training cuts.

Two references independent of the package: the Mamba-2 mixer written out as a float64 numpy
loop over time from the raw parameters (heads, groups, scalar decay per head, the gated
group RMSNorm), and ``transformers``' own ``Mamba2ForCausalLM`` forward on CPU (its torch
path: chunked SSD), on models with every parameter perturbed off its init. Nothing is
downloaded.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import small_trainer

from compressm_tune.errors import ConfigError
from compressm_tune.models import (
    Mamba2Layer,
    SSMConfig,
    SSMModel,
    _triton,
    from_hf_mamba2,
    ssd_scan,
)
from compressm_tune.reduction import (
    ReduceConfig,
    Reducer,
    ReductionPolicy,
    layer_inputs,
    reduce_layer,
    select_states,
    state_scores,
)
from compressm_tune.training import model_from_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB = 30


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def _layer(h=8, n=5, seed=0, dtype=torch.float64, **kw) -> Mamba2Layer:
    torch.manual_seed(seed)
    layer = Mamba2Layer(d_model=h, state_dim=n, dtype=dtype, **kw)
    _perturb(layer, seed + 100)
    return layer


def _silu(v):
    return v / (1 + np.exp(-v))


def _numpy_mamba2(layer: Mamba2Layer, u: np.ndarray) -> np.ndarray:
    """Mamba-2's mixer as a float64 loop: ``u (B, L, H) -> (B, L, H)``."""
    p = {k: v.detach().double().numpy() for k, v in layer.named_parameters()}
    e, n, k = layer.d_inner, layer.state_dim, layer.d_conv
    nh, hd, g = layer.n_heads, layer.head_dim, layer.n_groups
    # transformers' in_proj rows [z, x, B, C, dt] and conv channels [x, B, C]
    zx, dt_w = p["in_proj.weight"][:2 * e], p["in_proj.weight"][2 * e:]
    w_in = np.concatenate([zx, p["bc_proj"].reshape(2 * g * n, -1), dt_w])
    b_in = (np.concatenate([p["in_proj.bias"][:2 * e], p["bc_bias"].ravel(),
                            p["in_proj.bias"][2 * e:]]) if "bc_bias" in p else 0.0)
    w_conv = np.concatenate([p["conv1d.weight"][:, 0], p["bc_conv"].reshape(2 * g * n, k)])
    b_conv = (np.concatenate([p["conv1d.bias"], p["bc_conv_bias"].ravel()])
              if "bc_conv_bias" in p else np.zeros(len(w_conv)))
    a = -np.exp(p["A_log"])  # (nh,)
    batch, length, _ = u.shape
    out = np.zeros_like(u)
    for b in range(batch):
        state = np.zeros((nh, hd, n))
        seen = []
        for t in range(length):
            proj = w_in @ u[b, t] + b_in
            z, xbc, dt = proj[:e], proj[e:2 * e + 2 * g * n], proj[2 * e + 2 * g * n:]
            seen.append(xbc)
            conv = b_conv.copy()
            for j in range(k):  # kernel tap j multiplies the input k - 1 - j steps back
                s = t - (k - 1) + j
                if s >= 0:
                    conv += w_conv[:, j] * seen[s]
            conv = _silu(conv)
            x, bt, ct = conv[:e], conv[e:e + g * n], conv[e + g * n:]
            delta = np.logaddexp(0, dt + p["dt_bias"])  # (nh,)
            if layer.dt_limit is not None:
                delta = np.clip(delta, *layer.dt_limit)
            y = np.zeros(e)
            for head in range(nh):
                grp = head // (nh // g)
                bg, cg = bt[grp * n:(grp + 1) * n], ct[grp * n:(grp + 1) * n]
                xh = x[head * hd:(head + 1) * hd]
                state[head] = (np.exp(delta[head] * a[head]) * state[head]
                               + delta[head] * xh[:, None] * bg[None, :])
                y[head * hd:(head + 1) * hd] = state[head] @ cg + p["D"][head] * xh
            gated = (y * _silu(z)).reshape(g, -1)
            normed = gated / np.sqrt((gated ** 2).mean(-1, keepdims=True) + layer.norm_eps)
            out[b, t] = (p["out_proj.weight"] @ (normed.ravel() * p["norm_weight"])
                         + p.get("out_proj.bias", 0))
    return out


# ----------------------------------------------------------------------------- the layer

LAYER_VARIANTS = [
    {"head_dim": 4},
    {"head_dim": 2, "n_groups": 2, "bias": True, "conv_bias": False, "d_conv": 3,
     "dt_limit": (0.05, 0.4), "expand": 1},
]


@pytest.mark.parametrize("kw", LAYER_VARIANTS, ids=["groups1", "groups2-variant"])
def test_layer_matches_the_plain_loop_reference(kw):
    layer = _layer(**kw)
    u = torch.randn(2, 11, 8, dtype=torch.float64)
    want = _numpy_mamba2(layer, u.numpy())
    np.testing.assert_allclose(layer(u).detach().numpy(), want, rtol=1e-9, atol=1e-10)
    # float32, the training precision: the same chunked SSD
    got32 = layer.float()(u.float()).detach().numpy()
    np.testing.assert_allclose(got32, want, rtol=1e-4, atol=1e-5)


def test_float32_gradients_match_float64():
    layer = _layer(dtype=torch.float32, head_dim=2, n_groups=2)
    ref = copy.deepcopy(layer).double()  # the same weights
    u = torch.randn(3, 150, 8)  # three chunks
    layer(u).square().sum().backward()
    ref(u.double()).square().sum().backward()
    for (name, p), q in zip(layer.named_parameters(), ref.parameters(), strict=True):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-3,
                                   atol=1e-4 * float(q.grad.abs().max()), err_msg=name)


@pytest.mark.parametrize("length,chunk", [(11, 4), (16, 4), (7, 64)])
def test_chunked_ssd_equals_the_recurrence(length, chunk):
    """Several chunks, a padded last one, one short chunk; the returned last state too."""
    gen = torch.Generator().manual_seed(length)
    b, nh, p, g, n = 2, 4, 3, 2, 5

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x, bt, ct = rand(b, length, nh, p), rand(b, length, g, n), rand(b, length, g, n)
    delta = torch.rand(b, length, nh, generator=gen, dtype=torch.float64) + 0.1
    A = -torch.rand(nh, generator=gen, dtype=torch.float64) * 2
    y, last = ssd_scan(x, delta, A, bt, ct, chunk=chunk, return_state=True)
    head_group = torch.arange(nh) // (nh // g)
    state, want = torch.zeros(b, nh, p, n, dtype=torch.float64), []
    for t in range(length):
        decay = torch.exp(delta[:, t] * A)[..., None, None]  # (b, nh, 1, 1)
        drive = (delta[:, t, :, None] * x[:, t])[..., None] * bt[:, t, head_group, None, :]
        state = decay * state + drive
        want.append((state @ ct[:, t, head_group, :, None]).squeeze(-1))
    torch.testing.assert_close(y, torch.stack(want, 1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(last, state, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("vocab", [None, 13])
def test_streaming_equals_the_sequence_with_per_layer_widths(vocab):
    torch.manual_seed(1)
    cfg = SSMConfig(arch="mamba2", d_input=2, d_output=3, d_model=8, state_dims=[6, 3],
                    head_dim=4, n_groups=2, vocab_size=vocab,
                    pooling="none" if vocab else "mean")
    model = SSMModel(cfg).double().eval()
    _perturb(model, 2)
    x = torch.randint(13, (2, 9)) if vocab else torch.randn(2, 9, 2, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        state = model.allocate_state(2)
        # (batch, (E + 2GN)(K - 1) + E N): E = 16, G = 2, K = 4
        assert [s.shape for s in state[:2]] == [(2, (16 + 24) * 3 + 16 * 6),
                                                 (2, (16 + 12) * 3 + 16 * 3)]
        conv, ssm = model.blocks[1].ssm.split_state(state[1])
        assert conv.shape == (2, 28, 3) and ssm.shape == (2, 4, 4, 3)
        ys = []
        for t in range(9):
            y, state = model.step(x[:, t], state)
            ys.append(y)
    got = ys[-1] if cfg.pooling == "mean" else torch.stack(ys, 1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert model.state_dims == [6, 3] and model.config.state_dims == [6, 3]


def test_bad_shapes_are_refused():
    with pytest.raises(ConfigError, match="head_dim must divide"):
        SSMConfig(arch="mamba2", d_model=8, state_dims=[4], head_dim=5)
    with pytest.raises(ConfigError, match="n_groups"):
        SSMConfig(arch="mamba2", d_model=8, state_dims=[4], head_dim=8, n_groups=3)
    with pytest.raises(ConfigError, match="dt_limit"):
        SSMConfig(arch="mamba2", d_model=8, state_dims=[4], dt_limit=[0.5, 0.1])


# ----------------------------------------------------------------------------- import


def _hf(cls=None, seed=0, **overrides):
    torch.manual_seed(seed)
    kw = {"vocab_size": VOCAB, "hidden_size": 16, "state_size": 16, "num_hidden_layers": 2,
          "num_heads": 4, "head_dim": 8, "n_groups": 1, "chunk_size": 8} | overrides
    model = (cls or transformers.Mamba2ForCausalLM)(transformers.Mamba2Config(**kw)).eval()
    _perturb(model, seed + 1, 0.05)
    return model


def _ids(batch=2, length=21, seed=1):
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


HF_VARIANTS = {
    "groups1-N16": {},
    "groups2-N64-bias": {"n_groups": 2, "state_size": 64, "num_heads": 8, "head_dim": 4,
                         "use_bias": True},
    "heads2-tied-noconvbias": {"num_heads": 2, "head_dim": 16, "n_groups": 2,
                               "use_conv_bias": False, "tie_word_embeddings": True,
                               "conv_kernel": 3, "layer_norm_epsilon": 1e-3},
    "expand3-dtlimit": {"expand": 3, "num_heads": 6, "head_dim": 8, "n_groups": 3,
                        "time_step_limit": (0.01, 0.2), "state_size": 8},
}


@pytest.mark.parametrize("overrides", HF_VARIANTS.values(), ids=HF_VARIANTS.keys())
def test_logits_match_transformers(overrides):
    hf = _hf(**overrides)
    model = from_hf_mamba2(hf)
    ids = _ids()
    with torch.no_grad():
        want = hf(ids).logits
        got = model(ids)
    assert got.shape == want.shape == (2, 21, VOCAB)
    assert float((got - want).abs().max()) <= 1e-4
    cfg = model.config
    assert (cfg.arch, cfg.pooling, cfg.vocab_size) == ("mamba2", "none", VOCAB)
    assert model.state_dims == [hf.config.state_size] * 2


def test_mamba2_model_gives_the_last_hidden_states():
    hf = _hf(transformers.Mamba2Model, n_groups=2)
    ids = _ids()
    with torch.no_grad():
        want = hf(ids).last_hidden_state
        got = from_hf_mamba2(hf)(ids)
    assert float((got - want).abs().max()) <= 1e-4


def test_local_directory_and_bad_input(tmp_path):
    hf = _hf(n_groups=2)
    hf.save_pretrained(tmp_path / "m")
    ids = _ids()
    with torch.no_grad():
        assert float((from_hf_mamba2(tmp_path / "m")(ids) - hf(ids).logits).abs().max()) <= 1e-4
    with pytest.raises(ConfigError, match="no config.json"):
        from_hf_mamba2(tmp_path / "missing")
    with pytest.raises(ConfigError, match="Mamba2ForCausalLM or Mamba2Model"):
        from_hf_mamba2(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="hidden_act"):
        from_hf_mamba2(_hf(hidden_act="gelu"))
    mamba1 = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=8, state_size=4, num_hidden_layers=1))
    mamba1.save_pretrained(tmp_path / "m1")
    with pytest.raises(ConfigError, match="not a Mamba-2 'mamba2'"):
        from_hf_mamba2(tmp_path / "m1")


def _sliced_hf(hf, keep: torch.Tensor):
    """transformers' model with only the states ``keep`` in every layer: a new config with
    ``state_size = len(keep)`` and the B/C rows of in_proj and conv1d sliced by hand."""
    c = hf.config
    small = transformers.Mamba2ForCausalLM(
        transformers.Mamba2Config(**(c.to_dict() | {"state_size": len(keep)}))).eval()
    e, g, n = c.expand * c.hidden_size, c.n_groups, c.state_size
    rows = torch.cat([torch.arange(e), *(e + part * g * n + grp * n + keep
                                         for part in (0, 1) for grp in range(g))])
    in_rows = torch.cat([torch.arange(e), e + rows, torch.arange(2 * e + 2 * g * n,
                                                                 2 * e + 2 * g * n + c.num_heads)])
    state = {}
    for name, value in hf.state_dict().items():
        if name.endswith("mixer.in_proj.weight") or name.endswith("mixer.in_proj.bias"):
            value = value[in_rows]
        elif name.endswith("mixer.conv1d.weight") or name.endswith("mixer.conv1d.bias"):
            value = value[rows]
        state[name] = value
    small.load_state_dict(state)
    return small


def test_cut_model_equals_transformers_with_the_states_sliced():
    hf = _hf(n_groups=2, state_size=12, num_heads=8, head_dim=4, use_bias=True)
    model = from_hf_mamba2(hf)
    keep = torch.tensor([0, 3, 4, 9, 11])
    for layer in model.ssm_layers():
        layer.keep_states(keep)
    assert model.state_dims == [5, 5] and model.config.state_dims == [5, 5]
    ids = _ids()
    with torch.no_grad():
        want = _sliced_hf(hf, keep)(ids).logits
        assert float((model(ids) - want).abs().max()) <= 1e-4
        assert float((hf(ids).logits - want).abs().max()) > 1e-3  # the cut changed something


# ----------------------------------------------------------------------------- reduction


def _restricted(layer: Mamba2Layer, keep: torch.Tensor, **kw) -> Mamba2Layer:
    """A fresh layer of width len(keep) with the kept states' parameters copied by hand."""
    small = Mamba2Layer(layer.d_model, len(keep), dtype=torch.float64, **kw)
    with torch.no_grad():
        for name, p in small.named_parameters():
            src = layer.get_parameter(name)
            p.copy_(src[:, :, keep] if name.startswith("bc_") else src)
    return small


def _numpy_importance(layer: Mamba2Layer, u: torch.Tensor) -> np.ndarray:
    """sqrt(mean over batch and time of sum over channels of x_t^2 q_t), per state, from the
    layer's own projections but the recurrences written out per head."""
    z, x, b, c, delta = (t.detach().numpy() for t in layer._ssm_inputs(u))
    a = -np.exp(layer.A_log.detach().numpy())
    nh, hd, g = layer.n_heads, layer.head_dim, layer.n_groups
    batch, length = x.shape[:2]
    total = np.zeros(layer.state_dim)
    for head in range(nh):
        grp = head // (nh // g)
        decay = np.exp(delta[:, :, head] * a[head])  # (B, L)
        xs = np.zeros((batch, length, hd, layer.state_dim))
        state = 0.0
        for t in range(length):
            drive = (delta[:, t, head, None] * x[:, t, head * hd:(head + 1) * hd])
            state = decay[:, t, None, None] * state + drive[..., None] * b[:, t, grp, None, :]
            xs[:, t] = state
        q = np.zeros((batch, layer.state_dim))
        for t in reversed(range(length)):
            nxt = decay[:, t + 1] if t + 1 < length else np.zeros(batch)
            q = c[:, t, grp] ** 2 + nxt[:, None] ** 2 * q
            total += (xs[:, t] ** 2 * q[:, None, :]).sum((0, 1))
    return np.sqrt(total / (batch * length))


def test_state_importance_matches_the_plain_loop_and_cuts_keep_outputs():
    kw = {"head_dim": 2, "n_groups": 2}
    layer = _layer(n=8, seed=3, **kw)
    with torch.no_grad():
        layer.bc_conv[0, :, 5] = 0.0  # state 5's B is zero in every group: never driven
        layer.bc_conv_bias[0, :, 5] = 0.0
    u = torch.randn(3, 20, 8, dtype=torch.float64)
    scores = state_scores(layer, u)  # float64: the torch path
    np.testing.assert_allclose(scores, _numpy_importance(layer, u), rtol=1e-8)
    assert scores[5] == 0.0 and (np.delete(scores, 5) > 0).all()
    scores32 = state_scores(copy.deepcopy(layer).float(), u.float())  # the fused kernel
    np.testing.assert_allclose(scores32, scores, rtol=1e-3)
    keep = torch.from_numpy(np.sort(np.argsort(-scores)[:3]))
    small = _restricted(layer, keep, **kw)
    assert reduce_layer(layer, 3, scores=scores).tolist() == keep.tolist()
    assert layer.state_dim == 3 and layer.allocate_state(1).shape == (1, (16 + 12) * 3 + 16 * 3)
    torch.testing.assert_close(layer(u), small(u))
    np.testing.assert_allclose(layer(u).detach().numpy(), _numpy_mamba2(small, u.numpy()),
                               rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="distinct state indices"):
        layer.keep_states(torch.tensor([0, 0]))


@pytest.mark.triton
@pytest.mark.skipif(not _triton.available(), reason="triton is not installed")
def test_triton_importance_of_the_folded_groups_matches_float64():
    """The Triton importance kernel (CUDA, or the interpreter on CPU) on Mamba-2's folded
    scan inputs against the float64 torch path."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = _layer(h=4, n=6, seed=5, dtype=torch.float32, head_dim=2, n_groups=2)
    u = torch.randn(2, 19, 4)
    with torch.no_grad():
        inputs = layer.to(device).scan_inputs(u.to(device))
    got = _triton.selective_importance(*(t.contiguous() for t in inputs)).cpu()
    want = state_scores(copy.deepcopy(layer).cpu().double(), u.double())
    np.testing.assert_allclose((got / (2 * 19)).sqrt().numpy(), want, rtol=1e-4,
                               atol=1e-7 * want.max())


def test_magnitude_selection_ranks_by_weight_norms():
    layer = _layer(n=6)
    with torch.no_grad():
        layer.bc_proj[1, :, [1, 4]] *= 10.0  # C rows of states 1 and 4 much larger
    assert select_states(layer, np.zeros(6), 2, "magnitude").tolist() == [1, 4]


def test_imported_model_scores_on_its_own_inputs():
    hf = _hf(n_groups=2, state_size=16)
    model = from_hf_mamba2(hf)
    ids = _ids(batch=3, length=16)
    inputs = layer_inputs(model, ids)
    assert [tuple(u.shape) for u in inputs] == [(3, 16, 16)] * 2
    for layer, u, width in zip(model.ssm_layers(), inputs, (6, 10), strict=True):
        reduce_layer(layer, width, scores=state_scores(layer, u))
    assert model.state_dims == [6, 10] and model.config.state_dims == [6, 10]
    assert model(ids).shape == (3, 16, VOCAB)


def test_in_training_reduction_carries_moments_and_reloads(mnist1d, tmp_path):
    reducer = Reducer(ReduceConfig(policy=ReductionPolicy("fraction", 0.5), window=0.5,
                                   max_drop=1.0, calibration=32, schedule="window"))
    trainer = small_trainer(mnist1d, tmp_path, "mamba2", 8, [8, 6], reducer)
    summary = trainer.fit()
    assert summary["final_state_dims"] == [4, 3]
    layer = trainer.model.blocks[0].ssm
    assert isinstance(layer, Mamba2Layer)
    for name in layer.state_axes:  # the optimizer holds the cut parameters' moments
        assert trainer.optimizer.state[layer.get_parameter(name)]["exp_avg_sq"].shape[2] == 4
    reloaded = model_from_checkpoint(tmp_path / "last.pt")
    assert reloaded.config.arch == "mamba2" and reloaded.state_dims == [4, 3]


def test_compressor_cuts_an_imported_mamba2_in_a_plain_loop():
    from compressm_tune.reduction import Compressor

    model = from_hf_mamba2(_hf(n_groups=2, state_size=8)).train()
    ids = _ids(batch=4, length=24, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step() -> float:
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    train_step()
    layer = model.blocks[0].ssm
    old = opt.state[layer.bc_conv]["exp_avg_sq"].clone()
    c = Compressor(model, opt, reduce="rank=3", total_steps=100, every=1,
                   calibration=ids[:, :-1])
    c.step(1)
    assert model.state_dims == [3, 3]
    moments = opt.state[layer.bc_conv]["exp_avg_sq"]  # the kept states' moments, unchanged
    assert moments.shape == layer.bc_conv.shape == (2, 2, 3, 4)
    for j in range(3):
        assert any(torch.equal(moments[:, :, j], old[:, :, i]) for i in range(8))
    assert np.isfinite(train_step())


def test_export_refuses_a_mamba2_network_in_one_line():
    from compressm_tune.errors import ExportError
    from compressm_tune.exporter import extract_weights

    model = SSMModel(SSMConfig(arch="mamba2", d_model=8, state_dims=[4], head_dim=4))
    with pytest.raises(ExportError, match="not a Mamba2Layer") as info:
        extract_weights(model)
    assert "\n" not in str(info.value)


def test_train_command_trains_and_cuts_a_mamba2(mnist1d, tmp_path):
    from compressm_tune.cli import main

    code = main(["-q", "train", "--dataset", "mnist1d", "--arch", "mamba2", "--hidden", "8",
                 "--head-dim", "4", "--n-groups", "2", "--blocks", "1", "--state-dim", "8",
                 "--steps", "8", "--eval-every", "4", "--reduce", "rank=4", "--window", "0.5",
                 "--schedule", "window", "--max-drop", "inf", "--threads", "1",
                 "--out", str(tmp_path / "run")])
    assert code == 0
    model = model_from_checkpoint(tmp_path / "run" / "last.pt")
    cfg = model.config
    assert (cfg.arch, cfg.head_dim, cfg.n_groups, cfg.state_dims) == ("mamba2", 4, 2, [4])
    assert model.blocks[0].ssm.n_heads == 4
