"""The adaptive schedule: readiness, bisection after a rollback, and the paired safety net.

The host below is a fake training loop with a real two-layer network (real surgery) and a
scripted validation: per-sample values are chosen by the test, so what the reducer must decide
is known in advance. Expected bands and statistics are computed here with the statistics
module and scipy, not with the package's helpers.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from compressm_tune.models import SSMConfig, SSMModel
from compressm_tune.reduction import (
    AdaptiveConfig,
    ReduceConfig,
    Reducer,
    ReductionPolicy,
    paired_verdict,
)
from compressm_tune.training import TrainConfig, Trainer, read_metrics


class _Host:
    """A ReductionHost whose validation is a script: ``accuracy(step, widths)`` gives every
    sample's accuracy (n,), and the loss is ``1 - accuracy`` per sample."""

    def __init__(self, accuracy, n_val=50, warmup=10, dims=(64, 64)):
        torch.manual_seed(0)
        self.model = SSMModel(SSMConfig(d_model=8, state_dims=list(dims), dropout=0.0))
        self.optimizer = torch.optim.Adam(self.model.parameters())
        self.accuracy, self.n_val, self.warmup_steps = accuracy, n_val, warmup
        self.step = 0
        self.validations = 0

    @property
    def steps_done(self):
        return self.step

    def reducible_layers(self):
        return self.model.ssm_layers()

    def calibration_inputs(self, n):
        return torch.randn(4, 20, 1, generator=torch.Generator().manual_seed(1))

    def validate_samples(self):
        self.validations += 1
        acc = np.asarray(self.accuracy(self.step, self.model.state_dims), dtype=float)
        samples = {"accuracy": acc, "loss": 1.0 - acc}
        return {"accuracy": float(acc.mean()), "loss": float((1 - acc).mean())}, samples

    def validate(self):
        return self.validate_samples()[0]

    def snapshot(self):
        return {k: v.clone() for k, v in self.model.state_dict().items()}

    def restore(self, snap):
        self.model = SSMModel(SSMConfig(d_model=8, state_dims=[
            snap[f"blocks.{i}.ssm.nu_log"].shape[0] for i in range(len(self.model.blocks))],
            dropout=0.0))
        self.model.load_state_dict(snap)
        self.rebuild_optimizer()

    def rebuild_optimizer(self):
        self.optimizer = torch.optim.Adam(self.model.parameters())

    def widths_changed(self):
        pass


class _Target(Reducer):
    """The adaptive schedule with the spectrum's target scripted per layer."""

    def __init__(self, targets, **kw):
        super().__init__(ReduceConfig(policy=ReductionPolicy("tau", 0.04), **kw))
        self.targets = targets

    def plan(self, layer, hsv, step):
        n = len(hsv)
        rank, done = self.bisect.plan(layer, n, self.targets[layer], self.config.policy.gate)
        if done:
            self.frozen.add(layer)
        return rank


def _learning(n, start=0.1, per_step=0.02, seed=0):
    """Per-sample accuracies of a model that improves ``per_step`` per step from ``start``:
    each sample is right with that probability (fixed draws, so a step is repeatable)."""
    draws = np.random.default_rng(seed).random(n)

    def accuracy(step, widths):
        return (draws < min(1.0, start + per_step * step)).astype(float)
    return accuracy


def test_no_cut_before_the_metric_leaves_its_starting_band():
    accuracy = _learning(50, start=0.1, per_step=0.01)
    host = _Host(accuracy, warmup=5)
    reducer = _Target([16, 16], every=1, window=1.0)
    reducer.begin(host)
    start = accuracy(0, None)
    sd = statistics.stdev(start.tolist())
    band = 2.0 * stats.t.ppf(0.975, 49) / stats.norm.ppf(0.975) * sd / math.sqrt(50)
    assert reducer.baseline.band == pytest.approx(band, rel=1e-12)
    first = None
    for step in range(1, 40):
        host.step = step
        records, _ = reducer.attempt(host)
        if any(r["action"] == "cut" for r in records):
            first = step
            break
        why = {r["why"] for r in records}
        assert why == ({"lr warm-up"} if step < 5 else {"metric in its starting band"})
    assert first is not None
    gained = accuracy(first, None).mean() - start.mean()
    assert gained > band  # it cut only once the metric was out of the band ...
    assert accuracy(first - 1, None).mean() - start.mean() <= band  # ... and as soon as it was
    assert reducer.ready["step"] == first == reducer.first_cut["step"]
    assert host.model.state_dims == [16, 16]


