"""Mamba-2 graphs: the per-token Scan, the chunked (SSD) sequence graph and the step graph, in
ONNX and TorchScript, against eager torch (the model's own forward, on the S6 kernels) and
against ``transformers``' ``Mamba2ForCausalLM`` (its forward and its cache after a prefill).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compressm_tune.exporter import (
    build_sequence_model,
    build_step_model,
    export_bundle,
    extract_weights,
    script_model,
)
from compressm_tune.exporter._edge import EdgeBundle
from compressm_tune.exporter._parity import stream_onnx, stream_torchscript
from compressm_tune.models import SSMConfig, SSMModel
from compressm_tune.training import save_checkpoint

VOCAB = 13


def _session(proto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _model(tokens: bool, pooling: str = "none") -> SSMModel:
    """Two Mamba-2 blocks (4 heads in 2 groups, a step-size clamp), every parameter perturbed,
    the first cut to 4 of its 6 states."""
    torch.manual_seed(0)
    io = {"vocab_size": VOCAB, "d_output": VOCAB} if tokens else {"d_input": 2, "d_output": 3}
    model = SSMModel(SSMConfig(arch="mamba2", d_model=8, state_dims=[6, 5], head_dim=4,
                               n_groups=2, dt_limit=[0.01, 2.0], pooling=pooling, **io))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.blocks[0].ssm.keep_states(torch.tensor([0, 2, 3, 5]))
    assert model.state_dims == [4, 5]
    return model.eval()


def _inputs(tokens: bool, batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(VOCAB, (batch, length), generator=g) if tokens
            else torch.randn(batch, length, 2, generator=g))


@pytest.mark.parametrize("tokens", [False, True], ids=["features", "tokens"])
@pytest.mark.parametrize("chunk", [None, 4])
def test_sequence_and_step_graphs_match_eager_torch(tokens, chunk):
    model = _model(tokens, pooling="none" if tokens else "mean")
    w = extract_weights(model)
    sequence, scripted = _session(build_sequence_model(w, chunk=chunk)), script_model(w, chunk)
    name = sequence.get_inputs()[0].name
    assert name == ("input_ids" if tokens else "x")
    lengths = (1, 3, 4, 5, 14) if chunk else (1, 9)
    for length in lengths:  # around the chunk boundary: T-1, T, T+1 and 3T+2
        x = _inputs(tokens, 2, length, length)
        with torch.no_grad():
            want = model(x)
            got_ts = scripted(x)
        got = sequence.run(None, {name: x.numpy()})[0]
        assert np.abs(got - want.numpy()).max() <= 1e-4, length
        assert float((got_ts - want).abs().max()) <= 1e-4, length
    x = _inputs(tokens, 2, 7, 0)
    with torch.no_grad():
        want = model(x).numpy()
        got_ts = stream_torchscript(scripted, x)
    got = stream_onnx(_session(build_step_model(w)), x.numpy())  # from zero states
    last = (lambda y: y[:, -1]) if model.config.pooling == "mean" else (lambda y: y)
    assert np.abs(last(got) - want).max() <= 1e-4
    assert np.abs(last(got_ts.numpy()) - want).max() <= 1e-4


def _hf(**overrides):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    kw = {"vocab_size": VOCAB, "hidden_size": 16, "state_size": 8, "num_hidden_layers": 2,
          "num_heads": 4, "head_dim": 8, "n_groups": 2, "chunk_size": 8} | overrides
    model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_chunked_graph_and_step_cache_match_transformers():
    """The chunked graph gives transformers' logits (several lengths, chunk boundaries); the
    step graph streamed over a prompt leaves in ``present_conv_state.{i}`` (the last d_conv
    conv inputs of x, B and C) and ``present_ssm_state.{i}`` ``(batch, heads, head_dim, N)``
    what transformers' cache holds after a prefill."""
    from compressm_tune.models import from_hf_mamba2

    hf = _hf(time_step_limit=(0.01, 0.5))
    w = extract_weights(from_hf_mamba2(hf))
    sequence = _session(build_sequence_model(w, chunk=8))
    for length in (7, 8, 9, 26):
        ids = _inputs(True, 2, length, length)
        with torch.no_grad():
            want = hf(ids).logits.numpy()
        assert np.abs(sequence.run(None, {"input_ids": ids.numpy()})[0] - want).max() <= 1e-4
    step = _session(build_step_model(w))
    ids = _inputs(True, 2, 9, 3)
    with torch.no_grad():
        out = hf(ids, use_cache=True)
    names = [i.name for i in step.get_inputs()]
    states = [np.zeros([2 if isinstance(d, str) else d for d in i.shape], np.float32)
              for i in step.get_inputs()[1:]]
    for t in range(ids.shape[1]):
        logits, *states = step.run(None, dict(zip(names, [ids[:, t].numpy(), *states],
                                                  strict=True)))
    got = dict(zip([o.name for o in step.get_outputs()][1:], states, strict=True))
    assert np.abs(logits - out.logits[:, -1].numpy()).max() <= 1e-4
    for i, layer in enumerate(out.cache.layers):
        conv, ssm = layer.conv_states[0].numpy(), layer.recurrent_states[0].numpy()
        assert got[f"present_conv_state.{i}"].shape == conv.shape == (2, 32 + 2 * 2 * 8, 4)
        assert got[f"present_ssm_state.{i}"].shape == ssm.shape == (2, 4, 8, 8)
        assert np.abs(got[f"present_conv_state.{i}"] - conv).max() <= 1e-5
        assert np.abs(got[f"present_ssm_state.{i}"] - ssm).max() <= 1e-4


