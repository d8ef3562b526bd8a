"""Export: ONNX / TorchScript bundles, their parity with eager torch, and the torch-free runner.

Behaviour that depends on the layer runs for both architectures (``arch``: the LRU and the
selective S6 layer), each cut to unequal widths; option and file checks run on the LRU alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compressm_tune.errors import CheckpointError, CompressmError, ExportError
from compressm_tune.exporter import (
    SUPPORTED_OPSETS,
    build_sequence_model,
    build_step_model,
    export_bundle,
    extract_weights,
    load_bundle,
    measure_latency,
    onnxruntime_functions,
    verify_bundle,
)
from compressm_tune.models import SSMConfig, SSMModel
from compressm_tune.reduction import reduce_layer, state_scores, truncate_layer
from compressm_tune.training import TrainConfig, Trainer, save_checkpoint

REPO = Path(__file__).resolve().parent.parent
MEAN, STD = [0.5, -2.0], [2.0, 0.25]  # a non-trivial input normalization
SEQ_LEN = 40
ARCHS = ("lru", "selective")
WIDTHS = {"lru": [5, 6], "selective": [5, 3]}  # after _reduced_model's cuts
STATE_SHAPES = {"lru": [["batch", 5, 2], ["batch", 6, 2]],  # (batch, N, 2): re, im
                "selective": [["batch", 8, 5], ["batch", 8, 3]]}  # (batch, H, N)


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _reduced_model(pooling: str, seed: int = 0, arch: str = "lru") -> SSMModel:
    """Two blocks made unequal by real cuts (:data:`WIDTHS`): balanced truncation of the
    first LRU block, data-driven state selection in both selective blocks."""
    torch.manual_seed(seed)
    model = SSMModel(SSMConfig(arch=arch, d_input=2, d_output=3, d_model=8, state_dims=[12, 6],
                               pooling=pooling))
    for block in model.blocks:  # BatchNorm statistics far from (0, 1), as after training
        block.norm.running_mean.normal_()
        block.norm.running_var.uniform_(0.5, 2.0)
    calibration = torch.randn(4, 20, 8)  # (batch, L, H) inputs for the selective scores
    for block, rank in zip(model.blocks, WIDTHS[arch], strict=True):
        reduce_layer(block.ssm, rank, scores=state_scores(block.ssm, calibration)
                     if arch == "selective" else None)
    assert model.state_dims == WIDTHS[arch]
    return model.eval()


def _checkpoint(path: Path, model: SSMModel) -> Path:
    task = "classification" if model.config.pooling == "mean" else "regression"
    save_checkpoint(path, model, step=7, dataset={
        "name": "synthetic", "task": task, "d_input": 2, "d_output": 3, "seq_len": SEQ_LEN,
        "norm_mean": MEAN, "norm_std": STD, "info": {}})
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """``get(arch, pooling)`` -> (model, checkpoint, bundle dir, manifest), exported once."""
    cache = {}

    def get(arch: str, pooling: str):
        if (arch, pooling) not in cache:
            root = tmp_path_factory.mktemp(f"export-{arch}-{pooling}")
            model = _reduced_model(pooling, arch=arch)
            ckpt = _checkpoint(root / "model.pt", model)
            manifest = export_bundle(ckpt, root / "bundle")
            cache[arch, pooling] = model, ckpt, root / "bundle", manifest
        return cache[arch, pooling]

    return get


@pytest.fixture(scope="module", params=[(a, p) for a in ARCHS for p in ("mean", "none")],
                ids=lambda p: "-".join(p))
def exported(request, bundles):
    """A reduced model of each architecture with each pooling, exported."""
    return bundles(*request.param)


@pytest.fixture(scope="module", params=["mean", "none"])
def exported_lru(request, bundles):
    """The LRU bundles alone: for checks of options and files, which do not depend on the
    layer."""
    return bundles("lru", request.param)


def _blocker(tmp_path: Path, names=("torch", "compressm_tune")) -> dict[str, str]:
    """Environment whose PYTHONPATH makes importing each of ``names`` fail.

    Subprocesses run with ``cwd=tmp_path``, so the repository is not on their path either.
    """
    root = tmp_path / ("blocked-" + "-".join(names))
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "__init__.py").write_text(
            f"raise ImportError('{name} is blocked in this test')\n")
    return {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}


def _run(args, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------- parity


def test_export_writes_the_contract_and_passes_parity(exported):
    model, ckpt, bundle, manifest = exported
    arch = model.config.arch
    assert manifest["model"]["state_dims"] == WIDTHS[arch] == model.state_dims
    assert manifest["model"]["arch"] == arch
    assert manifest["model"]["state_shapes"] == STATE_SHAPES[arch]
    for name in ("model.onnx", "model_step.onnx", "model.ts", "run.py", "manifest.json"):
        assert (bundle / name).is_file(), name
    assert json.loads((bundle / "manifest.json").read_text()) == manifest
    assert manifest["normalization"]["mean"] == MEAN and manifest["normalization"]["std"] == STD
    assert manifest["task"]["seq_len"] == SEQ_LEN and manifest["opset"] == 17
    assert manifest["source"]["sha256"] and manifest["source"]["step"] == 7
    step_inputs = manifest["files"]["onnx_step"]["inputs"]
    assert [s["shape"] for s in step_inputs[1:3]] == STATE_SHAPES[arch]
    assert [list(s.shape) for s in model.allocate_state(1)[:2]] == [
        [1, *shape[1:]] for shape in STATE_SHAPES[arch]]  # the layout torch streams with
    parity = manifest["parity"]
    assert parity["max_abs_error"] <= 1e-4
    assert parity["inputs"].startswith("N(0, 1)")  # dataset "synthetic" cannot be rebuilt
    covered = {(c["engine"], c["mode"], c["length"]) for c in parity["checks"]}
    for engine in ("onnxruntime", "torchscript"):
        for mode in ("sequence", "step"):
            assert {(engine, mode, 1), (engine, mode, 2000)} <= covered
    assert {c["batch"] for c in parity["checks"]} == {1, 3}


def test_onnx_matches_torch_from_length_1_to_3000(exported):
    """Independent of the exporter's own check: fresh inputs, fresh sessions, long sequences."""
    model, _, bundle, _ = exported
    sequence, step = _session(bundle / "model.onnx"), _session(bundle / "model_step.onnx")
    g = torch.Generator().manual_seed(123)
    for batch, length in ((1, 1), (2, 3000), (4, 17)):
        x = torch.randn(batch, length, 2, generator=g)
        with torch.no_grad():
            want = model(x).numpy()
        got = sequence.run(None, {"x": x.numpy()})[0]
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4, (batch, length)
    # streaming: the step graph token by token equals the sequence output
    x = torch.randn(3, 300, 2, generator=g)
    names = [i.name for i in step.get_inputs()]
    state = [s.numpy() for s in model.allocate_state(3)]
    ys = []
    for t in range(x.shape[1]):
        out = step.run(None, dict(zip(names, [x[:, t].numpy(), *state], strict=True)))
        ys.append(out[0])
        state = out[1:]
    with torch.no_grad():
        want = model(x).numpy()
    got = ys[-1] if model.config.pooling == "mean" else np.stack(ys, axis=1)
    assert np.abs(got - want).max() <= 1e-4