def test_no_cut_during_the_lr_warm_up_even_when_the_metric_has_moved():
    """The metric jumps at step 1 and stays; the warm-up ends at 8, whose check is the first
    validation after it (nothing to compare with yet); 9 finds the plateau and cuts."""
    host = _Host(lambda step, widths: np.ones(50) if step else np.zeros(50), warmup=8)
    reducer = _Target([16, 16], every=1, window=1.0)
    reducer.begin(host)
    cuts, why = [], {}
    for step in range(1, 12):
        host.step = step
        records, _ = reducer.attempt(host)
        cuts += [step for r in records if r["action"] == "cut"]
        why[step] = {r.get("why") for r in records}
    assert cuts and min(cuts) == 9
    assert why[7] == {"lr warm-up"} and why[8] == {"no validation a span back yet"}


def test_the_window_opens_at_readiness_and_ends_at_latest():
    reducer = Reducer(ReduceConfig(window=0.1))
    assert reducer.active(700, 1000) and not reducer.active(751, 1000)  # latest 0.75
    assert reducer.due(50, 1000) and not reducer.due(60, 1000)  # waiting: one check per span
    reducer.ready = {"step": 300, "val": None}
    assert reducer.active(400, 1000) and not reducer.active(401, 1000)
    assert reducer.due(312, 1000) and not reducer.due(350, 1000)  # 8 checks in the window


def _plateau(n, rise_until, start=0.1, top=0.9, seed=0):
    """Per-sample accuracies that rise linearly from ``start`` to ``top`` until
    ``rise_until``, then stay (fixed draws: a step is repeatable)."""
    draws = np.random.default_rng(seed).random(n)

    def accuracy(step, widths):
        level = start + (top - start) * min(1.0, step / rise_until)
        return (draws < level).astype(float)
    return accuracy


def _first_cut(reducer, host, total):
    """Run the reducer's checks as the trainer would; the first cut's step and every earlier
    check's reasons to wait."""
    waits = []
    for step in range(1, total):
        host.step = step
        if not (reducer.active(step, total) and reducer.due(step, total)):
            continue
        records, _ = reducer.attempt(host)
        if any(r["action"] == "cut" for r in records):
            return step, waits
        waits.append({r["why"] for r in records})
    return None, waits


def test_no_cut_while_the_metric_still_improves_beyond_noise():
    """Accuracy rises over 300 of 1000 steps, then stays: long out of its starting band, but
    the first cut waits until the paired change over a span (50 steps) is within noise."""
    host = _Host(_plateau(400, rise_until=300), n_val=400, warmup=100)
    reducer = _Target([16, 16], window=0.1)
    reducer.begin(host)
    first, waits = _first_cut(reducer, host, 1000)
    assert first is not None and 300 <= first <= 400  # after the rise, within 2 spans of it
    assert reducer.ready["step"] == first
    assert waits[-1] == {"metric still improving"} and all(len(w) == 1 for w in waits)


def test_a_model_still_improving_is_cut_at_ready_by():
    accuracy = _plateau(400, rise_until=1000)  # improves all run long
    host = _Host(accuracy, n_val=400, warmup=10)
    reducer = _Target([16, 16], window=0.1)
    reducer.begin(host)
    first, _ = _first_cut(reducer, host, 1000)
    assert first == 500  # ReduceConfig().adaptive.by = 0.5


