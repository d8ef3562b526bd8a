"""In-training reduction: network-level surgery, the safety net, Adam moments, the CLI path.

References are independent of the package's reduction code where it matters: an unreachable
state added by hand must be removable without changing the network's outputs, and rollbacks
are checked against outputs recorded before the cut.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from compressm_tune.models import SSMConfig, SSMModel
from compressm_tune.reduction import ReduceConfig, Reducer, ReductionPolicy, truncate_layer
from compressm_tune.training import (
    TrainConfig,
    Trainer,
    model_from_checkpoint,
    plot_hsv_trajectories,
    ranking_stability,
    read_metrics,
)


def _outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x).double()


def test_removing_an_unreachable_state_leaves_network_outputs_unchanged():
    """A state whose B row is zero never moves, so cutting exactly it must be invisible."""
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(d_model=8, state_dims=[6, 5], dropout=0.0)).double()
    layer = model.blocks[0].ssm
    with torch.no_grad():
        layer.B_re[2] = 0.0
        layer.B_im[2] = 0.0
    x = torch.randn(4, 30, 1, dtype=torch.float64)
    before = _outputs(model, x)
    truncate_layer(layer, 5)
    assert model.state_dims == [5, 5]
    np.testing.assert_allclose(_outputs(model, x), before, atol=1e-9, rtol=1e-9)


def test_cutting_a_used_state_changes_outputs():
    """The converse, so the test above cannot pass by the cut doing nothing."""
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(d_model=8, state_dims=[6], dropout=0.0)).double()
    x = torch.randn(4, 30, 1, dtype=torch.float64)
    before = _outputs(model, x)
    truncate_layer(model.blocks[0].ssm, 2)
    assert (_outputs(model, x) - before).abs().max() > 1e-4


def test_rank_at_or_above_width_is_a_bit_exact_no_op():
    torch.manual_seed(1)
    model = SSMModel(SSMConfig(d_model=8, state_dims=[6]))
    x = torch.randn(2, 10, 1)
    before = _outputs(model, x)
    params = {n: p for n, p in model.named_parameters()}
    truncate_layer(model.blocks[0].ssm, 6)
    truncate_layer(model.blocks[0].ssm, 60)
    assert torch.equal(_outputs(model, x), before)
    assert all(p is params[n] for n, p in model.named_parameters())


def _trainer(data, tmp_path, reducer=None, steps=40, dims=(32, 32), phase=None):
    cfg = SSMConfig(d_input=data.d_input, d_output=data.d_output, d_model=16,
                    state_dims=list(dims))
    tcfg = TrainConfig(steps=steps, batch_size=32, eval_every=10, seed=0, threads=1)
    return Trainer(cfg, tcfg, data, tmp_path, reducer=reducer, progress=False, phase=phase)


def test_in_training_reduction_shrinks_layers_and_checkpoint_follows(mnist1d, tmp_path):
    reducer = Reducer(ReduceConfig(policy=ReductionPolicy("fraction", 0.5), window=0.5,
                                   max_drop=1.0, schedule="window"))
    trainer = _trainer(mnist1d, tmp_path, reducer)
    summary = trainer.fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    cut_steps = [r["step"] for r in records if any(x["action"] == "cut"
                                                   for x in r.get("reduction", []))]
    assert cut_steps == [10, 20]  # inside the window (20 of 40 steps), not after
    assert summary["final_state_dims"] == [8, 8]  # 32 -> 16 -> 8
    assert model_from_checkpoint(tmp_path / "last.pt").state_dims == [8, 8]
    assert model_from_checkpoint(tmp_path / "best.pt").state_dims == [8, 8]
    hsv = records[0]["reduction"][0]["hsv"]
    assert len(hsv) == 32 and hsv == sorted(hsv, reverse=True)


def test_a_harmful_cut_is_rolled_back_and_the_layer_frozen(mnist1d, tmp_path):
    reducer = Reducer(ReduceConfig(policy=ReductionPolicy("rank", 1), window=1.0,
                                   max_drop=0.0, schedule="window"))
    # keeping 1 of 32 states loses accuracy
    trainer = _trainer(mnist1d, tmp_path, reducer, steps=10)
    trainer.fit()
    before = _outputs(trainer.model, mnist1d.x_val[:50])
    records, _ = reducer.attempt(trainer, trainer.validate())
    assert [r["action"] for r in records] == ["frozen", "frozen"]  # frozen at step 10 already
    assert trainer.model.state_dims == [32, 32]
    assert reducer.frozen == {0, 1}
    torch.testing.assert_close(_outputs(trainer.model, mnist1d.x_val[:50]), before)
    first = read_metrics(tmp_path / "metrics.jsonl")[0]["reduction"]
    assert [r["action"] for r in first] == ["rollback", "rollback"]
    assert first[0]["val_after"]["accuracy"] < first[0]["val_before"]["accuracy"]


def test_rollback_restores_the_exact_pre_cut_weights(mnist1d, tmp_path):
    trainer = _trainer(mnist1d, tmp_path, steps=10)
    trainer.fit()
    before = _outputs(trainer.model, mnist1d.x_val[:50])
    reducer = Reducer(ReduceConfig(policy=ReductionPolicy("rank", 1), max_drop=0.0,
                                   schedule="window"))
    record = {}
    reducer._cut(trainer, 0, 1, trainer.validate(), record)
    assert record["action"] == "rollback"
    assert torch.equal(_outputs(trainer.model, mnist1d.x_val[:50]), before)


@pytest.mark.parametrize("moments", ["reset", "slice"])
def test_adam_moments_after_a_cut(mnist1d, tmp_path, moments):
    trainer = _trainer(mnist1d, tmp_path, steps=5)
    trainer.fit()
    untouched = trainer.model.blocks[1].ssm.B_re
    old_state = trainer.optimizer.state[untouched]
    reducer = Reducer(ReduceConfig(policy=ReductionPolicy("rank", 12), max_drop=1.0,
                                   moments=moments, schedule="window"))
    reducer._cut(trainer, 0, 12, trainer.validate(), {})
    layer = trainer.model.blocks[0].ssm
    assert trainer.optimizer.state[untouched] is old_state  # other layers keep their moments
    for name in ("nu_log", "B_re", "C_im"):
        state = trainer.optimizer.state.get(getattr(layer, name))
        if moments == "reset":
            assert not state
        else:
            assert state["exp_avg"].shape == getattr(layer, name).shape
    trainer.config.steps = 8
    trainer.fit()  # the rebuilt optimizer trains the new parameters
    assert trainer.optimizer.state[layer.B_re]["exp_avg"].shape == (12, 16)


def test_reducer_state_survives_resume(mnist1d, tmp_path):
    reducer = Reducer(ReduceConfig(policy=ReductionPolicy("rank", 1), window=1.0,
                                   max_drop=0.0, schedule="window"))
    _trainer(mnist1d, tmp_path, reducer, steps=10).fit()
    resumed = Reducer(ReduceConfig(policy=ReductionPolicy("rank", 1), window=1.0,
                                   schedule="window"))
    same = SSMConfig(d_input=mnist1d.d_input, d_output=mnist1d.d_output, d_model=16,
                     state_dims=[32, 32])  # the run's own shape: another one is refused
    trainer = Trainer(same, TrainConfig(steps=20, batch_size=32, eval_every=10),
                      mnist1d, tmp_path, reducer=resumed, resume=True, progress=False)
    assert resumed.frozen == {0, 1} and trainer.step == 10


def test_ranking_stability_is_kendall_tau_against_the_final_ranking():
    records = [
        {"step": 1, "spectrum": [{"layer": 0, "hsv": [3, 2, 1], "mode_score": [1, 2, 3]}]},
        {"step": 2, "spectrum": [{"layer": 0, "hsv": [3, 2, 1], "mode_score": [1, 3, 2]}]},
        {"step": 3, "spectrum": [{"layer": 0, "hsv": [3, 2, 1], "mode_score": [3, 2, 1]}]},
        {"step": 4, "spectrum": [{"layer": 0, "hsv": [3, 2], "mode_score": [5, 1]}]},
    ]
    # step 4 has another width (a cut): earlier rankings are compared with step 3's
    stab = ranking_stability(records[:3])[0]
    assert stab == [(1, -1.0), (2, pytest.approx(-1 / 3)), (3, 1.0)]
    assert [s for s, _ in ranking_stability(records)[0]] == [4]


def test_cli_train_with_reduction_end_to_end(tmp_path, capsys):
    from compressm_tune.cli import main

    out = tmp_path / "run"
    code = main(["train", "--dataset", "lti-sysid", "--blocks", "1", "--hidden", "8",
                 "--state-dim", "24", "--steps", "20", "--eval-every", "10", "--batch-size",
                 "16", "--reduce", "tau=0.3", "--window", "0.5", "--reduce-every", "5",
                 "--schedule", "window",
                 "--max-drop", "10", "--log-spectrum", "--no-progress", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_state_dims"][0] < 24
    assert (out / "hsv.png").stat().st_size > 10_000
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == [5, 10, 20]  # attempts every 5 steps inside the window, evals every 10
    assert "test loss" in capsys.readouterr().out


def test_cli_weighting_flag_reaches_the_reducer(tmp_path):
    """Same seed, same weights at the first attempt: only the weighting differs, so the
    logged spectra must differ (input-weighted: the encoder's 1-D input spans one direction)."""
    from compressm_tune.cli import main

    spectra = {}
    for weighting in ("none", "input"):
        out = tmp_path / weighting
        code = main(["train", "--dataset", "lti-sysid", "--blocks", "1", "--hidden", "8",
                     "--state-dim", "24", "--steps", "5", "--eval-every", "5", "--batch-size",
                     "16", "--reduce", "tau=0.01", "--window", "1", "--max-drop", "10",
                     "--schedule", "window",
                     "--weighting", weighting, "--no-progress", "--out", str(out)])
        assert code == 0
        spectra[weighting] = read_metrics(out / "metrics.jsonl")[0]["reduction"][0]["hsv"]
    none, weighted = np.array(spectra["none"]), np.array(spectra["input"])
    assert len(none) == len(weighted) == 24
    assert not np.allclose(none / none[0], weighted / weighted[0], rtol=1e-3)


def test_cli_rejects_a_bad_policy_in_one_line(tmp_path, capsys):
    from compressm_tune.cli import main

    code = main(["train", "--reduce", "tau=2", "--steps", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("compressm-tune: error:")
    assert "tau" in err[0]


def test_hsv_plot_from_reduction_records(tmp_path):
    records = [{"step": s, "reduction": [{"layer": 0, "n": n, "hsv": list(np.linspace(1, .1, n)),
                                          "action": "cut"}]} for s, n in ((1, 10), (2, 8))]
    path = plot_hsv_trajectories(records, tmp_path / "h.png")
    assert path.stat().st_size > 5_000


class _Scripted(Reducer):
    """Cuts each layer to a fixed rank (None: keep), whatever its HSVs say."""

    def __init__(self, ranks, **kw):
        super().__init__(ReduceConfig(**{"schedule": "window", **kw}))
        self.ranks = ranks

    def plan(self, layer, hsv, step):
        return self.ranks[layer]


def _count_validations(trainer):
    """Record the step of every validation pass (``validate`` runs ``validate_samples``)."""
    calls = []
    validate = trainer.validate_samples

    def counted():
        calls.append(trainer.step)
        return validate()

    trainer.validate_samples = counted
    return calls


def test_an_attempt_that_cuts_several_layers_validates_once(mnist1d, tmp_path):
    trainer = _trainer(mnist1d, tmp_path, steps=10)
    trainer.fit()
    calls = _count_validations(trainer)
    records, val = _Scripted([24, 20], max_drop=1.0).attempt(trainer,
                                                             *trainer.validate_samples())
    assert len(calls) == 2  # the one passed in, and one after both cuts
    assert [r["action"] for r in records] == ["cut", "cut"]
    assert trainer.model.state_dims == [24, 20] and val == records[0]["val_after"]


def test_a_failed_joint_cut_freezes_only_the_layer_that_hurts(mnist1d, tmp_path):
    """Layer 0 to 1 state loses accuracy; layer 1 losing two states the input never reaches
    changes nothing. The joint check fails; the retry one layer at a time keeps layer 1's cut."""
    trainer = _trainer(mnist1d, tmp_path, steps=10)
    trainer.fit()
    layer = trainer.model.blocks[1].ssm
    with torch.no_grad():
        layer.B_re[:2] = 0.0
        layer.B_im[:2] = 0.0
    records, _ = _Scripted([1, 30], max_drop=0.0).attempt(trainer, *trainer.validate_samples())
    assert [r["action"] for r in records] == ["rollback", "cut"]
    assert trainer.model.state_dims == [32, 30]
    assert records[0]["val_after"]["accuracy"] < records[0]["val_before"]["accuracy"]


def test_attempts_between_evaluations_validate_only_when_they_cut(mnist1d, tmp_path):
    reducer = _Scripted([None, None], every=1, window=1.0)  # attempts every step, no cuts
    trainer = _trainer(mnist1d, tmp_path, reducer, steps=20)
    calls = _count_validations(trainer)
    trainer.fit()
    assert calls == [10, 20]  # the evaluations only
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 21))  # every attempt is logged
    assert all("val" not in r for r in records if r["step"] % 10)


def test_without_a_safety_net_cuts_validate_only_for_evaluations(mnist1d, tmp_path):
    """max_drop=inf: no checkpoint and no validation around a cut between evaluations (attempts
    at steps 3 and 6; the evaluation at step 10 is past the window and validates as always)."""
    reducer = _Scripted([30, 30], every=3, window=0.5, max_drop=float("inf"))
    trainer = _trainer(mnist1d, tmp_path, reducer, steps=10)
    calls = _count_validations(trainer)
    trainer.fit()
    assert calls == [10]
    assert trainer.model.state_dims == [30, 30]  # cut at step 3
    assert not (tmp_path / "pre_cut.pt").exists()
    first = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert first["step"] == 3 and [r["action"] for r in first["reduction"]] == ["cut", "cut"]
    assert "val" not in first


def test_the_phase_hook_wraps_every_named_phase_of_a_run_with_cuts(mnist1d, tmp_path):
    """One callable given to Reducer and Trainer sees each phase, nested where it runs: cuts
    at steps 10 and 20 (checked, so validated inside the attempt), and a budget that makes
    the window's close at step 30 cut again."""
    entered, stack = [], []

    @contextlib.contextmanager
    def phase(name):
        entered.append((name, tuple(stack)))
        stack.append(name)
        try:
            yield
        finally:
            stack.pop()

    config = ReduceConfig(policy=ReductionPolicy("fraction", 0.5), window=0.5, max_drop=1.0,
                          fits=lambda widths: sum(widths) <= 12, schedule="window")
    trainer = _trainer(mnist1d, tmp_path, Reducer(config, phase=phase), phase=phase)
    summary = trainer.fit()
    assert sum(summary["final_state_dims"]) == 12  # 32 -> 16 -> 8 per layer, then the budget
    names = {name for name, _ in entered}
    assert names == {"eval", "validate", "attempt", "plan", "scores", "cut", "moments",
                     "close_window"}
    assert [n for n, outer in entered if n == "eval" and not outer] == ["eval"] * 4
    for name in ("plan", "scores", "cut", "moments"):
        assert any(outer[-1:] == ("attempt",) for n, outer in entered if n == name), name
    assert any(outer[-1:] == ("close_window",) for n, outer in entered if n == "cut")
    assert ("validate", ("eval", "attempt")) in entered  # the safety net's check
    assert [outer for n, outer in entered if n == "attempt"] == [("eval",)] * 2
    assert not stack


def _one_channel_trainer(data, tmp_path, weighting):
    """A 1-block network on a 1-input task whose encoder writes to channel 0 only; the LRU
    layer's states 0-3 listen to channel 0, states 4-11 to the silent channels 1-3."""
    cfg = SSMConfig(d_input=data.d_input, d_output=data.d_output, d_model=4, state_dims=[12],
                    pooling="none", dropout=0.0)
    tcfg = TrainConfig(steps=1, batch_size=8, eval_every=1, seed=0, threads=1)
    reducer = Reducer(ReduceConfig(policy=ReductionPolicy("tau", 1e-9, weighting=weighting),
                                   max_drop=1e9, schedule="window"))
    trainer = Trainer(cfg, tcfg, data, tmp_path, reducer=reducer, progress=False)
    model = trainer.model
    with torch.no_grad():
        model.encoder.weight[1:] = 0.0
        model.encoder.bias.zero_()
        layer = model.blocks[0].ssm
        for B in (layer.B_re, layer.B_im):
            B[:4, 1:] = 0.0
            B[4:, 0] = 0.0
    return trainer, reducer


def test_input_weighted_reduction_cuts_states_the_data_never_drives(lti_sysid, tmp_path):
    trainer, reducer = _one_channel_trainer(lti_sysid, tmp_path, "input")
    x = lti_sysid.x_val[:16]
    before = _outputs(trainer.model, x)
    records, _ = reducer.attempt(trainer, trainer.validate())
    assert records[0]["action"] == "cut" and trainer.model.state_dims == [4]
    after = _outputs(trainer.model, x)
    np.testing.assert_allclose(after, before, atol=1e-4 * before.abs().max().item())


def test_unweighted_reduction_keeps_the_states_of_silent_channels(lti_sysid, tmp_path):
    """The converse: without the data's weighting the silent channels' states count."""
    trainer, reducer = _one_channel_trainer(lti_sysid, tmp_path, "none")
    reducer.attempt(trainer, trainer.validate())
    assert trainer.model.state_dims[0] > 4


# ----------------------------------------------------------------------------- settle schedule


@pytest.mark.parametrize("tau", [0.04, 0.1])
def test_target_rank_is_the_fixed_point_on_the_spectrum_and_real_cuts_go_further(tau):
    """Reference: the fixed point by hand (cumulative shares, the 0.95 gate) on prefixes of
    one spectrum. Real repeated cuts of a discrete-time layer, recomputing its HSVs after each,
    go further still: truncation shrinks the tail HSVs of what it keeps, so each new cut finds
    more to discard (the compounding the settle schedule's floor stops)."""
    from compressm_tune.models import LRULayer
    from compressm_tune.reduction import plan_rank, state_scores, target_rank

    torch.manual_seed(3)
    layer = LRULayer(d_model=8, state_dim=48).double()
    g = np.sort(state_scores(layer))[::-1]  # (48,)
    r = len(g)
    while True:
        share = np.cumsum(g[:r]) / g[:r].sum()
        new = int(np.argmax(share >= 1 - tau - 1e-12)) + 1
        if new >= 0.95 * r:
            break
        r = new
    policy = ReductionPolicy("tau", tau)
    assert target_rank(g, policy) == r < 48
    while (rank := plan_rank(state_scores(layer), policy)) is not None:
        truncate_layer(layer, rank)
    assert layer.state_dim <= r


def _spectrum(n, target_share):
    """A descending spectrum whose tau=0.04 target is about ``target_share * n``: a plateau of
    large values, then a tail 1000x smaller."""
    head = round(target_share * n)
    return np.concatenate([np.linspace(2.0, 1.0, head), np.full(n - head, 1e-3)])


def test_settle_waits_for_a_stable_target_then_cuts_toward_it():
    from compressm_tune.reduction import SettleConfig, SettleTracker, target_rank

    policy = ReductionPolicy("tau", 0.04)
    tracker = SettleTracker(SettleConfig(drift=0.03, patience=2, min_keep=0.5))
    moving = [_spectrum(100, s) for s in (0.9, 0.7, 0.5)]  # the target is still falling
    assert [tracker.plan(0, g, policy, None, last=False) for g in moving] == [None] * 3
    stable = _spectrum(100, 0.3)
    target = target_rank(stable, policy)
    plans = [tracker.plan(0, stable, policy, None, last=False) for _ in range(3)]
    assert plans[:2] == [None, None] and plans[2] == max(target, 50)  # min_keep caps the step
    # after the cut (new width 50) the history restarts on the new basis
    cut = stable[:50]
    assert tracker.plan(0, cut, policy, None, last=False) is None
    assert tracker.plan(0, cut, policy, None, last=True) == target  # the window's last check
    # the first cut's target is a floor: a later, smaller target does not compound below it
    smaller = _spectrum(target, 0.3)
    assert target_rank(smaller, policy) < target
    assert [tracker.plan(0, smaller, policy, None, last=True) for _ in range(3)] == [None] * 3


def test_settle_state_survives_a_checkpoint_round_trip():
    from compressm_tune.reduction import SettleConfig, SettleTracker, target_rank

    policy = ReductionPolicy("tau", 0.04)
    tracker = SettleTracker(SettleConfig())
    g = _spectrum(64, 0.4)
    for _ in range(3):
        tracker.plan(1, g, policy, None, last=False)
    copy = SettleTracker(SettleConfig())
    copy.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert copy.history == tracker.history and copy.floor == tracker.floor == {
        1: target_rank(g, policy)}


def test_settle_schedule_rejects_a_fraction_policy():
    from compressm_tune.errors import ConfigError

    with pytest.raises(ConfigError, match="fixed point"):
        ReduceConfig(policy=ReductionPolicy("fraction", 0.5), schedule="settle")


def test_cli_settle_schedule_checks_across_the_window_and_cuts_when_settled(tmp_path):
    """No --reduce-every: the settle schedule spreads its checks over the window itself, and
    its first cut comes only after `patience` stable checks."""
    from compressm_tune.cli import main

    out = tmp_path / "run"
    code = main(["train", "--dataset", "lti-sysid", "--blocks", "1", "--hidden", "8",
                 "--state-dim", "48", "--steps", "48", "--eval-every", "48", "--batch-size",
                 "16", "--reduce", "tau=0.1", "--window", "0.5", "--schedule", "settle",
                 "--max-drop", "10", "--no-progress", "--out", str(out)])
    assert code == 0
    records = [r for r in read_metrics(out / "metrics.jsonl") if "reduction" in r]
    assert [r["step"] for r in records] == [2 * k for k in range(1, 13)]  # 12 checks in 24
    actions = [r["reduction"][0]["action"] for r in records]
    assert actions[:2] == ["keep", "keep"] and "cut" in actions
    assert json.loads((out / "summary.json").read_text())["final_state_dims"][0] < 48
