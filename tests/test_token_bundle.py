"""Bundles of token models (an embedding over int64 ids) and the torch-free runner on them.

The references are eager torch on the checkpoint's model: its argmax for the next id, its
logits, and for ``--generate`` a plain loop that re-runs the whole prefix through the model
and appends its argmax (no state, no step graph), so streaming errors cannot hide.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compressm_tune.exporter import export_bundle, verify_bundle
from compressm_tune.exporter._edge import BundleError, EdgeBundle, measure_latency
from compressm_tune.exporter._parity import data_inputs
from compressm_tune.models import SSMConfig, SSMModel
from compressm_tune.training import save_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from test_export import _blocker, _run  # noqa: E402

VOCAB = 11
# a byte-level vocabulary as pystdlib-chars records it: id i < 10 is byte BYTES[i], 10 unknown
BYTES = [ord(c) for c in " ():=adefx"]
ARCHS = ("mamba", "lru")


def _token_model(arch: str) -> SSMModel:
    torch.manual_seed(3)
    config = SSMConfig(arch=arch, vocab_size=VOCAB, d_output=VOCAB, d_model=8,
                       state_dims=[6, 4] if arch == "lru" else [4, 4], pooling="none")
    model = SSMModel(config)
    if arch == "lru":  # BatchNorm statistics far from (0, 1), as after training
        for block in model.blocks:
            block.norm.running_mean.normal_()
            block.norm.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module", params=ARCHS)
def token_bundle(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(f"tok-{arch}")
    model = _token_model(arch)
    ckpt = root / "model.pt"
    # a dataset entry no loader can rebuild, carrying a text vocabulary (parity: random ids)
    save_checkpoint(ckpt, model, step=3, dataset={
        "name": "toy-chars", "task": "classification", "d_input": VOCAB, "seq_len": 12,
        "norm_mean": [0.0] * VOCAB, "norm_std": [1.0] * VOCAB,
        "info": {"vocab_bytes": BYTES, "unknown_id": len(BYTES)}})
    # chunk "auto" times the candidate graphs on ids (LRU: chunked ones too)
    manifest = export_bundle(ckpt, root / "bundle", parity_lengths=(1, 12, 30))
    return model, root / "bundle", manifest


def _ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(VOCAB, size=(batch, length))


def _logits(model: SSMModel, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).numpy()


def test_manifest_says_token_ids(token_bundle):
    model, bundle, manifest = token_bundle
    assert manifest["model"]["vocab_size"] == VOCAB
    assert manifest["input"] == {"kind": "token_ids", "dtype": "int64",
                                 "shape": ["batch", "length"], "vocab_size": VOCAB,
                                 "encoding": "embedding"}
    assert "mean" not in manifest["normalization"]
    assert manifest["task"]["vocabulary"]["bytes"] == BYTES
    assert manifest["files"]["onnx_sequence"]["inputs"][0]["dtype"] == "int64"
    assert manifest["parity"]["max_abs_error"] <= 1e-4
    assert "token ids uniform" in manifest["parity"]["inputs"]
    assert {p.name for p in bundle.iterdir()} == {"model.onnx", "model_step.onnx", "model.ts",
                                                  "run.py", "manifest.json"}
    verify_bundle(bundle)  # every file against the manifest, model.ts loaded by torch


def test_predict_and_stream_match_eager_torch(token_bundle):
    model, bundle, _ = token_bundle
    edge = EdgeBundle(bundle)
    ids = _ids(3, 17)
    want = _logits(model, ids)  # (3, 17, V)
    got = edge.predict(ids.astype(np.int32))
    assert got.shape == (3, 17, VOCAB)
    assert np.abs(got - want).max() <= 1e-4
    streamed = edge.streamer(3).run(ids)
    assert np.abs(streamed - got).max() <= 1e-4
    one = edge.predict(ids[0])  # (L,) is one sequence
    assert np.abs(one[0] - want[0]).max() <= 1e-4


@pytest.mark.parametrize("bad, match", [
    (np.array([[1, VOCAB]]), "outside the vocabulary"),
    (np.array([[-1, 2]]), "outside the vocabulary"),
    (np.array([[0.0, 1.0]]), "integer token ids"),
    (np.zeros((1, 2, 3), np.int64), "shape"),
])
def test_predict_refuses_bad_ids(token_bundle, bad, match):
    with pytest.raises(BundleError, match=match):
        EdgeBundle(token_bundle[1]).predict(bad)


def test_streamer_push_checks_ids(token_bundle):
    stream = EdgeBundle(token_bundle[1], modes=("step",)).streamer(2)
    with pytest.raises(BundleError, match="outside"):
        stream.push(np.array([0, VOCAB]))
    with pytest.raises(BundleError, match="2 token ids"):
        stream.push(np.array([0]))


def test_measure_latency_draws_ids(token_bundle):
    for mode in ("sequence", "step"):
        r = measure_latency(token_bundle[1], mode, min_time_s=0.01, warmup=1, min_repeats=2)
        assert r["seq_len"] == 12 and r["n_samples"] >= 2


def test_run_py_without_torch_gives_torch_argmax(token_bundle, tmp_path):
    model, bundle, _ = token_bundle
    ids = _ids(4, 9, seed=1)
    np.save(tmp_path / "ids.npy", ids)
    want = _logits(model, ids)[:, -1].argmax(-1)
    env = _blocker(tmp_path)
    for extra in ([], ["--stream"]):
        done = _run([bundle / "run.py", "--input", tmp_path / "ids.npy", "--json", *extra],
                    env, tmp_path)
        assert done.returncode == 0, done.stderr
        records = [json.loads(line) for line in done.stdout.splitlines()]
        assert [r["next_id"] for r in records] == want.tolist()
        table = [chr(b) for b in BYTES] + ["\ufffd"]
        assert [r["next_char"] for r in records] == [table[k] for k in want]


def _greedy_reference(model: SSMModel, prompt: str, n: int) -> str:
    """Plain loop: the whole prefix through eager torch, append the argmax, repeat."""
    lookup = {b: i for i, b in enumerate(BYTES)}
    ids = [lookup[b] for b in prompt.encode()]
    for _ in range(n):
        ids.append(int(_logits(model, np.array([ids]))[0, -1].argmax()))
    table = [chr(b) for b in BYTES] + ["\ufffd"]
    return prompt + "".join(table[i] for i in ids[len(prompt):])


def test_run_py_generate_equals_greedy_torch_loop(token_bundle, tmp_path):
    model, bundle, _ = token_bundle
    done = _run([bundle / "run.py", "--text", "def f(x", "--generate", "15"],
                _blocker(tmp_path), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n") == _greedy_reference(model, "def f(x", 15)


@pytest.mark.parametrize("args, match", [
    (["--text", "def g("], "outside the bundle's vocabulary: 'g'"),
    (["--text", ""], "text is empty"),
    (["--input", "{floats}"], "integer token ids"),
    (["--input", "{big}"], "outside the vocabulary"),
    (["--generate", "3"], "goes with --text"),
])
def test_run_py_bad_input_exits_2_one_line(token_bundle, tmp_path, args, match):
    np.save(tmp_path / "floats.npy", np.zeros((2, 5), np.float32))
    np.save(tmp_path / "big.npy", np.array([[0, 1, VOCAB + 3]]))
    args = [a.format(floats=tmp_path / "floats.npy", big=tmp_path / "big.npy") for a in args]
    done = _run([token_bundle[1] / "run.py", *args], _blocker(tmp_path), tmp_path)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and match in done.stderr, done.stderr


def test_run_py_stdin_streams_ids(token_bundle, tmp_path):
    model, bundle, _ = token_bundle
    done = subprocess.run([sys.executable, bundle / "run.py", "--stdin", "--json"],
                          input="3\n7\n\n3\n", env=_blocker(tmp_path), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = [json.loads(line)["next_id"] for line in done.stdout.splitlines()]
    want = _logits(model, np.array([[3, 7]]))[0].argmax(-1).tolist()
    assert got == [*want, want[0]]  # a blank line starts a new sequence


def test_data_inputs_keep_token_ids_two_dimensional():
    ids = torch.arange(12).reshape(3, 4)
    x = data_inputs(ids)(2, 9, torch.Generator().manual_seed(0))
    assert x.shape == (2, 9) and x.dtype == torch.int64
    rows = {tuple(r.tolist()) for r in ids}
    for row in x:  # every full window of 4 is one of the sequences
        assert tuple(row[:4].tolist()) in rows and tuple(row[4:8].tolist()) in rows


def _one_hot_bundle(root: Path) -> tuple[SSMModel, Path]:
    """A float model over one-hot ids (as ``pystdlib-chars`` trains them) with a vocabulary."""
    torch.manual_seed(5)
    model = SSMModel(SSMConfig(arch="mamba", d_input=VOCAB, d_output=VOCAB, d_model=8,
                               state_dims=[4, 4], pooling="none")).eval()
    save_checkpoint(root / "onehot.pt", model, step=1, dataset={
        "name": "toy-chars", "task": "classification", "d_input": VOCAB, "seq_len": 12,
        "norm_mean": [0.0] * VOCAB, "norm_std": [1.0] * VOCAB,
        "info": {"vocab_bytes": BYTES, "unknown_id": len(BYTES)}})
    export_bundle(root / "onehot.pt", root / "b", formats="onnx", parity_lengths=(1, 12))
    return model, root / "b"


def test_one_hot_model_bundle_takes_ids_and_generates(tmp_path):
    model, bundle = _one_hot_bundle(tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["input"]["encoding"] == "one-hot"
    ids = _ids(2, 9, seed=4)
    with torch.no_grad():
        want = model(torch.nn.functional.one_hot(torch.as_tensor(ids), VOCAB).float()).numpy()
    assert np.abs(EdgeBundle(bundle).predict(ids) - want).max() <= 1e-4
    done = _run([bundle / "run.py", "--text", "x = f(", "--generate", "10"],
                _blocker(tmp_path), tmp_path)
    assert done.returncode == 0, done.stderr
    lookup = {b: i for i, b in enumerate(BYTES)}
    seq = [lookup[b] for b in b"x = f("]
    for _ in range(10):  # plain loop over the whole prefix, one-hot as in training
        x = torch.nn.functional.one_hot(torch.tensor([seq]), VOCAB).float()
        with torch.no_grad():
            seq.append(int(model(x)[0, -1].argmax()))
    table = [chr(b) for b in BYTES] + ["\ufffd"]
    assert done.stdout.rstrip("\n") == "x = f(" + "".join(table[i] for i in seq[6:])


def test_manifest_without_input_section_is_a_float_bundle(tmp_path):
    """Bundles written before token ids have no ``input`` section and no ``vocab_size``: the
    runner reads them as float bundles, unchanged."""
    model, bundle = _one_hot_bundle(tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["input"], manifest["model"]["vocab_size"], manifest["task"]["vocabulary"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    edge = EdgeBundle(bundle)
    assert not edge.tokens
    x = np.random.default_rng(0).standard_normal((2, 7, VOCAB)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.as_tensor(x)).numpy()
    assert np.abs(edge.predict(x) - want).max() <= 1e-4


def test_pystdlib_token_model_checks_parity_on_test_ids(tmp_path, session_cache):
    """A token model whose checkpoint names pystdlib-chars: parity runs on the rebuilt
    test split's ids, and the manifest carries the dataset's byte vocabulary."""
    from compressm_tune.data import load_dataset

    ds = load_dataset("pystdlib-chars", seed=0)
    vocab = ds.d_input
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(arch="mamba", vocab_size=vocab, d_output=vocab, d_model=8,
                               state_dims=[4], pooling="none")).eval()
    save_checkpoint(tmp_path / "m.pt", model, step=1, dataset={
        "name": ds.name, "task": ds.task, "d_input": ds.d_input, "d_output": ds.d_output,
        "seq_len": ds.seq_len, "norm_mean": list(ds.norm_mean), "norm_std": list(ds.norm_std),
        "info": ds.info}, train_config={"seed": 0})
    manifest = export_bundle(tmp_path / "m.pt", tmp_path / "b", formats="onnx", modes="sequence",
                             parity_lengths=(1, 70))
    assert manifest["parity"]["inputs"].startswith("pystdlib-chars test-split sequences (token")
    assert manifest["task"]["vocabulary"]["bytes"] == ds.info["vocab_bytes"]
    edge = EdgeBundle(tmp_path / "b", modes=("sequence",))
    ids = edge.text_ids("import os\n")
    assert edge.decode(ids) == "import os\n"
    want = _logits(model, ids[None])
    assert np.abs(edge.predict(ids) - want).max() <= 1e-4


def test_int8_accuracy_of_a_token_model_is_measured_on_test_ids(tmp_path):
    """--quantize int8 on a token model whose dataset rebuilds: both graphs are scored on the
    test split's ids (it used to say "not measured for token models"); the float32 figure is
    eager torch's next-character accuracy on the same ids."""
    from compressm_tune.data import load_dataset

    ds = load_dataset("pystdlib-chars", seed=0)
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(arch="lru", vocab_size=ds.d_input, d_output=ds.d_input,
                               d_model=8, state_dims=[6], pooling="none")).eval()
    save_checkpoint(tmp_path / "m.pt", model, step=1, dataset={
        "name": ds.name, "task": ds.task, "d_input": ds.d_input, "d_output": ds.d_output,
        "seq_len": ds.seq_len, "norm_mean": list(ds.norm_mean), "norm_std": list(ds.norm_std),
        "info": ds.info}, train_config={"seed": 0})
    manifest = export_bundle(tmp_path / "m.pt", tmp_path / "b", formats="onnx",
                             modes="sequence", quantize="int8", parity_lengths=(1, 70))
    acc = manifest["quantization"]["accuracy"]
    ids = ds.x_test.argmax(-1)  # (n, L) the one-hot test rows as ids
    with torch.no_grad():
        want = (model(ids).argmax(-1) == ds.y_test).double().mean().item()
    assert acc["metric"] == "accuracy" and acc["n"] == len(ids)
    assert acc["float32"]["accuracy"] == pytest.approx(want, abs=1e-3)
    assert 0.0 <= acc["int8"]["accuracy"] <= 1.0 and "loss" in acc["int8"]