def test_successive_cuts_share_one_tolerance():
    """Each cut flips 6 of 400 samples (1.5 points, under max_drop 2 points): the first is
    kept, the second is rolled back, though it alone costs only 1.5 points: the cuts together
    would cost 3."""
    draws = np.arange(400)

    def accuracy(step, widths):
        lost = 6 * sum(w < 64 for w in widths)  # each cut layer loses 6 samples
        return (draws >= lost).astype(float)
    host = _Host(accuracy, n_val=400, warmup=0)
    reducer = _Target([16, 16], every=1, window=1.0)
    reducer.ready = {"step": 0, "val": None}
    host.step = 1
    records, _ = reducer.attempt(host)
    assert [r["action"] for r in records] == ["cut", "rollback"]  # joint cut: -3, one at a time
    assert records[1]["drop"] == pytest.approx(6 / 400)
    assert records[1]["spent"] == pytest.approx(6 / 400) == reducer.readiness.spent
    assert host.model.state_dims == [16, 64]


def test_a_rollback_bisects_between_the_rejected_and_the_kept_width():
    """Layer 0 hurts below 40 states (every sample wrong), layer 1 never: after the rejected
    cut to 8, layer 0 tries the midpoints (8+64)/2=36 (rejected), (36+64)/2=50 (kept),
    (36+50)/2=43 (kept), (36+43)/2=40 (kept), then (36+40)/2=38 >= 0.95*40: done."""
    def accuracy(step, widths):
        return np.zeros(50) if widths[0] < 40 else np.ones(50)
    host = _Host(accuracy, warmup=0)
    reducer = _Target([8, 8], every=1, window=1.0)
    tried, widths = [], []
    for step in range(1, 9):
        host.step = step
        records, _ = reducer.attempt(host)
        tried += [(r["rank"], r["action"]) for r in records if r["layer"] == 0 and "rank" in r]
        widths.append(host.model.state_dims[0])
    assert tried == [(8, "rollback"), (36, "rollback"), (50, "cut"), (43, "cut"), (40, "cut")]
    assert host.model.state_dims == [40, 8]
    assert reducer.frozen == {0}  # converged, not frozen by the first rollback
    assert reducer.summary()["rejected_widths"] == {"0": 36}


def test_bisection_state_survives_a_checkpoint_round_trip():
    reducer = _Target([8, 8])
    reducer.bisect.reject(0, 20)
    reducer.bisect.floor[1] = 12
    reducer.ready = {"step": 7, "val": {"accuracy": 0.5}}
    reducer.readiness.history = [(3, [1.0, 0.0]), (7, [1.0, 1.0])]
    reducer.readiness.spent = 0.015
    copy = _Target([8, 8])
    copy.load_state_dict(json.loads(json.dumps(reducer.state_dict())))
    assert copy.bisect.rejected == {0: 20} and copy.bisect.floor == {1: 12}
    assert copy.ready == reducer.ready
    assert copy.readiness.history == reducer.readiness.history
    assert copy.readiness.spent == reducer.readiness.spent
    old = {"frozen": [1], "closed": False, "settle": {}}  # a checkpoint from before
    copy.load_state_dict(old)
    assert copy.frozen == {1} and copy.bisect.rejected == {} and copy.baseline is None


@pytest.mark.parametrize("n", [5, 10, 19, 200])
def test_one_flipped_sample_never_rolls_a_cut_back(n):
    acc = np.ones(n)
    loss = np.full(n, 0.1)
    after_acc, after_loss = acc.copy(), loss.copy()
    after_acc[0], after_loss[0] = 0.0, 5.0  # one sample flips and its loss jumps
    verdict = paired_verdict({"loss": loss, "accuracy": acc},
                             {"loss": after_loss, "accuracy": after_acc}, 0.0, 2.0)
    assert verdict["rollback"] is False
    assert verdict["drop"] == pytest.approx(1 / n)
    assert verdict["drop_se"] == pytest.approx(statistics.stdev([1.0] + [0.0] * (n - 1))
                                               / math.sqrt(n))
    assert verdict.get("small_split", False) == (n < 20)


