"""Checkpoints, optimizer groups, LR schedule and the training loop (determinism and resume)."""

from __future__ import annotations

import json
import math
import zipfile

import pytest
import torch
import torch.nn.functional as F

from compressm_tune.data import SelectiveCopyConfig, load_dataset
from compressm_tune.errors import CheckpointError, CompressmError, ConfigError
from compressm_tune.models import SSM_PARAMETERS, SSMConfig, SSMModel
from compressm_tune.training import (
    TrainConfig,
    Trainer,
    evaluate,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from compressm_tune.training.optim import build_optimizer, lr_factor, set_lr

# ----------------------------------------------------------------------------- checkpoints


def _model(dims=(6, 4), pooling="mean", seed=0):
    torch.manual_seed(seed)
    return SSMModel(SSMConfig(d_input=2, d_output=3, d_model=8, state_dims=list(dims),
                              pooling=pooling, dropout=0.1))


def _trained_a_little(model):
    """A few optimizer steps so weights and BatchNorm buffers are far from init."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(5, 20, 2, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def _shrink(layer, n):
    """Keep the first n states of a layer (stand-in for a reduction's surgery)."""
    layer.load_system_parameters({
        "nu_log": layer.nu_log[:n].detach(), "theta_log": layer.theta_log[:n].detach(),
        "gamma_log": layer.gamma_log[:n].detach(), "B_re": layer.B_re[:n].detach(),
        "B_im": layer.B_im[:n].detach(), "C_re": layer.C_re[:, :n].detach(),
        "C_im": layer.C_im[:, :n].detach(),
    })


@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_checkpoint_round_trip_is_bit_exact(tmp_path, pooling):
    model = _trained_a_little(_model(pooling=pooling))
    x = torch.randn(4, 30, 2)
    want = _outputs(model, x)
    save_checkpoint(tmp_path / "m.pt", model, step=3, note="hello")
    payload = load_checkpoint(tmp_path / "m.pt")
    assert payload["step"] == 3 and payload["note"] == "hello"
    for source in (tmp_path / "m.pt", str(tmp_path / "m.pt"), payload):
        again = model_from_checkpoint(source)
        assert again is not model and again.config == model.config
        assert torch.equal(_outputs(again, x), want)
        theirs = again.state_dict()
        for k, v in model.state_dict().items():
            assert torch.equal(theirs[k], v), k


def test_checkpoint_after_surgery_rebuilds_the_smaller_model(tmp_path):
    model = _trained_a_little(_model(dims=(6, 4)))
    _shrink(model.ssm_layers()[0], 2)
    _shrink(model.ssm_layers()[1], 3)
    x = torch.randn(3, 25, 2)
    want = _outputs(model, x)
    save_checkpoint(tmp_path / "small.pt", model)
    payload = load_checkpoint(tmp_path / "small.pt")
    assert payload["model_config"]["state_dims"] == [2, 3]
    again = model_from_checkpoint(tmp_path / "small.pt")
    assert again.state_dims == [2, 3]
    assert torch.equal(_outputs(again, x), want)


def test_checkpoint_loads_with_weights_only(tmp_path):
    model = _model()
    save_checkpoint(tmp_path / "m.pt", model, step=7, rng=torch.get_rng_state(),
                    optimizer=torch.optim.AdamW(model.parameters()).state_dict(),
                    metrics={"acc": [0.1, 0.2]})
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["step"] == 7 and payload["model_config"]["state_dims"] == [6, 4]
    json.dumps(payload["model_config"])  # plain JSON


def test_atomic_write_leaves_only_the_checkpoint(tmp_path):
    model = _model()
    for _ in range(2):  # the second write replaces the first
        save_checkpoint(tmp_path / "last.pt", model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_failed_write_keeps_the_old_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    model = _trained_a_little(_model())
    x = torch.randn(2, 10, 2)
    want = _outputs(model, x)
    save_checkpoint(tmp_path / "last.pt", model)
    real_save = torch.save

    def dies_halfway(obj, f, *args, **kw):
        real_save(obj, f, *args, **kw)
        with open(f, "r+b") as fh:  # a half-written file ...
            fh.truncate(100)
        raise OSError("disk full")  # ... and then the write fails

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "last.pt", _model(seed=1))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert torch.equal(_outputs(model_from_checkpoint(tmp_path / "last.pt"), x), want)


def _expect_checkpoint_error(path, match):
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    assert isinstance(info.value, CompressmError) and isinstance(info.value, ValueError)
    return msg


def test_missing_checkpoint(tmp_path):
    _expect_checkpoint_error(tmp_path / "nope.pt", "not found")
    with pytest.raises(CheckpointError, match="not found"):
        model_from_checkpoint(tmp_path / "nope.pt")


def test_corrupted_checkpoint(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"\x00garbage that is not a torch file" * 10)
    _expect_checkpoint_error(path, "cannot read checkpoint")


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "cut.pt"
    save_checkpoint(path, _model())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect_checkpoint_error(path, "cannot read checkpoint")


def test_checkpoint_with_damaged_tensor_bytes(tmp_path):
    path = tmp_path / "bad.pt"
    save_checkpoint(path, _model())
    with zipfile.ZipFile(path) as zf:  # torch's format is a zip archive; pick the largest tensor
        member = max((i for i in zf.infolist() if "/data/" in i.filename),
                     key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    off = member.header_offset
    start = off + 30 + int.from_bytes(data[off + 26:off + 28], "little") + int.from_bytes(
        data[off + 28:off + 30], "little")  # skip the local file header
    data[start + 8:start + 16] = b"\xff" * 8  # eight bytes of weights turned into NaNs
    path.write_bytes(bytes(data))
    _expect_checkpoint_error(path, "cannot read checkpoint|corrupt")


def test_foreign_torch_file(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, path)
    _expect_checkpoint_error(path, "not a compressm-tune checkpoint")
    torch.save([1, 2, 3], path)
    _expect_checkpoint_error(path, "not a compressm-tune checkpoint")


def test_checkpoint_from_another_version(tmp_path):
    path = tmp_path / "future.pt"
    save_checkpoint(path, _model())
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    torch.save(payload, path)
    _expect_checkpoint_error(path, "version 99")


def test_checkpoint_whose_weights_do_not_fit_its_config(tmp_path):
    path = tmp_path / "mismatch.pt"
    save_checkpoint(path, _model(dims=(6, 4)))
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["state_dims"] = [5, 4]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="valid model"):
        model_from_checkpoint(path)
    payload["model_config"] = {"d_model": 8, "unknown_option": 1}
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="valid model"):
        model_from_checkpoint(path)


# ----------------------------------------------------------------------------- optimizer


def test_optimizer_groups_split_ssm_parameters():
    model = _model(dims=(5, 3))
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.3, ssm_lr_factor=0.25)
    ssm_group, rest_group = opt.param_groups
    ssm_ids = {id(p) for p in ssm_group["params"]}
    rest_ids = {id(p) for p in rest_group["params"]}
    want_ssm = {id(getattr(layer, name)) for layer in model.ssm_layers()
                for name in layer.recurrence_parameters}
    assert ssm_ids == want_ssm and len(ssm_ids) == 2 * 5
    assert ssm_ids.isdisjoint(rest_ids)
    assert ssm_ids | rest_ids == {id(p) for p in model.parameters()}
    for layer in model.ssm_layers():  # C and D are ordinary weights
        assert {id(layer.C_re), id(layer.C_im), id(layer.D)} <= rest_ids
    assert ssm_group["weight_decay"] == 0.0 and rest_group["weight_decay"] == 0.3
    assert ssm_group["lr"] == pytest.approx(2.5e-3) and rest_group["lr"] == pytest.approx(1e-2)