def test_token_bundle_of_a_mamba2_model(tmp_path):
    """A Mamba-2 token checkpoint exports (``--chunk auto`` timing the Scan against the chunked
    graphs) to a bundle with transformers' names, whose runner gives torch's logits."""
    model = _model(tokens=True)
    save_checkpoint(tmp_path / "m.pt", model, step=1, dataset={  # no loader rebuilds it
        "name": "toy-ids", "task": "classification", "d_input": VOCAB, "seq_len": 20,
        "norm_mean": [0.0] * VOCAB, "norm_std": [1.0] * VOCAB, "info": {}})
    manifest = export_bundle(tmp_path / "m.pt", tmp_path / "b", formats="onnx",
                             parity_lengths=(1, 9, 20))
    assert manifest["model"]["arch"] == "mamba2" and manifest["parity"]["max_abs_error"] <= 1e-4
    assert manifest["sequence_graph"]["chosen_by"] == "measured at export"
    assert set(manifest["sequence_graph"]["timings"]["median_ms"]) == {"scan", "8", "16", "20"}
    states = manifest["io"]["step"]["states"]
    assert [s["input"] for s in states] == ["past_conv_state.0", "past_ssm_state.0",
                                            "past_conv_state.1", "past_ssm_state.1"]
    assert [s["shape"] for s in states][:2] == [["batch", 16 + 2 * 2 * 4, 4],
                                                ["batch", 4, 4, 4]]
    ids = _inputs(True, 2, 11, 7).numpy()
    with torch.no_grad():
        want = model(torch.as_tensor(ids)).numpy()
    edge = EdgeBundle(tmp_path / "b")
    assert np.abs(edge.predict(ids) - want).max() <= 1e-4
    assert np.abs(edge.streamer(2).run(ids) - want).max() <= 1e-4


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_onnxruntime_functions_keep_the_torch_state_layout(arch):
    """The profiler's onnxruntime stand-in takes and returns ``allocate_state``'s one tensor
    per block, though a token model's step graph holds transformers' cache tensors."""
    from compressm_tune.exporter import onnxruntime_functions

    if arch == "mamba2":
        model = _model(tokens=True)
    else:
        torch.manual_seed(1)
        model = SSMModel(SSMConfig(arch="mamba", vocab_size=VOCAB, d_output=VOCAB, d_model=8,
                                   state_dims=[3, 5], pooling="none")).eval()
    forward, step = onnxruntime_functions(model)
    ids = _inputs(True, 2, 6, 1)
    with torch.no_grad():
        assert float((forward(ids) - model(ids)).abs().max()) <= 1e-4
        state = want_state = model.allocate_state(2)
        for t in range(ids.shape[1]):
            y, state = step(ids[:, t], state)
            want, want_state = model.step(ids[:, t], want_state)
            assert float((y - want).abs().max()) <= 1e-4
    assert [s.shape for s in state] == [s.shape for s in want_state]
    assert max(float((a - b).abs().max()) for a, b in zip(state, want_state, strict=True)) <= 1e-4