def test_a_real_degradation_is_rolled_back_on_a_small_split():
    rng = np.random.default_rng(0)
    n = 12
    loss = rng.uniform(0.1, 0.3, n)
    after = loss + rng.uniform(0.5, 1.0, n)  # every sample worse
    acc, after_acc = np.ones(n), np.ones(n)
    after_acc[:8] = 0.0  # 8 of 12 flip
    verdict = paired_verdict({"loss": loss, "accuracy": acc},
                             {"loss": after, "accuracy": after_acc}, 0.02, 2.0)
    assert verdict["rollback"] is True and verdict["small_split"] is True
    d = after - loss
    assert verdict["loss_change"] == pytest.approx(d.mean())
    assert verdict["loss_change_se"] == pytest.approx(statistics.stdev(d.tolist()) / math.sqrt(n))


def test_regression_judges_the_relative_loss_change_beyond_its_noise():
    rng = np.random.default_rng(1)
    loss = rng.uniform(1.0, 2.0, 100)
    small = loss * (1 + rng.normal(0.01, 0.002, 100))  # +1%: within max_drop 2%
    large = loss * (1 + rng.normal(0.10, 0.002, 100))  # +10%
    assert not paired_verdict({"loss": loss}, {"loss": small}, 0.02, 2.0)["rollback"]
    assert paired_verdict({"loss": loss}, {"loss": large}, 0.02, 2.0)["rollback"]


def test_a_single_sample_flip_on_a_tiny_split_rolls_nothing_back_in_a_run():
    """Through the reducer: 10 validation samples, a cut flips one of them; the record says
    the split is small, a warning is issued, and the cut stays."""
    def accuracy(step, widths):
        acc = np.ones(10)
        acc[3] = 0.0 if widths[0] < 64 else 1.0
        return acc
    host = _Host(accuracy, n_val=10, warmup=0)
    reducer = _Target([16, 64], every=1, window=1.0, max_drop=0.0)
    host.step = 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records, _ = reducer.attempt(host)
    assert records[0]["action"] == "cut" and records[0]["small_split"] is True
    assert records[0]["n"] == 64 and records[0]["n_val"] == 10  # layer width, samples
    assert host.model.state_dims == [16, 64]
    assert any("10 samples" in str(w.message) for w in caught)


def test_a_real_run_records_its_first_cut_after_warm_up_and_out_of_band(mnist1d, tmp_path):
    cfg = SSMConfig(d_input=mnist1d.d_input, d_output=mnist1d.d_output, d_model=16,
                    state_dims=[32, 32])
    tcfg = TrainConfig(steps=60, batch_size=32, eval_every=20, seed=0, threads=1,
                       warmup_frac=0.2)
    reducer = Reducer(ReduceConfig(policy=ReductionPolicy("tau", 0.04, weighting="input"),
                                   window=0.3))
    summary = Trainer(cfg, tcfg, mnist1d, tmp_path, reducer=reducer, progress=False).fit()
    red = summary["reduction"]
    assert red["baseline"]["n"] == len(mnist1d.x_val)
    records = read_metrics(tmp_path / "metrics.jsonl")
    cut_steps = [r["step"] for r in records
                 if any(x["action"] == "cut" for x in r.get("reduction", []))]
    waits = [r["step"] for r in records
             if any(x["action"] == "wait" for x in r.get("reduction", []))]
    assert waits and max(waits) < red["ready"]["step"]
    if cut_steps:  # the band and warm-up held back every cut
        first = red["first_cut"]
        assert first["step"] == min(cut_steps) >= 12
        gained = first["val_before"]["accuracy"] - red["baseline"]["value"]
        assert gained > red["baseline"]["band"]
    ready = next(r for r in records if "ready" in r)
    assert ready["step"] == red["ready"]["step"] >= 12
    assert json.loads((tmp_path / "summary.json").read_text())["reduction"] == red