def test_graphs_use_transformers_names(token_bundle):
    """``input_ids`` -> ``logits``; the step graph's cache as transformers holds it: a Mamba
    block's conv window ``(batch, E, d_conv)`` and SSM state ``(batch, E, N)`` apart."""
    model, _, manifest = token_bundle
    files = manifest["files"]
    names = {key: [[v["name"] for v in files[key][side]] for side in ("inputs", "outputs")]
             for key in ("onnx_sequence", "onnx_step")}
    assert names["onnx_sequence"] == [["input_ids"], ["logits"]]
    if model.config.arch == "mamba":
        e = model.config.expand * model.config.d_model
        past = ["past_conv_state.0", "past_ssm_state.0", "past_conv_state.1", "past_ssm_state.1"]
        shapes = [["batch", e, 4], ["batch", e, 4]] * 2  # d_conv 4, N 4
    else:
        past, shapes = ["past_ssm_state.0", "past_ssm_state.1"], [["batch", 6, 2], ["batch", 4, 2]]
    present = [n.replace("past_", "present_") for n in past]
    assert names["onnx_step"] == [["input_ids", *past], ["logits", *present]]
    assert [v["shape"] for v in files["onnx_step"]["inputs"][1:]] == shapes
    io = manifest["io"]
    assert io["names"] == "transformers" and io["sequence"] == {"input": "input_ids",
                                                                "output": "logits"}
    assert [(s["input"], s["output"], s["shape"]) for s in io["step"]["states"]] == list(
        zip(past, present, shapes, strict=True))


