"""Tests for the Compressor: in-training reduction inside a plain PyTorch loop.

References are independent of the package's reduction code: a dense square-root balanced
truncation written here from scipy's Lyapunov solver, and transfer functions evaluated
directly as ``C (zI - A)^-1 B``.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg as sla
import torch
import torch.nn.functional as F
from torch import nn

from compressm_tune import Compressor
from compressm_tune.errors import ConfigError
from compressm_tune.models import SSMConfig, SSMModel

README = Path(__file__).resolve().parent.parent / "README.md"


class DiagonalLTI(nn.Module):
    """A user's own complex diagonal LTI layer, written only against the documented protocol:
    ``x_k = lam x_{k-1} + B u_k``, ``y_k = Re(C x_k) + D u_k``, ``|lam| < 1`` by construction."""

    def __init__(self, h: int, n: int) -> None:
        super().__init__()
        self.log_decay = nn.Parameter(torch.rand(n) * 2 - 3)  # |lam| = exp(-exp(.)) in (.9, 1)
        self.phase = nn.Parameter(torch.rand(n) * math.pi)
        self.B = nn.Parameter(torch.randn(n, h, 2) / math.sqrt(h))  # (N, H, re/im)
        self.C = nn.Parameter(torch.randn(h, n, 2) / math.sqrt(n))  # (H, N, re/im)
        self.D = nn.Parameter(torch.randn(h))

    def _lam(self) -> torch.Tensor:
        return torch.polar(torch.exp(-torch.exp(self.log_decay)), self.phase)  # (N,) complex

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # (batch, L, H)
        lam, b, c = self._lam(), torch.view_as_complex(self.B), torch.view_as_complex(self.C)
        x = torch.zeros(u.shape[0], len(lam), dtype=lam.dtype)
        ys = []
        for t in range(u.shape[1]):
            x = lam * x + u[:, t].to(b.dtype) @ b.T  # (batch, N)
            ys.append((x @ c.T).real + self.D * u[:, t])
        return torch.stack(ys, 1)

    def system(self):
        with torch.no_grad():
            return (self._lam().cdouble(), torch.view_as_complex(self.B).cdouble(),
                    torch.view_as_complex(self.C).cdouble(), self.D.detach().double())

    def load_system_parameters(self, lam, B, C, D) -> None:
        self.log_decay = nn.Parameter(torch.log(-torch.log(lam.abs())).float())
        self.phase = nn.Parameter(lam.angle().float())
        self.B = nn.Parameter(torch.view_as_real(B).float().contiguous())
        self.C = nn.Parameter(torch.view_as_real(C).float().contiguous())


def _transfer(lam, b, c, z):
    """``C (zI - diag(lam))^-1 B`` at each point of ``z``: (len(z), H_out, H_in)."""
    lam, b, c = (np.asarray(v, dtype=complex) for v in (lam, b, c))
    return np.stack([(c / (zk - lam)[None, :]) @ b for zk in z])


def _reference_truncation(lam, b, c, r):
    """Dense square-root balanced truncation from scipy's Lyapunov solver: (A_r, B_r, C_r)
    and the Hankel singular values."""
    a = np.diag(lam)
    p = sla.solve_discrete_lyapunov(a, b @ b.conj().T)  # A P A^H - P + B B^H = 0
    q = sla.solve_discrete_lyapunov(a.conj().T, c.conj().T @ c)
    lc, lo = np.linalg.cholesky(p), np.linalg.cholesky(q)
    u, s, vh = np.linalg.svd(lo.conj().T @ lc)
    t = lc @ vh[:r].conj().T / np.sqrt(s[:r])
    ti = (u[:, :r].conj().T @ lo.conj().T) / np.sqrt(s[:r])[:, None]
    return ti @ a @ t, ti @ b, c @ t, s


def _loop(model, opt, x, y, steps, compressor, loss_fn):
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        compressor.step(step)


def test_a_users_own_lti_layer_is_reduced_as_balanced_truncation_says():
    torch.manual_seed(0)
    layer = DiagonalLTI(h=3, n=10)
    model = nn.Sequential(nn.Linear(2, 3), layer, nn.Linear(3, 1))
    lam0, b0, c0, _ = (v.numpy() for v in layer.system())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    c = Compressor(model, opt, reduce="rank=4", total_steps=10, window=0.1, every=1)
    assert c.layer_names == ["1"]
    events = c.step(1)  # an attempt point: cut, no validation (none given)
    assert [(e["layer"], e["action"], e["n_before"], e["n_after"]) for e in events] == [
        ("1", "cut", 10, 4)]
    lam, b, cc, _ = (v.numpy() for v in layer.system())
    assert lam.shape == (4,) and np.all(np.abs(lam) < 1)
    a_r, b_r, c_r, hsv = _reference_truncation(lam0, b0, c0, 4)
    z = np.exp(1j * np.linspace(0, 2 * np.pi, 64, endpoint=False))
    want = np.stack([c_r @ np.linalg.solve(zk * np.eye(4) - a_r, b_r) for zk in z])
    got = _transfer(lam, b, cc, z)
    scale = np.abs(_transfer(lam0, b0, c0, z)).max()
    np.testing.assert_allclose(got, want, atol=1e-5 * scale)  # float32 storage of the layer
    error = np.linalg.norm(got - _transfer(lam0, b0, c0, z), ord=2, axis=(1, 2)).max()
    assert error <= 2 * hsv[4:].sum() * (1 + 1e-4)  # the balanced-truncation bound
    out = model(torch.randn(2, 7, 2))  # the reduced layer runs and trains on
    out.sum().backward()
    opt.step()
    assert opt.state[layer.B]["exp_avg"].shape == (4, 3, 2)


def _trained(dims=(16, 4), arch="lru", steps=3):
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(arch=arch, d_input=2, d_output=3, d_model=8, state_dims=list(dims)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 12, 2), torch.randint(0, 3, (8,))
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, x


def test_untouched_parameters_keep_their_optimizer_state_bit_for_bit():
    model, opt, x = _trained()
    cut_layer = model.blocks[0].ssm
    cut_names = {f"blocks.0.ssm.{n}" for n in cut_layer.state_axes}
    before = {name: (p, {k: v.clone() for k, v in opt.state[p].items()}, opt.state[p])
              for name, p in model.named_parameters() if name not in cut_names}
    c = Compressor(model, opt, reduce="rank=4", total_steps=100, every=1)
    assert [e["n_after"] for e in c.step(1)] == [4]  # layer 1 already has 4 states
    assert model.state_dims == [4, 4]
    held = [p for group in opt.param_groups for p in group["params"]]
    assert len(held) == len(set(map(id, held))) == len(list(model.parameters()))
    assert {id(p) for p in held} == {id(p) for p in model.parameters()}
    for name, (p, values, state) in before.items():
        assert dict(model.named_parameters())[name] is p, name
        assert opt.state[p] is state, name  # the very tensors
        for key, value in values.items():
            assert torch.equal(opt.state[p][key], value), (name, key)
    for name in cut_layer.state_axes:  # the cut parameters start afresh (reset)
        assert not opt.state.get(getattr(cut_layer, name))
    new = cut_layer.B_re
    assert any(new is p for p in opt.param_groups[0]["params"])  # same group as the old B_re
    F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
    opt.step()
    assert opt.state[new]["exp_avg"].shape == (4, 8)


def test_a_selective_layer_keeps_the_moments_of_its_kept_states_exactly():
    model, opt, x = _trained(dims=(8,), arch="selective")
    layer = model.blocks[0].ssm
    old = {name: opt.state[getattr(layer, name)]["exp_avg_sq"].clone()
           for name in layer.state_axes}
    c = Compressor(model, opt, reduce="rank=3", total_steps=100, every=1, calibration=x)
    c.step(1)
    assert model.state_dims == [3]
    for name, axis in layer.state_axes.items():
        moments = opt.state[getattr(layer, name)]["exp_avg_sq"]
        assert moments.shape == getattr(layer, name).shape
        # each kept state's moments are one of the old states' moments, unchanged
        for j in range(3):
            col = moments.select(axis, j)
            assert any(torch.equal(col, old[name].select(axis, i)) for i in range(8)), name


def test_a_cut_that_hurts_validation_is_rolled_back_exactly(caplog):
    model, opt, x = _trained()
    params = dict(model.named_parameters())
    groups = [list(g["params"]) for g in opt.param_groups]
    states = {p: opt.state[p] for p in params.values()}
    outputs = model.eval()(x)
    model.train()
    calls = []

    def validate():  # any cut costs 40 points
        calls.append(model.state_dims)
        return {"accuracy": 0.9 if model.state_dims == [16, 4] else 0.5}

    c = Compressor(model, opt, reduce="rank=2", total_steps=100, every=1, validate=validate,
                   max_drop=0.02)
    with caplog.at_level(logging.INFO, logger="compressm_tune.compressor"):
        events = c.step(1)
    # the joint cut fails, then each layer alone fails and is frozen
    assert calls == [[16, 4], [2, 2], [2, 4], [16, 2]]
    assert [(e["layer"], e["action"]) for e in events] == [("blocks.0.ssm", "rollback"),
                                                            ("blocks.1.ssm", "rollback")]
    assert events[0]["val_before"] == {"accuracy": 0.9} and "rollback" in caplog.text
    assert model.state_dims == [16, 4] and c.reducer.frozen == {0, 1}
    assert all(dict(model.named_parameters())[n] is p for n, p in params.items())
    assert [list(g["params"]) for g in opt.param_groups] == groups
    assert all(opt.state[p] is s for p, s in states.items())
    assert torch.equal(model.eval()(x), outputs)
    assert c.step(2) == []  # frozen: no further attempt on that layer, no validation


def test_on_cut_is_called_after_a_step_that_changed_widths_only():
    """The re-wrap hook of a DistributedDataParallel loop: once per step whose cuts were kept
    (the optimizer already holds the new parameters), never after a rolled-back cut."""
    model, opt, _ = _trained()
    seen = []

    def on_cut():
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        seen.append((list(model.state_dims), all(id(p) in held for p in model.parameters())))

    fail = {"on": True}
    c = Compressor(model, opt, reduce="rank=2", total_steps=100, every=1, window=0.05,
                   validate=lambda: {"accuracy": 0.5 if fail["on"] and model.state_dims != [
                       16, 4] else 0.9}, on_cut=on_cut)
    c.step(1)  # rolled back, both layers frozen
    assert seen == [] and model.state_dims == [16, 4]
    c.reducer.frozen.clear()
    fail["on"] = False
    c.step(2)
    assert seen == [([2, 2], True)]
    c.step(3)  # nothing left to cut
    assert len(seen) == 1


def test_plain_training_loop_compresses_and_keeps_learning():
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(d_input=1, d_output=2, d_model=8, state_dims=[24, 24]))
    x = torch.randn(64, 20, 1)
    y = (x.sum(dim=(1, 2)) > 0).long()  # the sign of the sum: learnable by a linear state
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    calls = []

    def validate():
        calls.append(1)
        with torch.no_grad():
            model.eval()
            return {"loss": F.cross_entropy(model(x), y).item()}

    c = Compressor(model, opt, reduce="fraction=0.5", total_steps=60, window=0.1, every=2,
                   validate=validate, max_drop=10.0, calibration=x)
    first = F.cross_entropy(model(x), y).item()
    _loop(model, opt, x, y, 60, c, F.cross_entropy)
    sched.step()  # the scheduler still drives the same optimizer
    assert [e["step"] for e in c.events] == [2, 2, 4, 4, 6, 6] and calls
    assert model.state_dims == [3, 3] == list(c.widths.values())
    assert F.cross_entropy(model(x), y).item() < 0.5 * first


def test_bad_requests_fail_with_one_clear_line():
    model, opt, x = _trained()
    with pytest.raises(ConfigError, match="keys are one of"):
        Compressor(model, opt, reduce="tua=0.1", total_steps=10)
    with pytest.raises(ConfigError, match="tau must be"):
        Compressor(model, opt, reduce="tau=2", total_steps=10)
    with pytest.raises(ConfigError, match="total_steps"):
        Compressor(model, opt, total_steps=0)
    mlp = nn.Sequential(nn.Linear(2, 4), nn.ReLU())
    with pytest.raises(ConfigError, match="Sequential holds no reducible layer"):
        Compressor(mlp, torch.optim.SGD(mlp.parameters(), lr=0.1), total_steps=10)
    sel, sel_opt, _ = _trained(dims=(4,), arch="selective", steps=0)
    with pytest.raises(ConfigError, match="calibration="):
        Compressor(sel, sel_opt, total_steps=10)
    c = Compressor(model, opt, reduce="rank=2", total_steps=10, every=1, validate=lambda: 0.5)
    with pytest.raises(ConfigError, match="must return a dict"):
        c.step(1)


def _readme_example() -> str:
    text = README.read_text()
    section = text.split("## Compress your own training loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(capsys):
    code = _readme_example()
    assert "Compressor(" in code and 10 <= len(code.strip().splitlines()) <= 20
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    widths = re.findall(r"\d+", printed.splitlines()[-1])
    assert widths and all(int(w) < 32 for w in widths), printed  # it did compress


def test_our_layer_inside_a_plain_container_with_sgd_momentum():
    from compressm_tune.models import LRULayer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), LRULayer(8, 12), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(4, 10, 1), torch.randn(4, 10, 2)
    c = Compressor(model, opt, reduce="rank=5", total_steps=20, window=0.1, every=2)
    _loop(model, opt, x, y, 1, c, F.mse_loss)
    kept = {name: opt.state[p]["momentum_buffer"].clone()
            for name, p in model.named_parameters() if not name.startswith("1.")}
    assert c.layer_names == ["1"] and c.step(2)[0]["n_after"] == 5
    for name, p in model.named_parameters():
        if name in kept:
            assert torch.equal(opt.state[p]["momentum_buffer"], kept[name]), name
    assert model[1].D is dict(model.named_parameters())["1.D"] and opt.state[model[1].D]
    _loop(model, opt, x, y, 3, c, F.mse_loss)
    assert opt.state[model[1].B_re]["momentum_buffer"].shape == (5, 8)


def test_a_budget_is_met_once_the_window_closes():
    model, opt, x = _trained()
    c = Compressor(model, opt, reduce="rank=16", total_steps=10, window=0.2, every=1,
                   fits=lambda widths: sum(widths) <= 10)
    assert c.step(1) == [] and c.step(2) == []  # inside the window rank=16 cuts nothing
    events = c.step(3)  # the first step after it
    assert {e["action"] for e in events} == {"budget_cut"} and sum(model.state_dims) <= 10
    assert [e["n_after"] for e in events] == [w for w, e in zip(model.state_dims, [16, 4],
                                                                strict=True) if w < e]
    assert c.step(4) == []  # once
    F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
    opt.step()


def test_a_mamba_network_is_cut_at_its_mamba_layers_not_their_s6_cores() -> None:
    """A MambaLayer holds a selective S6 core (``.s6``) that is reducible on its own; the
    Compressor must cut the Mamba layer as a whole (its conv, gate and projections around the
    core), once, and leave the optimizer holding exactly the model's parameters."""
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(arch="mamba", d_input=1, d_output=2, d_model=8,
                               state_dims=[8, 8]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(32, 16, 1)
    y = (x.sum(dim=(1, 2)) > 0).long()
    c = Compressor(model, opt, reduce="rank=3", window=0.5, total_steps=4, every=1,
                   calibration=x)
    for step in range(1, 5):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        c.step(step)
    assert model.state_dims == [3, 3]
    assert [e["layer"] for e in c.events] == ["blocks.0.ssm", "blocks.1.ssm"]
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters()}


def test_settle_schedule_cuts_toward_the_knee_once_the_spectrum_has_settled():
    """Four states of equal decay and twelve whose input weights are 1e-6 of theirs: the
    tau=0.04 target is the four. With a frozen model (lr 0) the spectrum is settled from the
    start, so the rule of ``reduction/_schedules.py`` cuts at its third check (patience 2), at
    most halving: 16 -> 8, then after three checks on the new basis 8 -> 4, and stops."""
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(d_input=1, d_output=2, d_model=4, state_dims=[16]))
    layer = model.blocks[0].ssm
    with torch.no_grad():
        layer.nu_log.fill_(float(layer.nu_log.mean()))
        layer.B_re[4:] *= 1e-6
        layer.B_im[4:] *= 1e-6
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    c = Compressor(model, opt, reduce="tau=0.04", total_steps=240, window=0.5,
                   schedule="settle")  # 12 checks in 120 steps: every 10
    for step in range(1, 241):
        c.step(step)
    cuts = [(e["step"], e["n_before"], e["n_after"]) for e in c.events if e["action"] == "cut"]
    assert cuts == [(30, 16, 8), (60, 8, 4)]
    assert c.widths == {"blocks.0.ssm": 4}