def test_optimizer_step_applies_lr_factor_and_decay_where_promised():
    """One AdamW step with all-ones gradients moves every weight by exactly its group's LR
    (Adam's first step is lr * sign(g)), plus decoupled decay on the non-SSM group only."""
    model = _model(dims=(4,))
    lr, wd, factor = 0.01, 0.5, 0.1
    opt = build_optimizer(model, lr=lr, weight_decay=wd, ssm_lr_factor=factor)
    set_lr(opt, 0.5)  # schedule multiplier applies to both groups' base LR
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    for name, p in model.named_parameters():
        old = before[name]
        if name.rsplit(".", 1)[-1] in SSM_PARAMETERS:
            want = old - 0.5 * lr * factor
        else:
            want = old * (1 - 0.5 * lr * wd) - 0.5 * lr
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("step,total,warmup,floor,want", [
    (0, 100, 0.1, 0.0, 0.1),  # warm-up: (step + 1) / 10
    (4, 100, 0.1, 0.0, 0.5),
    (9, 100, 0.1, 0.0, 1.0),
    (10, 100, 0.1, 0.0, 1.0),  # cosine starts at its peak
    (55, 100, 0.1, 0.0, 0.5),  # half way through the 90 cosine steps
    (55, 100, 0.1, 0.2, 0.6),  # 0.2 + 0.8 * 0.5
    (40, 100, 0.1, 0.0, 0.5 * (1 + math.cos(math.pi / 3))),  # progress 30/90
    (99, 100, 0.1, 0.0, 0.5 * (1 + math.cos(math.pi * 89 / 90))),
    (0, 10, 0.0, 0.0, 1.0),  # no warm-up: straight to the peak
    (5, 10, 0.0, 0.1, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 9))),
])
def test_lr_factor_against_hand_computed_values(step, total, warmup, floor, want):
    assert lr_factor(step, total, warmup, floor) == pytest.approx(want, abs=1e-12)