def _rename_tensors(path: Path, names: dict[str, str]) -> None:
    """Rename an ONNX file's graph inputs and outputs (and every use of them)."""
    import onnx

    model = onnx.load(str(path))
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for value in [*graph.input, *graph.output]:
            value.name = names.get(value.name, value.name)
        for node in graph.node:
            node.input[:] = [names.get(n, n) for n in node.input]
            node.output[:] = [names.get(n, n) for n in node.output]
            graphs += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    onnx.save(model, str(path))


@pytest.mark.parametrize("token_bundle", ["lru"], indirect=True)
def test_bundle_written_before_transformers_names_still_runs(token_bundle, tmp_path):
    """A token bundle from before the ``io`` section named its tensors ``x -> y`` and
    ``x_t, state_k -> y_t, next_state_k``: the runner reads the names from the bundle, so it
    still predicts and streams torch's logits; a manifest whose ``io`` names disagree with
    the step graph is refused in one line. (An LRU block's state kept its layout, so renaming
    today's graph rebuilds the old one; Mamba: the next test, on a bundle the old code wrote.)"""
    from compressm_tune.exporter._edge import sha256_file

    model, source, _ = token_bundle
    bundle = tmp_path / "old"
    shutil.copytree(source, bundle)
    old = {"input_ids": "x", "logits": "y"}
    step = {"input_ids": "x_t", "logits": "y_t"}
    for k in range(2):
        step[f"past_ssm_state.{k}"], step[f"present_ssm_state.{k}"] = (f"state_{k}",
                                                                       f"next_state_{k}")
    manifest = json.loads((bundle / "manifest.json").read_text())
    for key, table in (("onnx_sequence", old), ("onnx_step", step)):
        entry = manifest["files"][key]
        _rename_tensors(bundle / entry["path"], table)
        entry["sha256"] = sha256_file(bundle / entry["path"])
        for v in entry["inputs"] + entry["outputs"]:
            v["name"] = table.get(v["name"], v["name"])
    io = manifest.pop("io")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    edge = EdgeBundle(bundle)
    ids = _ids(2, 9, seed=5)
    want = _logits(model, ids)
    assert np.abs(edge.predict(ids) - want).max() <= 1e-4
    assert np.abs(edge.streamer(2).run(ids) - want).max() <= 1e-4
    io["step"]["input"] = "x_t"  # new manifest, old graph: names differ
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "io": io}))
    with pytest.raises(BundleError, match=r"takes \['x_t', 'state_0', 'state_1'\] but the "
                                          r"manifest's io.step names"):
        EdgeBundle(bundle, modes=("step",))