def test_train_reduce_uses_the_adaptive_schedule_with_input_weighting(tmp_path):
    from compressm_tune.cli import main

    out = tmp_path / "run"
    code = main(["train", "--dataset", "lti-sysid", "--blocks", "1", "--hidden", "8",
                 "--state-dim", "24", "--steps", "20", "--eval-every", "10", "--batch-size",
                 "16", "--reduce", "tau=0.1", "--no-progress", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reduction"]["schedule"] == "adaptive"
    assert summary["reduction"]["baseline"]["metric"] == "loss"
    records = read_metrics(out / "metrics.jsonl")
    assert {x["why"] for r in records for x in r.get("reduction", [])
            if x["action"] == "wait" and r["step"] < 2} == {"lr warm-up"}


def test_compressor_adaptive_waits_for_warm_up_and_the_band():
    """A user loop: validation (per sample) is all wrong until step 6, all right after; the LR
    warm-up ends at step 3. Readiness checks come every half span (the span: 0.1 of 40 steps,
    4): at 4 (first after the warm-up) and 6 nothing a span back is measured yet, at 8 the
    metric rose since 4, at 10 it has not moved since 6: the first cut is at 10."""
    from compressm_tune.reduction import Compressor

    torch.manual_seed(0)
    model = SSMModel(SSMConfig(d_input=1, d_output=2, d_model=4, state_dims=[16]))
    opt = torch.optim.Adam(model.parameters())
    now = {"step": 0}

    def validate():
        acc = np.ones(30) if now["step"] >= 6 else np.zeros(30)
        return {"accuracy": acc.mean(), "loss": 1 - acc.mean(), "sample_accuracy": acc,
                "sample_loss": 1 - acc}

    c = Compressor(model, opt, reduce="rank=4", total_steps=40, window=0.5, every=1,
                   validate=validate, schedule="adaptive", warmup_steps=3)
    for step in range(1, 15):
        now["step"] = step
        c.step(step)
    assert [(e["step"], e["action"], e["n_after"]) for e in c.events] == [(10, "cut", 4)]
    assert c.reducer.first_cut["step"] == 10 and c.reducer.baseline.value == 0.0


def test_widths_come_from_each_layers_spectrum():
    """Two layers with different spectra get different widths, each the fixed point of tau
    cuts on its own spectrum, computed here with a plain loop (not powers of two)."""
    def fixed_point(g, tau):
        r = len(g)
        while True:  # the smallest rank keeping 1 - tau of the HSV sum of the first r
            kept = np.cumsum(g[:r]) / g[:r].sum()
            new = int(np.searchsorted(kept, 1 - tau) + 1)
            if new >= 0.95 * r:  # the policy's gate: a cut must remove >= 5%
                return r
            r = new
    fast = 0.9 ** np.arange(256)  # geometric decays: few states carry the sum ...
    slow = 0.95 ** np.arange(256)  # ... or more of them
    reducer = Reducer(ReduceConfig(policy=ReductionPolicy("tau", 0.04)))
    widths = [reducer.plan(k, g, step=100) for k, g in enumerate((fast, slow))]
    assert widths == [fixed_point(fast, 0.04), fixed_point(slow, 0.04)]
    assert widths[0] != widths[1] and all(w & (w - 1) for w in widths)


def test_adaptive_flags_reach_train_and_the_job(tmp_path, capsys):
    from compressm_tune.cli import build_parser, main
    from compressm_tune.cli.train import _reducer

    args = build_parser().parse_args(["train", "--reduce", "tau=0.04", "--ready-by", "0.3",
                                      "--plateau-span", "0.2", "--latest-cut", "0.6",
                                      "--adaptive-noise", "3", "--adaptive-checks", "4",
                                      "--recover", "0.1"])
    adaptive = _reducer(args).config.adaptive
    assert (adaptive.by, adaptive.span, adaptive.latest, adaptive.noise, adaptive.checks,
            adaptive.recover) == (0.3, 0.2, 0.6, 3.0, 4, 0.1)
    from compressm_tune.cli.tune import adaptive_config
    from compressm_tune.search import TuneConfig

    job = build_parser().parse_args(["--budget", "0.3x", "--ready-by", "0.4", "--recover", "0"])
    adaptive = TuneConfig(budget=job.budget, adaptive=adaptive_config(job)).adaptive
    assert (adaptive.by, adaptive.recover) == (0.4, 0.0)
    out = tmp_path / "run"
    code = main(["train", "--reduce", "tau=0.04", "--ready-by", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "by" in err[0] and not out.exists()


def test_a_study_refuses_to_resume_with_other_adaptive_settings(tmp_path):
    """The job's trials depend on the adaptive settings: a rerun with other ones is another
    study, refused in one line; the same ones resume."""
    from compressm_tune.errors import ConfigError
    from compressm_tune.reduction import AdaptiveConfig
    from compressm_tune.search import TuneConfig
    from compressm_tune.search._study import open_study

    config = TuneConfig(budget_ms=1.0, out=str(tmp_path))
    open_study(config)
    open_study(TuneConfig(budget_ms=1.0, out=str(tmp_path)))  # the same settings: resumes
    with pytest.raises(ConfigError, match="adaptive"):
        open_study(TuneConfig(budget_ms=1.0, out=str(tmp_path),
                              adaptive=AdaptiveConfig(by=0.3)))


class _DeferringHost(_Host):
    """A host whose snapshot is the whole training state (like the Trainer's)."""

    defers_verdicts = True

    def restore(self, snap):
        self.restored = snap
        super().restore(snap)


def _recovering(recovered_after):
    """Every sample wrong while layer 0 is cut and fewer than ``recovered_after`` steps have
    passed since the cut; right otherwise (a cut the run absorbs in that many steps)."""
    cut_at = {}

    def accuracy(step, widths):
        if widths[0] == 64:
            cut_at.clear()
            return np.ones(50)
        start = cut_at.setdefault(widths[0], step)
        return np.ones(50) if step - start >= recovered_after else np.zeros(50)
    return accuracy


def _drive(reducer, host, steps, total=100):
    """The trainer's calls: an attempt at every due step; returns every record."""
    records = []
    for step in range(1, steps + 1):
        host.step = step
        if reducer.due(step, total):
            records += [(step, r) for r in reducer.attempt(host)[0]]
    return records


@pytest.mark.parametrize("recovered_after, kept", [(3, True), (50, False)])
def test_a_cut_is_judged_after_its_recovery_steps(recovered_after, kept):
    """recover=0.05 of 100 steps: the cut at step 1 fails at once and trains until step 6
    before its verdict.
    A cut the model absorbs in 3 steps is kept; one it does not is rolled back to the
    pre-cut weights and its width bisected."""
    host = _DeferringHost(_recovering(recovered_after), warmup=0)
    reducer = _Target([16, 64], every=1, window=1.0,
                      adaptive=AdaptiveConfig(recover=0.05))
    reducer.ready = {"step": 0, "val": None}
    before = {k: v.clone() for k, v in host.model.state_dict().items()}
    records = _drive(reducer, host, 6)
    actions = [(step, r["action"]) for step, r in records if r["layer"] == 0]
    assert actions[0] == (1, "cut") and records[0][1]["judge_at"] == 6
    assert not [a for s, a in actions[1:] if s < 6]  # no attempt while it recovers
    verdict = next(r for s, r in records if s == 6 and r["layer"] == 0)
    assert verdict["action"] == ("kept" if kept else "rollback")
    assert verdict["cut_at"] == 1 and verdict["rank"] == 16
    if kept:
        assert reducer.first_cut["step"] == 1
    else:
        assert reducer.bisect.rejected == {0: 16}
        # the rollback returns the pre-cut weights; the bisection cuts again at once
        assert any(s == 6 and r["action"] == "cut" and r["rank"] == 40 for s, r in records)
        for k, v in before.items():
            torch.testing.assert_close(host.restored[k], v)


def test_a_cut_that_passes_at_once_is_kept_at_once():
    host = _DeferringHost(_recovering(0), warmup=0)
    reducer = _Target([16, 64], every=1, window=1.0, adaptive=AdaptiveConfig(recover=0.05))
    reducer.ready = {"step": 0, "val": None}
    (_, record), *_ = _drive(reducer, host, 1)
    assert record["action"] == "cut" and "judge_at" not in record
    assert reducer.pending is None and host.model.state_dims == [16, 64]


def test_judged_at_once_the_same_cut_is_rolled_back():
    """Without recovery steps (recover=0) the cut above is judged before it can recover."""
    host = _DeferringHost(_recovering(3), warmup=0)
    reducer = _Target([16, 64], every=1, window=1.0, adaptive=AdaptiveConfig(recover=0.0))
    reducer.ready = {"step": 0, "val": None}
    records = _drive(reducer, host, 1)
    assert [r["action"] for _, r in records if r["layer"] == 0] == ["rollback"]


def test_a_recovering_cut_survives_a_checkpoint_round_trip(tmp_path):
    """A run killed while a cut recovers resumes with the verdict still due (its pre-cut
    checkpoint on disk); without that file the cut counts as kept."""
    snapshot = tmp_path / "pre_cut.pt"
    snapshot.write_bytes(b"")
    reducer = _Target([8, 8])
    reducer.pending = {"step": 40, "judge_at": 58, "snapshot": snapshot,
                       "val": {"accuracy": 0.75}, "plans": {0: [64, 16]},
                       "samples": {"accuracy": np.array([1.0, 0.5]), "loss": np.array([0.1, 0.4])}}
    state = json.loads(json.dumps(reducer.state_dict()))
    copy = _Target([8, 8])
    copy.load_state_dict(state)
    assert copy.pending["judge_at"] == 58 and copy.pending["plans"] == {0: [64, 16]}
    np.testing.assert_array_equal(copy.pending["samples"]["loss"], [0.1, 0.4])
    assert copy.due(58, 600) and not copy.due(57, 600) and copy.active(590, 600)
    snapshot.unlink()
    copy.load_state_dict(state)
    assert copy.pending is None


def test_a_cut_still_recovering_at_the_last_step_is_judged_there():
    """recover=0.9 of a 10-step run: the cut at step 5 would be judged at step 14; the last
    step judges it (and rolls it back) instead of ending on an unjudged cut."""
    host = _DeferringHost(_recovering(50), warmup=0)
    reducer = _Target([16, 64], every=1, window=1.0, adaptive=AdaptiveConfig(recover=0.9))
    reducer.ready = {"step": 0, "val": None}
    host.step = 5
    assert reducer.active(5, 10)
    (record, *_), _ = reducer.attempt(host)
    assert record["judge_at"] == 14
    host.step = 9
    assert reducer.attempt(host)[0][0]["action"] == "recovering"
    host.step = 10
    assert reducer.attempt(host)[0][0]["action"] == "rollback"
    assert host.model.state_dims[0] != 16


def test_the_window_stands_still_while_a_cut_recovers():
    """A 5-step window from readiness at step 0: the cut at step 1 recovers until step 6 and
    is rolled back; the window, paused for those 5 steps, still holds the bisection's cut."""
    host = _DeferringHost(_recovering(50), warmup=0)
    reducer = _Target([16, 64], every=1, window=0.05, adaptive=AdaptiveConfig(recover=0.05))
    reducer.ready = {"step": 0, "val": None}
    records = _drive(reducer, host, 8)
    assert [(s, r["action"], r["rank"]) for s, r in records if r["layer"] == 0] == [
        (1, "cut", 16), (6, "rollback", 16), (6, "cut", 40)]
    assert reducer.paused == 5 and reducer.pending["judge_at"] == 11


@pytest.mark.parametrize("value", ["-0.1", "1", "nan", "inf"])
def test_a_bad_recover_is_one_line_and_writes_nothing(tmp_path, capsys, value):
    from compressm_tune.cli import main

    out = tmp_path / "run"
    code = main(["train", "--reduce", "tau=0.04", "--recover", value, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "recover" in err[0] and not out.exists()