def test_lr_factor_shape():
    values = [lr_factor(s, 200, 0.1, 1e-3) for s in range(200)]
    assert values[:20] == sorted(values[:20])  # rising warm-up
    assert values[20:] == sorted(values[20:], reverse=True)  # falling cosine
    assert min(values) >= 1e-3 and max(values) == pytest.approx(1.0)


@pytest.mark.parametrize("kw", [
    {"steps": 0}, {"batch_size": 0}, {"lr": 0.0}, {"ssm_lr_factor": -1.0},
    {"weight_decay": -0.1}, {"warmup_frac": 1.0}, {"min_lr_frac": 1.5}, {"eval_every": 0},
    {"eval_batch_size": 0}, {"threads": 0},
])
def test_train_config_validation(kw):
    name = next(iter(kw))
    with pytest.raises(ConfigError, match=name):
        TrainConfig(**kw)


# ----------------------------------------------------------------------------- trainer


def _tiny(dataset, out, *, steps=30, seed=0, eval_every=10, resume=False, threads=None):
    model_cfg = SSMConfig(d_input=dataset.d_input, d_output=dataset.d_output, d_model=8,
                          state_dims=[8], dropout=0.1,
                          pooling=dataset.pooling)
    cfg = TrainConfig(steps=steps, batch_size=32, lr=3e-3, eval_every=eval_every, seed=seed,
                      warmup_frac=0.1, threads=threads)
    return Trainer(model_cfg, cfg, dataset, out, resume=resume, progress=False)