OLD_MAMBA = Path(__file__).parent / "data" / "old_mamba_token_bundle"


def test_mamba_bundle_written_before_transformers_names_still_runs(tmp_path):
    """A Mamba token bundle written by the code before transformers' names (see
    ``tests/data/old_mamba_token_bundle/README.md``): one flat state per block ``(batch, E,
    K - 1 + N)``, ``x_t, state_k -> y_t, next_state_k``, no ``io`` section. Today's runner
    hands back whatever state the graph returned, so it predicts and streams that code's
    eager-torch logits, and the repository's ``export/run.py`` continues text as that code's
    greedy loop did."""
    ref = np.load(OLD_MAMBA / "reference.npz")
    bundle = tmp_path / "old"
    shutil.copytree(OLD_MAMBA / "bundle", bundle)
    (bundle / "run.py").write_bytes(gzip.decompress((OLD_MAMBA / "run.py.gz").read_bytes()))
    manifest = verify_bundle(bundle)  # hashes, graphs and model.ts against the manifest
    assert "io" not in manifest
    edge = EdgeBundle(bundle)
    assert edge.step_inputs == ["x_t", "state_0", "state_1"]
    assert [shape for _, shape in edge.state_specs] == [["batch", 16, 7], ["batch", 16, 6]]
    ids, want = ref["ids"], ref["logits"]
    assert np.abs(edge.predict(ids) - want).max() <= 1e-4
    assert np.abs(edge.streamer(2).run(ids) - want).max() <= 1e-4
    assert measure_latency(bundle, "step", min_time_s=0.01, warmup=1, min_repeats=2)["p50_ms"] > 0
    runner = Path(__file__).parents[1] / "export" / "run.py"  # today's runner, not the bundle's
    done = _run([runner, bundle, "--text", str(ref["prompt"]), "--generate", "12"],
                _blocker(tmp_path), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n") == str(ref["text"])


def test_malformed_io_section_is_one_line(token_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(token_bundle[1], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["io"] = {"step": {"input": "input_ids"}}  # no states listed
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"manifest io section must name .*io.step.states"):
        EdgeBundle(bundle, modes=("step",))
