"""Tests for the ``pystdlib-chars`` dataset: split by file, windows of real source text,
one-hot inputs with next-character labels, the cache, and bits per character."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compressm_tune.data import _pystdlib, load_dataset
from compressm_tune.models import SSMConfig, SSMModel
from compressm_tune.training import evaluate


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def chars(cache):
    return load_dataset("pystdlib-chars", cache_dir=str(cache))


def _split_texts() -> dict[str, bytes]:
    """Each split's files, read here from the stdlib folder and joined by NUL (a byte that
    no source holds), so a window found in it lies inside one file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(rel.parts[:-1]):
            continue
        texts[_pystdlib._split_of(rel.as_posix())].append(path.read_bytes())
    return {k: b"\0".join(v) for k, v in texts.items()}


def test_windows_are_next_character_pairs_of_text_from_their_own_split(chars):
    assert (chars.task, chars.pooling, chars.seq_len) == ("classification", "none", 64)
    assert chars.d_input == chars.d_output == len(chars.info["vocab_bytes"]) + 1
    x, y = chars.x_train, chars.y_train
    assert torch.equal(x.sum(-1), torch.ones(x.shape[:2]))  # one-hot
    assert torch.equal(x[:, 1:].argmax(-1), y[:, :-1])  # the label is the next input
    texts, vocab = _split_texts(), np.array(chars.info["vocab_bytes"])
    files = {split: text.count(b"\0") + 1 for split, text in texts.items()}
    assert chars.info["files"] == files and files["train"] > 6 * files["test"] > 0
    for split, xs, ys in (("train", chars.x_train, chars.y_train),
                          ("val", chars.x_val, chars.y_val),
                          ("test", chars.x_test, chars.y_test)):
        checked = 0
        for xi, yi in zip(xs[:40], ys[:40], strict=True):
            ids = torch.cat([xi[:1].argmax(-1), yi]).numpy()  # (65,)
            if (ids == chars.info["unknown_id"]).any():
                continue
            window = bytes(vocab[ids].astype(np.uint8).tolist())
            assert window in texts[split], (split, window[:30])
            checked += 1
        assert checked >= 30


def test_the_split_is_by_file_and_fixed():
    names = [f"pkg/mod{i}.py" for i in range(2000)]
    splits = [_pystdlib._split_of(n) for n in names]
    assert splits == [_pystdlib._split_of(n) for n in names]
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert abs(share["train"] - 0.8) < 0.04 and abs(share["test"] - 0.1) < 0.03


def test_the_cache_is_reused_and_a_corrupt_one_rebuilt(chars, cache, monkeypatch):
    (target,) = cache.glob("pystdlib-chars-*.npz")
    monkeypatch.setattr(_pystdlib, "_generate", lambda files: pytest.fail("regenerated"))
    again = load_dataset("pystdlib-chars", cache_dir=str(cache))
    assert torch.equal(again.y_test, chars.y_test) and torch.equal(again.x_val, chars.x_val)
    monkeypatch.undo()
    target.write_bytes(b"not an npz")
    rebuilt = load_dataset("pystdlib-chars", cache_dir=str(cache))
    assert torch.equal(rebuilt.y_train, chars.y_train)
    assert not list(cache.glob(".*.tmp"))  # written atomically, nothing left behind


def test_evaluation_reports_bits_per_character(chars):
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(d_input=chars.d_input, d_output=chars.d_output, d_model=8,
                               state_dims=[4], pooling="none")).eval()
    x, y = chars.x_val[:20], chars.y_val[:20]
    got = evaluate(model, x, y, "classification", batch_size=7,
                   bits_name=chars.info["bits_name"])
    with torch.no_grad():
        logits = model(x)  # (20, 64, V)
    nats = F.cross_entropy(logits.reshape(-1, chars.d_output), y.reshape(-1)).item()
    assert got["bits_per_char"] == pytest.approx(nats / math.log(2), rel=1e-5)
    assert "bits_per_char" not in evaluate(model, x, y, "classification")