def test_parity_inputs_are_the_data_when_it_can_be_rebuilt(tmp_path):
    """A selective block's output grows up to the 4th power of its input: with large B/C
    projections, N(0, 1) noise (far outside one-hot tokens) drives torch's own outputs so high
    that float32 rounding exceeds the bar, while the data the model is for stays in range."""
    from compressm_tune.exporter._parity import gaussian_inputs, run_parity

    torch.manual_seed(0)
    model = SSMModel(SSMConfig(arch="selective", d_input=10, d_output=8, d_model=8,
                               state_dims=[6, 4], pooling="none")).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.ssm.B_proj.mul_(20.0)
            block.ssm.C_proj.mul_(20.0)
    copy = {"seq_len": 16, "n_tokens": 8, "n_copy": 4, "n_train": 40, "n_test": 20}
    save_checkpoint(tmp_path / "copy.pt", model, dataset={
        "name": "selective-copy", "task": "classification", "d_input": 10, "d_output": 8,
        "seq_len": 16, "norm_mean": [0.0] * 10, "norm_std": [1.0] * 10,
        "info": {"config": copy}})
    manifest = export_bundle(tmp_path / "copy.pt", tmp_path / "b", formats="onnx",
                             modes="sequence", parity_lengths=(1, 16, 500))
    assert manifest["parity"]["inputs"].startswith("selective-copy test-split sequences")
    assert manifest["parity"]["max_abs_error"] <= 1e-4
    session = _session(tmp_path / "b" / "model.onnx")
    with pytest.raises(ExportError, match=r"torch's outputs reach .* N\(0, 1\)"):
        run_parity(model, onnx_sequence=session, lengths=(500,), batches=(3,),
                   inputs=gaussian_inputs(10))