def _records(run_dir):
    """metrics.jsonl without the wall-clock field (the only one allowed to differ)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    out = []
    for line in lines:
        rec = json.loads(line)
        rec.pop("train_time_s")
        out.append(rec)
    return out


def _weights(path):
    return load_checkpoint(path)["model"]


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def mnist1d_runs(mnist1d, tmp_path_factory):
    """Two runs with seed 0, one with seed 1, on mnist1d (30 steps, one 8x8 block)."""
    root = tmp_path_factory.mktemp("runs")
    summaries = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        summaries[name] = _tiny(mnist1d, root / name, seed=seed).fit()
    return root, summaries


def test_same_seed_gives_identical_metrics_and_weights(mnist1d_runs):
    root, _ = mnist1d_runs
    assert _records(root / "a") == _records(root / "b")
    for name in ("last.pt", "best.pt"):
        assert _same_weights(_weights(root / "a" / name), _weights(root / "b" / name))


def test_other_seed_differs(mnist1d_runs):
    root, _ = mnist1d_runs
    assert _records(root / "a") != _records(root / "c")
    assert not _same_weights(_weights(root / "a" / "last.pt"), _weights(root / "c" / "last.pt"))


def test_metrics_and_summary_are_sensible(mnist1d_runs, mnist1d):
    root, summaries = mnist1d_runs
    run = root / "a"
    assert sorted(p.name for p in run.iterdir() if p.name != ".lock") == [
        "best.pt", "last.pt", "metrics.jsonl", "summary.json"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    for r in records:
        assert math.isfinite(r["train_loss"]) and 0 < r["train_loss"] < 10
        assert 0.0 <= r["val"]["accuracy"] <= 1.0 and r["val"]["loss"] > 0
        assert r["state_dims"] == [8]
        # lr recorded is the one used by the last step of the period (0-based step - 1)
        assert r["lr"] == pytest.approx(3e-3 * lr_factor(r["step"] - 1, 30, 0.1, 1e-3))
    assert [r["train_time_s"] for r in records] == sorted(r["train_time_s"] for r in records)
    summary = json.loads((run / "summary.json").read_text())
    assert summary == json.loads(json.dumps(summaries["a"]))  # fit() returns what it writes
    assert summary["dataset"] == "mnist1d" and summary["task"] == "classification"
    assert summary["steps"] == 30
    assert summary["initial_state_dims"] == summary["final_state_dims"] == [8]
    assert summary["val_best"] == max(r["val"]["accuracy"] for r in records)
    assert summary["train_time_s"] >= records[-1]["train_time_s"] > 0
    # test accuracies recomputed here from the checkpoints
    for key, ckpt in (("test_best", "best.pt"), ("test_last", "last.pt")):
        model = model_from_checkpoint(run / ckpt).eval()
        with torch.no_grad():
            acc = (model(mnist1d.x_test).argmax(-1) == mnist1d.y_test).float().mean().item()
        # one batch here, batches of 500 there: rounding may flip a near-tie (allow two)
        assert summary[key]["accuracy"] == pytest.approx(acc, abs=2e-3), key
    model = model_from_checkpoint(run / "last.pt")
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    # the best checkpoint is the one with the highest validation accuracy
    best_val = model_from_checkpoint(run / "best.pt").eval()
    with torch.no_grad():
        acc = (best_val(mnist1d.x_val).argmax(-1) == mnist1d.y_val).float().mean().item()
    assert acc == pytest.approx(summary["val_best"], abs=2 / len(mnist1d.y_val))


def test_trainer_checkpoint_is_complete_and_weights_only(mnist1d_runs):
    root, _ = mnist1d_runs
    payload = torch.load(root / "a" / "last.pt", weights_only=True)
    assert payload["step"] == 30
    assert payload["train_config"]["steps"] == 30 and payload["train_config"]["seed"] == 0
    assert payload["dataset"]["name"] == "mnist1d" and payload["dataset"]["seq_len"] == 40
    assert payload["initial_state_dims"] == [8]
    assert len(payload["optimizer"]["param_groups"]) == 2
    assert payload["rng"].dtype == torch.uint8


def test_training_learns_the_regression_task(lti_sysid, tmp_path):
    """lti-sysid is per-step regression (pooling none): the MSE must fall well below the
    target variance within a short run."""
    trainer = _tiny(lti_sysid, tmp_path, steps=40, eval_every=20)
    trainer.config.lr = 1e-2
    trainer.rebuild_optimizer()
    summary = trainer.fit()
    assert summary["task"] == "regression"
    var = lti_sysid.y_test.var().item()
    records = _records(tmp_path)
    assert "accuracy" not in records[-1]["val"]
    assert summary["test_last"]["loss"] < 0.5 * var
    assert summary["val_best"] == pytest.approx(-min(r["val"]["loss"] for r in records))


class _Interrupt(Exception):
    pass


def test_resume_reproduces_an_uninterrupted_run(mnist1d, tmp_path, monkeypatch):
    whole = _tiny(mnist1d, tmp_path / "whole", steps=40)
    whole.fit()

    # the same 40-step config, interrupted while computing step 21
    real_batch = Trainer._batch

    def dies_at_21(self, step):
        if step == 20:
            raise _Interrupt
        return real_batch(self, step)

    monkeypatch.setattr(Trainer, "_batch", dies_at_21)
    with pytest.raises(_Interrupt):
        _tiny(mnist1d, tmp_path / "cut", steps=40).fit()
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 20

    torch.manual_seed(1234)  # the global RNG must come from the checkpoint, not the process
    torch.randn(100)
    resumed = _tiny(mnist1d, tmp_path / "cut", steps=40, resume=True)
    assert resumed.step == 20
    resumed.fit()
    assert _same_weights(_weights(tmp_path / "whole" / "last.pt"),
                         _weights(tmp_path / "cut" / "last.pt"))
    assert _same_weights(_weights(tmp_path / "whole" / "best.pt"),
                         _weights(tmp_path / "cut" / "best.pt"))
    assert _records(tmp_path / "whole") == _records(tmp_path / "cut")
    a = json.loads((tmp_path / "whole" / "summary.json").read_text())
    b = json.loads((tmp_path / "cut" / "summary.json").read_text())
    for key in ("steps", "val_best", "test_best", "test_last", "final_state_dims"):
        assert a[key] == b[key], key


def test_fresh_run_does_not_append_to_old_metrics(mnist1d, tmp_path):
    """Starting over (resume=False) in a used directory must not mix the old run's records
    into the new metrics.jsonl."""
    _tiny(mnist1d, tmp_path, steps=10, eval_every=5).fit()
    _tiny(mnist1d, tmp_path, steps=10, eval_every=5, seed=3).fit()
    assert [r["step"] for r in _records(tmp_path)] == [5, 10]


# ----------------------------------------------------------------------------- per-token labels

_COPY = SelectiveCopyConfig(seq_len=16, n_tokens=4, n_copy=3, n_train=200, n_test=50)


@pytest.fixture(scope="module")
def copy_task():
    return load_dataset("selective-copy", copy_config=_COPY)


class _Oracle(torch.nn.Module):
    """Per-step logits (batch, L, K) built from the input alone: a wrong token at each of the
    last M steps, then the i-th data token (decoded from the one-hot input, in order) written
    at step ``L - M + shift + i`` for each ``i`` in ``right``."""

    def __init__(self, shift: int = 0, right: tuple[int, ...] = (0, 1, 2)) -> None:
        super().__init__()
        self.shift, self.right = shift, right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, m, length = _COPY.n_tokens, _COPY.n_copy, x.shape[1]
        ids = x.argmax(-1)  # (batch, L)
        tokens = torch.stack([row[row < k] for row in ids])  # (batch, M) in input order
        out = torch.zeros(len(x), length, k)  # (batch, L, K)
        out[:, -m:] = F.one_hot((tokens + 1) % k, k).float()  # wrong at every answer step
        for i in self.right:
            step = length - m + self.shift + i
            if 0 <= step < length:
                out[:, step] = F.one_hot(tokens[:, i], k).float()
        return 20 * out


def test_per_token_accuracy_is_scored_at_the_last_m_steps(copy_task):
    ds = copy_task
    distinct = torch.tensor([len(set(row)) == _COPY.n_copy for row in ds.y_test.tolist()])
    x, y = ds.x_test[distinct], ds.y_test[distinct]  # a shifted answer is then surely wrong
    assert len(y) >= 10

    def scores(oracle):
        return evaluate(oracle, x, y, ds.task, batch_size=4)  # several batches, one ragged

    right = scores(_Oracle())
    assert right["accuracy"] == 1.0 and right["loss"] < 1e-6
    for shift in (-1, 1):  # right answers one step early or late score nothing
        off = scores(_Oracle(shift=shift))
        assert off["accuracy"] == 0.0 and off["loss"] > 10, shift
    assert scores(_Oracle(right=(2,)))["accuracy"] == pytest.approx(1 / 3)  # a mean over tokens


def test_per_token_labels_reject_a_pooled_model(copy_task):
    model = SSMModel(SSMConfig(d_input=copy_task.d_input, d_output=4, d_model=8,
                               state_dims=[4], pooling="mean"))
    with pytest.raises(ConfigError, match=r"pooling 'none'.*\(50, 4\)"):
        evaluate(model, copy_task.x_test, copy_task.y_test, copy_task.task)


def test_dataset_pooling(mnist1d, lti_sysid, copy_task):
    assert (mnist1d.pooling, lti_sysid.pooling, copy_task.pooling) == ("mean", "none", "none")


def test_lru_trains_on_selective_copy(copy_task, tmp_path):
    summary = _tiny(copy_task, tmp_path, steps=20, eval_every=10).fit()
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [10, 20]
    for r in records:
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["val"]["loss"])
        assert 0.0 <= r["val"]["accuracy"] <= 1.0
    # the reported accuracy is the per-token one over the last M output steps
    model = model_from_checkpoint(tmp_path / "last.pt").eval()
    with torch.no_grad():
        pred = model(copy_task.x_test)[:, -_COPY.n_copy:].argmax(-1)  # (50, M)
    assert summary["test_last"]["accuracy"] == pytest.approx(
        (pred == copy_task.y_test).float().mean().item())


def test_a_checkpoint_from_before_the_ssm_rename_still_loads(tmp_path):
    """Session-1 checkpoints named each block's layer `lru` (blocks.K.lru.*)."""
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(d_model=8, state_dims=[6, 4], dropout=0.0))
    save_checkpoint(tmp_path / "new.pt", model)
    payload = load_checkpoint(tmp_path / "new.pt")
    payload["model"] = {k.replace(".ssm.", ".lru."): v for k, v in payload["model"].items()}
    assert any(".lru." in k for k in payload["model"])
    old = model_from_checkpoint(payload)
    x = torch.randn(2, 9, 1)
    model.eval()
    old.eval()
    assert torch.equal(old(x), model(x))


def test_best_checkpoint_ties_go_to_the_lower_validation_loss(lti_sysid, tmp_path, monkeypatch):
    """A small validation split gives few distinct accuracies: the first maximum used to win
    a tie; the lower loss does now."""
    from compressm_tune.training import load_checkpoint

    trainer = Trainer(SSMConfig(d_input=1, d_output=1, d_model=4, state_dims=[3],
                                pooling="none"),
                      TrainConfig(steps=3, eval_every=1, batch_size=8), lti_sysid, tmp_path,
                      progress=False)
    scripted = iter([{"loss": 1.0, "accuracy": 0.5}, {"loss": 0.8, "accuracy": 0.5},
                     {"loss": 0.9, "accuracy": 0.5}])
    monkeypatch.setattr(trainer, "validate", lambda: next(scripted))
    monkeypatch.setattr(trainer, "summarize", lambda: None)
    trainer.fit()
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 2
