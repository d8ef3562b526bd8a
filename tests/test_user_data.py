"""Users' own data as they bring it: labels of any kind and NaN-padded variable-length series,
through training (masked loss and evaluation), the checkpoint, the export bundle and the
torch-free edge runner."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from compressm_tune.data import load_dataset
from compressm_tune.exporter import export_bundle, load_bundle
from compressm_tune.models import SSMConfig, SSMModel
from compressm_tune.training import (
    TrainConfig,
    Trainer,
    evaluate,
    load_checkpoint,
)


def _padded_npz(path, labels, n=48, length=10, seed=0):
    """Series of random lengths 3..length, NaN-padded, label = labels[i % K]; the class is
    readable from the sign of the mean, so a model learns it in a few steps."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, length + 1, size=n)  # (n,)
    k = np.arange(n) % len(labels)  # (n,)
    x = rng.normal(size=(n, length)) + 3.0 * (2.0 * k - (len(labels) - 1))[:, None]
    x[np.arange(length)[None, :] >= lengths[:, None]] = np.nan
    np.savez(path, x=x, y=np.asarray(labels)[k])
    return x, lengths


def test_masked_regression_loss_and_evaluation_leave_padded_steps_out():
    """Reference: squared errors summed over the real steps by a plain loop."""
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(d_input=1, d_output=2, d_model=8, state_dims=[4],
                               pooling="none")).eval()
    lengths = [6, 2, 4]
    x = torch.randn(3, 6, 1)
    y = torch.randn(3, 6, 2)
    for i, n in enumerate(lengths):
        x[i, n:] = float("nan")
        y[i, n:] = float("nan")
    metrics = evaluate(model, x, y, "regression", batch_size=2)  # two batches, one ragged
    with torch.no_grad():
        errors = [((model(x[i:i + 1, :n]) - y[i:i + 1, :n]) ** 2).flatten()
                  for i, n in enumerate(lengths)]
    want = torch.cat(errors).mean().item()
    assert metrics["loss"] == pytest.approx(want, rel=1e-5)
    assert np.isfinite(metrics["loss"])


def test_padded_classification_trains_with_finite_loss(tmp_path, capsys):
    _padded_npz(tmp_path / "d.npz", ["b", "a"])
    ds = load_dataset("npz", path=str(tmp_path / "d.npz"))
    model_cfg = SSMConfig(d_input=1, d_output=ds.d_output, d_model=8, state_dims=[6])
    trainer = Trainer(model_cfg, TrainConfig(steps=60, batch_size=16, lr=1e-2, eval_every=30,
                                             threads=1), ds, tmp_path / "run", progress=False)
    summary = trainer.fit()
    assert np.isfinite(summary["test_last"]["loss"])
    assert summary["test_last"]["accuracy"] >= 0.8  # the padding did not drown the signal
    n_val = len(ds.y_val)
    assert f"validation split holds {n_val} sequences" in capsys.readouterr().err  # 4 of 38
    assert sorted(ds.y_val.tolist()) == [0, 0, 1, 1]  # stratified: both classes, 2 each


def test_training_does_not_depend_on_how_far_the_data_was_padded(tmp_path):
    """BatchNorm's batch statistics used to include the padded steps (fed as zeros), so the
    same series padded to 25 steps instead of 10 trained another model. Reference: the
    run on the data padded only as far as its longest series."""
    x, _ = _padded_npz(tmp_path / "short.npz", [0, 1], n=40)
    wide = np.concatenate([x, np.full((len(x), 15), np.nan)], axis=1)  # (n, 25)
    np.savez(tmp_path / "long.npz", x=wide, y=np.load(tmp_path / "short.npz")["y"])
    finals = []
    for name in ("short", "long"):
        ds = load_dataset("npz", path=str(tmp_path / f"{name}.npz"))
        model_cfg = SSMConfig(d_input=1, d_output=ds.d_output, d_model=8, state_dims=[6, 4],
                              dropout=0.0)
        trainer = Trainer(model_cfg, TrainConfig(steps=15, batch_size=16, eval_every=15,
                                                 threads=1), ds, tmp_path / name,
                          progress=False)
        trainer.fit()
        finals.append(trainer.model.blocks[1].norm.running_var.clone())
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def string_label_bundle(tmp_path_factory):
    """A model trained on NaN-padded series with string labels, checkpointed and exported."""
    root = tmp_path_factory.mktemp("user-data")
    x, lengths = _padded_npz(root / "d.npz", ["sell", "hold", "buy"], n=60)
    ds = load_dataset("npz", path=str(root / "d.npz"))
    model_cfg = SSMConfig(d_input=1, d_output=ds.d_output, d_model=8, state_dims=[6])
    Trainer(model_cfg, TrainConfig(steps=20, batch_size=16, eval_every=20, threads=1), ds,
            root / "run", progress=False).fit()
    export_bundle(root / "run" / "last.pt", root / "bundle", formats="onnx")
    return root, x, lengths


def test_label_mapping_round_trips_through_checkpoint_and_bundle(string_label_bundle):
    root, _, _ = string_label_bundle
    payload = load_checkpoint(root / "run" / "last.pt")
    assert payload["dataset"]["info"]["labels"] == ["buy", "hold", "sell"]  # sorted, id order
    manifest = json.loads((root / "bundle" / "manifest.json").read_text())
    assert manifest["task"]["labels"] == ["buy", "hold", "sell"]
    assert manifest["task"]["n_classes"] == 3
    assert manifest["task"]["padding"]["kind"] == "trailing NaN"


def test_edge_runner_prints_original_labels_and_runs_padded_input_at_true_length(
        string_label_bundle, tmp_path):
    root, x, lengths = string_label_bundle
    bundle = load_bundle(root / "bundle", modes=("sequence", "step"))
    sample = x[:6]  # (6, L) raw, NaN-padded, lengths differ
    np.save(tmp_path / "x.npy", sample)
    done = subprocess.run([sys.executable, str(root / "bundle" / "run.py"), "--input",
                           str(tmp_path / "x.npy"), "--json"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    labels = ["buy", "hold", "sell"]
    for rec, row, n in zip(records, sample, lengths[:6], strict=True):
        alone = bundle.predict(row[:n][None])  # (1, C): the sequence unpadded
        assert rec["class"] == int(alone.argmax()) and rec["label"] == labels[rec["class"]]
    stream = subprocess.run([sys.executable, str(root / "bundle" / "run.py"), "--input",
                             str(tmp_path / "x.npy"), "--json", "--stream"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert stream.returncode == 0, stream.stderr
    assert [json.loads(line)["class"] for line in stream.stdout.splitlines()] == [
        r["class"] for r in records]