def test_sequence_graph_size_does_not_depend_on_length(exported):
    _, _, bundle, manifest = exported
    graph = onnx.load(str(bundle / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    if manifest["sequence_graph"]["chunk"] is None or manifest["model"]["arch"] == "selective":
        assert ops.count("Scan") == 2  # one per block, over tokens or (selective) chunks
    else:  # chunked LRU: no loop outside the per-block If that adds carries between chunks
        assert ops.count("If") == 2 and "Scan" not in ops
    assert "Loop" not in ops
    assert len(graph.node) < 120  # a length-unrolled graph would hold thousands
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim[:2]]
    assert dims == ["batch", "length"]


def test_torchscript_matches_and_loads_with_torch_jit_load_alone(exported, tmp_path):
    model, _, bundle, _ = exported
    x = torch.randn(2, 50, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(x).numpy()
    np.save(tmp_path / "x.npy", x.numpy())
    script = (
        "import sys, numpy as np, torch, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "m = torch.jit.load(sys.argv[1])\n"
        "x = torch.from_numpy(np.load(sys.argv[2]))\n"
        "y = m(x)\n"
        "state = m.allocate_state(2)\n"
        "for t in range(x.shape[1]):\n"
        "    y_t, state = m.step(x[:, t], state)\n"
        "np.save(sys.argv[3], y.detach().numpy()); np.save(sys.argv[4], y_t.detach().numpy())\n"
    )
    env = _blocker(tmp_path, names=("compressm_tune",))  # a fresh interpreter without us
    done = _run(["-c", script, bundle / "model.ts", tmp_path / "x.npy", tmp_path / "y.npy",
                 tmp_path / "y_t.npy"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert np.abs(np.load(tmp_path / "y.npy") - want).max() <= 1e-4
    last = want if model.config.pooling == "mean" else want[:, -1]
    assert np.abs(np.load(tmp_path / "y_t.npy") - last).max() <= 1e-4


def test_torchscript_runs_a_nan_padded_batch_as_each_sequence_alone(exported):
    """A NaN-padded batch used to come out NaN from the TorchScript module (the torch model
    masks it); the reference runs each sequence alone at its true length."""
    model, _, bundle, _ = exported
    m = torch.jit.load(str(bundle / "model.ts"))
    x = torch.randn(3, 12, 2, generator=torch.Generator().manual_seed(7))
    lengths = [12, 5, 1]
    padded = x.clone()
    for i, n in enumerate(lengths):
        padded[i, n:] = float("nan")
    with torch.no_grad():
        out = m(padded)
        for i, n in enumerate(lengths):
            alone = m(x[i:i + 1, :n])[0]
            got = out[i] if model.config.pooling == "mean" else out[i, :n]
            torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("opset", list(SUPPORTED_OPSETS))
def test_every_supported_opset_builds_and_runs(opset, arch):
    model = _reduced_model("mean", arch=arch)
    w = extract_weights(model)
    x = torch.randn(2, 9, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x).numpy()
    seq = ort.InferenceSession(build_sequence_model(w, opset).SerializeToString(),
                               providers=["CPUExecutionProvider"])
    assert np.abs(seq.run(None, {"x": x.numpy()})[0] - want).max() <= 1e-4
    ort.InferenceSession(build_step_model(w, opset).SerializeToString(),
                         providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("d_model,state_dims", [(16, [4, 16]), (8, [12, 6]), (4, [12, 6])])
def test_selective_scan_in_either_state_layout_matches_torch(d_model, state_dims):
    """The per-token Scan holds a selective state channels last, (N, H), when H >= N, else
    (H, N); each layout, and both in one network, against the eager model."""
    model = SSMModel(SSMConfig(arch="selective", d_input=3, d_output=5, d_model=d_model,
                               state_dims=state_dims, pooling="none")).eval()
    x = torch.randn(2, 23, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(x).numpy()
    graph = build_sequence_model(extract_weights(model))
    scans = [n for n in graph.graph.node if n.op_type == "Scan"]
    bodies = [next(a.g for a in n.attribute if a.name == "body") for n in scans]
    held = [[[d.dim_value for d in b.input[i].type.tensor_type.shape.dim[1:]] for i in (0, 1)]
            for b in bodies]  # the state's shape and the step size's (which tells H == N apart)
    assert held == [[[n, d_model], [1, d_model]] if d_model >= n else [[d_model, n], [d_model, 1]]
                    for n in state_dims]
    seq = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.abs(seq.run(None, {"x": x.numpy()})[0] - want).max() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_onnxruntime_functions_stand_in_for_the_eager_model(pooling, arch):
    """The in-memory callables the profiler's onnxruntime runtime can use."""
    model = _reduced_model(pooling, arch=arch)
    forward, step = onnxruntime_functions(model, threads=1)
    x = torch.randn(2, 30, 2, generator=torch.Generator().manual_seed(2))
    state, state_ref = model.allocate_state(2), model.allocate_state(2)
    with torch.no_grad():
        assert (forward(x) - model(x)).abs().max() <= 1e-4
        for t in range(x.shape[1]):
            y, state = step(x[:, t], state)
            y_ref, state_ref = model.step(x[:, t], state_ref)
            assert (y - y_ref).abs().max() <= 1e-4
    assert [tuple(s.shape) for s in state] == [tuple(s.shape) for s in state_ref]


# ----------------------------------------------------------------------------- edge runner


def test_edge_runner_works_where_torch_cannot_be_imported(exported, tmp_path):
    model, _, bundle, manifest = exported
    env = _blocker(tmp_path)
    assert _run(["-c", "import torch"], env, tmp_path).returncode != 0  # the blocker works
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, SEQ_LEN, 2, generator=g)  # normalized space
    raw = x.numpy() * np.array(STD, np.float32) + np.array(MEAN, np.float32)
    np.savez(tmp_path / "raw.npz", x=raw)
    with torch.no_grad():
        want = model(x).numpy()
    runners = [REPO / "export" / "run.py", bundle / "run.py"]
    for runner in runners:
        done = _run([runner, bundle, "--input", tmp_path / "raw.npz", "--json",
                     "--output", tmp_path / "y.npy"], env, tmp_path)
        assert done.returncode == 0, done.stderr
        assert np.abs(np.load(tmp_path / "y.npy") - want).max() <= 1e-4
        records = [json.loads(line) for line in done.stdout.splitlines()]
        assert len(records) == 4
        if manifest["task"]["task"] == "classification":
            assert [r["class"] for r in records] == want.argmax(-1).tolist()
    # token by token through the step graph (bundle dir defaults to run.py's own folder)
    done = _run([bundle / "run.py", "--input", tmp_path / "raw.npz", "--stream",
                 "--output", tmp_path / "ys.npy"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    ys = np.load(tmp_path / "ys.npy")  # (B, L, d_out)
    got = ys[:, -1] if model.config.pooling == "mean" else ys
    assert np.abs(got - want).max() <= 1e-4
    # --bench: p50/p90 with the thread count
    done = _run([bundle / "run.py", "--bench", "--min-time-s", "0.05", "--threads", "1",
                 "--json"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["mode"] for r in results] == ["sequence", "step"]
    assert all(r["threads"] == 1 and 0 < r["p50_ms"] <= r["p90_ms"] for r in results)


def test_bundle_runner_is_the_packaged_runner_and_keeps_to_python_3_8(exported_lru):
    import ast

    from compressm_tune.exporter import _edge

    source = Path(_edge.__file__).read_text()
    assert (exported_lru[2] / "run.py").read_text() == source
    ast.parse(source, feature_version=(3, 8))  # devices run older Pythons than we do
    imports = {n.names[0].name.split(".")[0] for n in ast.walk(ast.parse(source))
               if isinstance(n, ast.Import)}
    imports |= {n.module.split(".")[0] for n in ast.walk(ast.parse(source))
                if isinstance(n, ast.ImportFrom)}
    assert imports <= {"__future__", "argparse", "hashlib", "json", "os", "platform", "sys",
                       "time", "pathlib", "numpy", "onnxruntime"}


def test_edge_runner_streams_from_stdin(exported, tmp_path):
    model, _, bundle, _ = exported
    tokens = np.array([[0.5, -2.0], [1.0, -1.0], [0.0, 0.0]], np.float32)  # raw
    text = "\n".join(" ".join(map(str, t)) for t in tokens) + "\n\n0.5 -2.0\n"
    done = subprocess.run([sys.executable, str(bundle / "run.py"), "--stdin", "--json"],
                          input=text, env=_blocker(tmp_path), cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["token"] for r in records] == [0, 1, 2, 0]  # a blank line resets the state
    x = (torch.from_numpy(tokens) - torch.tensor(MEAN)) / torch.tensor(STD)
    with torch.no_grad():
        want = model(x[None])[0]
    want = want if model.config.pooling == "mean" else want[-1]
    if "class" in records[2]:
        assert records[2]["class"] == int(want.argmax())
    else:
        assert np.abs(np.array(records[2]["output"]) - want.numpy()).max() <= 1e-4


# ----------------------------------------------------------------------------- mismatches


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def _edit_manifest(bundle: Path, edit) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_manifest_with_other_widths_is_rejected(exported_lru, tmp_path):
    bundle = _copy(exported_lru[2], tmp_path)

    def widen(m):
        m["model"]["state_dims"] = [47, 12]

    _edit_manifest(bundle, widen)
    with pytest.raises(ExportError, match=r"state widths \[5,6\] but the manifest says \[47,12\]"):
        load_bundle(bundle, modes=("sequence",))
    with pytest.raises(ExportError, match="state widths"):
        verify_bundle(bundle)
    done = _run([REPO / "export" / "run.py", bundle, "--bench", "--min-time-s", "0.01"],
                _blocker(tmp_path), tmp_path)
    assert done.returncode == 2 and "state widths" in done.stderr
    assert "Traceback" not in done.stderr


def test_manifest_of_the_other_architecture_is_rejected(bundles, tmp_path):
    bundle = _copy(bundles("selective", "mean")[2], tmp_path)

    def relabel(m):
        m["model"]["arch"] = "lru"

    _edit_manifest(bundle, relabel)
    with pytest.raises(ExportError, match="holds a 'selective' network but the manifest says"):
        load_bundle(bundle, modes=("sequence",))
    with pytest.raises(ExportError, match="model.onnx holds a 'selective' network"):
        verify_bundle(bundle)

    def drop_onnx(m):  # leaves the TorchScript file to betray the relabelling
        m["files"] = {k: v for k, v in m["files"].items() if not k.startswith("onnx")}

    _edit_manifest(bundle, drop_onnx)
    with pytest.raises(ExportError, match="model.ts holds a 'selective' network"):
        verify_bundle(bundle)


def test_swapped_model_file_is_rejected(exported_lru, tmp_path):
    bundle = _copy(exported_lru[2], tmp_path)
    other = _reduced_model(exported_lru[0].config.pooling, seed=1)
    truncate_layer(other.blocks[1].ssm, 3)  # widths [5, 3]
    (bundle / "model_step.onnx").write_bytes(
        build_step_model(extract_weights(other)).SerializeToString())
    with pytest.raises(ExportError, match="sha256"):
        load_bundle(bundle, modes=("step",))
    # even with the hash patched to match, the widths betray the swap
    from compressm_tune.exporter._edge import sha256_file

    def patch_hash(m):
        m["files"]["onnx_step"]["sha256"] = sha256_file(bundle / "model_step.onnx")

    _edit_manifest(bundle, patch_hash)
    with pytest.raises(ExportError, match="do not match the manifest"):
        load_bundle(bundle, modes=("step",))
    done = _run([bundle / "run.py", "--stdin"], _blocker(tmp_path), tmp_path)
    assert done.returncode == 2 and "do not match the manifest" in done.stderr


def test_changed_torchscript_file_and_missing_manifest_are_rejected(exported_lru, tmp_path):
    bundle = _copy(exported_lru[2], tmp_path)
    verify_bundle(bundle)  # the untouched copy passes
    with open(bundle / "model.ts", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ExportError, match="model.ts does not match its manifest"):
        verify_bundle(bundle)
    (bundle / "manifest.json").unlink()
    with pytest.raises(ExportError, match="no manifest.json"):
        load_bundle(bundle)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("opset", [12, 99, "17"])
def test_unsupported_opset_is_one_clear_error(exported_lru, tmp_path, opset):
    _, ckpt, _, _ = exported_lru
    with pytest.raises(ExportError, match=r"opset must be an integer in \[13, 24\]") as info:
        export_bundle(ckpt, tmp_path / "b", opset=opset)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("content", [b"not a checkpoint at all", None])
def test_corrupt_or_missing_checkpoint_is_a_checkpoint_error(exported_lru, tmp_path, content):
    ckpt = tmp_path / "bad.pt"
    if content is None:  # a real checkpoint cut in half
        ckpt.write_bytes(exported_lru[1].read_bytes()[:300])
    else:
        ckpt.write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        export_bundle(ckpt, tmp_path / "b")
    with pytest.raises(CheckpointError, match="not found"):
        export_bundle(tmp_path / "missing.pt", tmp_path / "b")


def test_foreign_or_non_finite_checkpoint_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a compressm-tune checkpoint"):
        export_bundle(tmp_path / "foreign.pt", tmp_path / "b")
    model = _reduced_model("mean")
    with torch.no_grad():
        model.blocks[1].ssm.B_re[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        export_bundle(_checkpoint(tmp_path / "nan.pt", model), tmp_path / "b")


def test_failed_parity_writes_no_manifest(exported_lru, tmp_path):
    _, ckpt, _, _ = exported_lru
    out = tmp_path / "b"
    with pytest.raises(ExportError, match="parity check failed"):
        export_bundle(ckpt, out, tolerance=1e-30, parity_lengths=(1, 5))
    assert list(out.iterdir()) == []  # neither manifest nor staged files


@pytest.mark.parametrize("kw", [{"formats": "onnx,tflite"}, {"modes": ()},
                                {"quantize": "int4"}, {"quantize": "int8",
                                                       "formats": "torchscript"},
                                {"threads": 0}])
def test_bad_options_are_rejected_before_any_work(exported_lru, tmp_path, kw):
    with pytest.raises(ExportError) as info:
        export_bundle(exported_lru[1], tmp_path / "b", **kw)
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- quantize, CLI


def _cli(argv) -> int:
    from compressm_tune.cli import build_parser

    args = build_parser().parse_args(["export", *argv])
    return args.func(args)


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_int8_records_size_and_test_accuracy(mnist1d, tmp_path, capsys, arch):
    """A trained checkpoint through the CLI's export with --quantize int8."""
    cfg = SSMConfig(arch=arch, d_input=1, d_output=10, d_model=16, state_dims=[16, 8],
                    pooling="mean")
    trainer = Trainer(cfg, TrainConfig(steps=30, batch_size=32, eval_every=30, threads=1),
                      mnist1d, tmp_path / "run", progress=False)
    trainer.fit()
    out = tmp_path / "bundle"
    assert _cli([str(tmp_path / "run" / "last.pt"), "--out", str(out), "--quantize", "int8",
                 "--format", "onnx"]) == 0
    assert "int8:" in capsys.readouterr().out
    manifest = verify_bundle(out)
    q = manifest["quantization"]
    assert set(q["files"]) == {"onnx_sequence_int8", "onnx_step_int8"}
    assert q["size"]["int8_bytes"] == sum(
        (out / manifest["files"][k]["path"]).stat().st_size for k in q["files"])
    acc = q["accuracy"]
    assert acc["dataset"] == "mnist1d" and acc["metric"] == "accuracy" and acc["n"] == 1000
    assert 0 <= acc["int8"]["accuracy"] <= 1
    assert acc["change"] == pytest.approx(acc["int8"]["accuracy"] - acc["float32"]["accuracy"])
    assert manifest["parity"]["inputs"].startswith("mnist1d test-split sequences")
    assert manifest["model"]["arch"] == arch
    assert manifest["normalization"]["mean"] == pytest.approx(mnist1d.norm_mean)
    # the quantized graphs run in the edge runner and predict like the float ones mostly do
    x = mnist1d.x_test[:64].numpy()
    f32 = load_bundle(out).predict(x, normalized=True).argmax(-1)
    i8 = load_bundle(out, int8=True).predict(x, normalized=True).argmax(-1)
    assert (f32 == i8).mean() >= 0.8
    # a later export without --quantize removes the stale int8 files
    export_bundle(tmp_path / "run" / "last.pt", out, formats="onnx", modes="step",
                  parity_lengths=(1, 8))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model_step.onnx",
                                                     "run.py"]


def test_cli_bench_of_a_checkpoint_without_its_dataset_times_the_export_length(tmp_path,
                                                                                capsys):
    """An imported model's checkpoint records no dataset; --bench used to exit 2 ("no
    training length")."""
    ckpt = tmp_path / "imported.pt"
    save_checkpoint(ckpt, _reduced_model("mean"), step=0)
    assert _cli([str(ckpt), "--out", str(tmp_path / "b"), "--format", "onnx", "--mode",
                 "sequence", "--bench", "--min-time-s", "0.02"]) == 0
    text = capsys.readouterr().out
    assert "timed on 64-token sequences" in text and "latency sequence: p50" in text


def test_cli_export_and_bench_record_latency(exported_lru, tmp_path, capsys):
    _, ckpt, _, _ = exported_lru
    out = tmp_path / "b"
    assert _cli([str(ckpt), "--out", str(out), "--format", "onnx", "--mode", "step",
                 "--opset", "13", "--bench", "--min-time-s", "0.05"]) == 0
    text = capsys.readouterr().out
    assert "model_step.onnx" in text and "latency step: p50" in text
    manifest = verify_bundle(out)
    assert manifest["opset"] == 13 and manifest["modes"] == ["step"]
    assert not (out / "model.onnx").exists() and not (out / "model.ts").exists()
    assert manifest["latency"]["step"]["threads"] == 1
    with pytest.raises(CompressmError, match="opset"):
        _cli([str(ckpt), "--out", str(tmp_path / "c"), "--opset", "7"])


def test_measure_latency_reports_percentiles_and_method(exported_lru, tmp_path):
    bundle = _copy(exported_lru[2], tmp_path)
    for mode, unit in (("sequence", f"per sequence of {SEQ_LEN} tokens"), ("step", "per token")):
        r = measure_latency(bundle, mode, threads=1, min_time_s=0.05, min_repeats=10)
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["n_samples"] >= 10
        assert unit in r["unit"] and "intra_op_num_threads=1" in r["method"]
        assert r["batch"] == 1 and r["threads"] == 1
    with pytest.raises(ExportError, match="mode must be one of"):
        measure_latency(bundle, "batch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # recording rewrites only the manifest: still verifies
        measure_latency(bundle, "step", min_time_s=0.01, record=True)
    assert "step" in verify_bundle(bundle)["latency"]


def test_a_manifest_naming_a_file_outside_the_bundle_is_refused(exported_lru, tmp_path):
    bundle = _copy(exported_lru[2], tmp_path)
    (tmp_path / "outside.onnx").write_bytes((bundle / "model.onnx").read_bytes())

    def escape(m):
        m["files"]["onnx_sequence"]["path"] = "../outside.onnx"

    _edit_manifest(bundle, escape)
    np.save(tmp_path / "x.npy", np.zeros((1, SEQ_LEN, 2)))
    done = _run([bundle / "run.py", "--input", tmp_path / "x.npy"], _blocker(tmp_path), tmp_path)
    assert done.returncode == 2, done.stderr
    assert "'../outside.onnx'" in done.stderr and "refusing" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_to_the_edge_runner_is_one_line(exported_lru, tmp_path, bad):
    """A NaN gave 'class=0, prob=nan' and exit 0."""
    x = np.random.default_rng(0).normal(size=(2, SEQ_LEN, 2))
    x[1, 3, 0] = bad
    np.save(tmp_path / "x.npy", x)
    done = _run([exported_lru[2] / "run.py", "--input", tmp_path / "x.npy"],
                _blocker(tmp_path), tmp_path)
    assert done.returncode == 2
    assert "non-finite value" in done.stderr and "(1, 3, 0)" in done.stderr


def test_a_killed_exports_staging_folder_is_cleaned_by_the_next(exported_lru, tmp_path):
    import os
    import time

    _, ckpt, _, _ = exported_lru
    out = tmp_path / "bundle"
    out.mkdir()
    stale, fresh = out / ".export-killed", out / ".export-running"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"half")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    export_bundle(ckpt, out)
    assert not stale.exists()  # left by a kill hours ago
    assert fresh.exists()  # could be another export at work: left alone
