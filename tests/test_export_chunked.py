"""Chunked sequence graphs (issue 12): parity with eager torch around every chunk boundary, the
measured choice recorded in the manifest, and bundles whose manifest and graph disagree.

The reference is always the model's own PyTorch forward (its C scan kernel), never the
exporter's arithmetic.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_export import REPO, _blocker, _checkpoint, _edit_manifest, _reduced_model, _run

from compressm_tune.errors import ExportError
from compressm_tune.exporter import (
    build_sequence_model,
    build_step_model,
    export_bundle,
    extract_weights,
    load_bundle,
    script_model,
    verify_bundle,
)
from compressm_tune.exporter._edge import sha256_file
from compressm_tune.exporter._parity import stream_onnx
from compressm_tune.models import SSMConfig, SSMModel

TRAIN_LEN = 40  # _checkpoint's seq_len


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _lengths(chunk: int) -> list[int]:
    """1, 7, T-1, T, T+1, the training length and 4 training lengths + 3."""
    return sorted({n for n in (1, 7, chunk - 1, chunk, chunk + 1, TRAIN_LEN, 4 * TRAIN_LEN + 3)
                   if n >= 1})


def _mamba_model(pooling: str) -> SSMModel:
    """Two Mamba blocks, the first cut to 5 of its 12 states (kept out of order), every
    parameter perturbed so no structured init hides a mismatch."""
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(arch="mamba", d_input=2, d_output=3, d_model=8,
                               state_dims=[12, 6], pooling=pooling))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.blocks[0].ssm.keep_states(torch.tensor([7, 0, 3, 11, 5]))
    assert model.state_dims == [5, 6]
    return model.eval()


def _model(arch: str, pooling: str) -> SSMModel:
    return _mamba_model(pooling) if arch == "mamba" else _reduced_model(pooling, arch=arch)


@pytest.mark.parametrize("arch", ["lru", "selective", "mamba"])
@pytest.mark.parametrize("pooling", ["mean", "none"])
@pytest.mark.parametrize("chunk", [1, 4, 16])  # LRU, 1: the carries take the Scan over > G chunks
def test_chunked_onnx_and_torchscript_match_eager_torch(arch, pooling, chunk):
    model = _model(arch, pooling)  # unequal widths, after real cuts
    w = extract_weights(model)
    sequence = _session(build_sequence_model(w, chunk=chunk))
    scripted = script_model(w, chunk)
    g = torch.Generator().manual_seed(chunk)
    for batch in (1, 3):
        for length in _lengths(chunk):
            x = torch.randn(batch, length, 2, generator=g)
            with torch.no_grad():
                want = model(x)
                got_ts = scripted(x)
            got = sequence.run(None, {"x": x.numpy()})[0]
            assert got.shape == tuple(want.shape), (batch, length)
            assert np.abs(got - want.numpy()).max() <= 1e-4, (batch, length)
            assert (got_ts - want).abs().max() <= 1e-4, (batch, length)


@pytest.mark.parametrize("arch", ["lru", "selective", "mamba"])
def test_streaming_equals_the_chunked_sequence_graph(arch):
    model = _model(arch, "none")
    w = extract_weights(model)
    x = torch.randn(3, 37, 2, generator=torch.Generator().manual_seed(3)).numpy()
    sequence = _session(build_sequence_model(w, chunk=8)).run(None, {"x": x})[0]
    state = [s.numpy() for s in model.allocate_state(3)]
    streamed = stream_onnx(_session(build_step_model(w)), x, state)  # (B, L, d_out)
    assert np.abs(streamed - sequence).max() <= 1e-4


def test_chunked_graph_holds_no_loop_outside_the_carry_branch():
    """A sequence of at most T tokens runs no loop: the only Scan sits in the If branch taken
    when there is more than one chunk (and there only past G chunks)."""
    w = extract_weights(_reduced_model("mean"))
    graph = build_sequence_model(w, chunk=16).graph
    ops = [n.op_type for n in graph.node]
    assert "Scan" not in ops and "Loop" not in ops and ops.count("If") == 2
    meta = {p.key: p.value for p in build_sequence_model(w, chunk=16).metadata_props}
    assert meta["compressm.chunk"] == "16"


def test_export_records_the_measured_choice_and_every_engine_uses_it(tmp_path):
    model = _reduced_model("mean")
    ckpt = _checkpoint(tmp_path / "m.pt", model)
    manifest = export_bundle(ckpt, tmp_path / "b", parity_lengths=(1, 15, 16, 17, 163))
    graph = manifest["sequence_graph"]
    timings = graph["timings"]["median_ms"]
    assert graph["chosen_by"] == "measured at export" and "scan" in timings and len(timings) > 1
    label = "scan" if graph["chunk"] is None else str(graph["chunk"])
    assert timings[label] == min(timings.values())
    meta = onnx.load(str(tmp_path / "b" / "model.onnx")).metadata_props
    assert {p.key: p.value for p in meta}["compressm.chunk"] == label
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.jit.load(str(tmp_path / "b" / "model.ts")).chunk == (graph["chunk"] or 0)
    given = export_bundle(ckpt, tmp_path / "g", chunk=8)
    assert given["sequence_graph"] == {"variant": "chunked", "chunk": 8, "chosen_by": "given"}
    assert given["parity"]["max_abs_error"] <= 1e-4
    assert given["parity"]["lengths"] == [1, 7, 8, 9, 40, 2000]  # around the chunk boundary
    verify_bundle(tmp_path / "g")


@pytest.fixture(scope="module")
def chunked_bundle(tmp_path_factory):
    """An LRU bundle with a chunked (T=8) sequence graph and its int8 twin."""
    root = tmp_path_factory.mktemp("chunked")
    model = _reduced_model("mean")
    export_bundle(_checkpoint(root / "m.pt", model), root / "b", chunk=8, quantize="int8",
                  parity_lengths=(1, 9, 40))
    return model, root / "b"


def _copy(bundle, tmp_path):
    import shutil

    return shutil.copytree(bundle, tmp_path / "copy")


@pytest.mark.parametrize("chunk", [16, None, "8", -3, True])
def test_manifest_chunk_that_does_not_match_the_graph_is_refused(chunked_bundle, tmp_path,
                                                                  chunk):
    bundle = _copy(chunked_bundle[1], tmp_path)

    def edit(m):
        m["sequence_graph"]["chunk"] = chunk

    _edit_manifest(bundle, edit)
    with pytest.raises(ExportError, match="re-export"):
        load_bundle(bundle, modes=("sequence",))
    with pytest.raises(ExportError, match="re-export"):
        verify_bundle(bundle)
    np.save(tmp_path / "x.npy", np.zeros((1, 5, 2), np.float32))
    done = _run([REPO / "export" / "run.py", bundle, "--input", tmp_path / "x.npy"],
                _blocker(tmp_path), tmp_path)
    assert done.returncode == 2 and "re-export" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_int8_chunked_graph_keeps_its_chunk_and_loads(chunked_bundle):
    _, bundle = chunked_bundle
    load_bundle(bundle, int8=True, modes=("sequence",))  # its metadata says chunk 8 too
    model = onnx.load(str(bundle / "model.int8.onnx"))
    assert {p.key: p.value for p in model.metadata_props}["compressm.chunk"] == "8"
    # the recurrence's constants (powers of lambda) stay float32: still plain MatMuls
    decays = [n for n in model.graph.node if n.name.startswith("recurrence_decay")]
    assert [n.op_type for n in decays] == ["MatMul", "MatMul"]
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in model.graph.node)


def test_bundle_written_before_chunking_still_runs(chunked_bundle, tmp_path):
    """An old bundle: per-token Scan graph without the chunk metadata, manifest without
    ``sequence_graph``; and a chunked graph under such a manifest is refused."""
    model, source = chunked_bundle
    bundle = _copy(source, tmp_path)
    old = build_sequence_model(extract_weights(model))  # the per-token Scan graph
    del old.metadata_props[:]
    onnx.helper.set_model_props(old, {"compressm.mode": "sequence", "compressm.arch": "lru",
                                      "compressm.state_dims": "5,6",
                                      "compressm.pooling": "mean"})
    (bundle / "model.onnx").write_bytes(old.SerializeToString())

    def make_old(m):
        del m["sequence_graph"]
        m["files"]["onnx_sequence"]["sha256"] = sha256_file(bundle / "model.onnx")
        for key in ("torchscript", "onnx_sequence_int8", "onnx_step_int8"):
            del m["files"][key]

    _edit_manifest(bundle, make_old)
    x = torch.randn(2, 40, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(x).numpy()
    raw = x.numpy() * np.array([2.0, 0.25], np.float32) + np.array([0.5, -2.0], np.float32)
    np.save(tmp_path / "raw.npy", raw)
    done = _run([REPO / "export" / "run.py", bundle, "--input", tmp_path / "raw.npy",
                 "--output", tmp_path / "y.npy"], _blocker(tmp_path), tmp_path)
    assert done.returncode == 0, done.stderr
    assert np.abs(np.load(tmp_path / "y.npy") - want).max() <= 1e-4
    # the chunked graph under the old manifest: refused in one line
    (bundle / "model.onnx").write_bytes((source / "model.onnx").read_bytes())
    _edit_manifest(bundle, lambda m: m["files"]["onnx_sequence"].update(
        sha256=sha256_file(bundle / "model.onnx")))
    done = _run([REPO / "export" / "run.py", bundle, "--input", tmp_path / "raw.npy"],
                _blocker(tmp_path), tmp_path)
    assert done.returncode == 2 and "chunked (T=8)" in done.stderr and "re-export" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("chunk", [0, -2, "eight", 2.5])
def test_bad_chunk_option_is_one_clear_error(tmp_path, chunk):
    with pytest.raises(ExportError, match="chunk must be") as info:
        export_bundle(tmp_path / "missing.pt", tmp_path / "b", chunk=chunk)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_selective_chunked_graph_loops_over_chunks_not_tokens(tmp_path):
    model = _reduced_model("mean", arch="selective")
    w = extract_weights(model)
    graph = build_sequence_model(w, chunk=16).graph
    scans = [n for n in graph.node if n.op_type == "Scan"]
    assert len(scans) == 2 and "Loop" not in [n.op_type for n in graph.node]
    x = np.zeros((1, 40, 2), np.float32)  # 40 tokens: 3 iterations of the chunk Scan
    body_inputs = [i.name for i in scans[0].attribute[0].g.input]
    assert len(body_inputs) == 5  # state + delta, du, B_t, C_t of one chunk
    manifest = export_bundle(_checkpoint(tmp_path / "s.pt", model), tmp_path / "a",
                             formats="onnx", modes="sequence", parity_lengths=(1, 16, 17, 163))
    assert manifest["parity"]["max_abs_error"] <= 1e-4
    assert _session(build_sequence_model(w, chunk=16)).run(None, {"x": x})[0].shape == (1, 3)


def test_cli_export_chunk_option(tmp_path, capsys):
    from compressm_tune.cli import main

    ckpt = _checkpoint(tmp_path / "m.pt", _reduced_model("mean"))
    assert main(["export", str(ckpt), "--out", str(tmp_path / "b"), "--chunk", "4"]) == 0
    assert "sequence graph: chunked (T=4), given" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())[
        "sequence_graph"]["chunk"] == 4
    assert main(["export", str(ckpt), "--out", str(tmp_path / "c"), "--chunk", "big"]) == 2
    err = capsys.readouterr().err
    assert "--chunk must be auto, scan or an integer" in err and "Traceback" not in err


def test_profiler_runtime_times_the_graph_an_export_would_choose():
    """The profiler's onnxruntime runner picks the sequence graph as an export does (timed at
    the inputs' length), and it still equals eager torch."""
    from compressm_tune.exporter import onnxruntime_functions
    from compressm_tune.hardware import prepare_runtime

    model = _reduced_model("mean")
    x = torch.randn(2, 40, 2, generator=torch.Generator().manual_seed(6))
    forward, _ = onnxruntime_functions(model, chunk="auto", seq_len=40)
    with torch.no_grad():
        assert (forward(x) - model(x)).abs().max() <= 1e-4
        runner = prepare_runtime("onnxruntime", model, [x], (x[:1, 0], model.allocate_state(1)))
        assert (runner.forward(x) - model(x)).abs().max() <= 1e-4
    with pytest.raises(ExportError, match="give seq_len"):
        onnxruntime_functions(model, chunk="auto")
