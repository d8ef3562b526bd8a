"""``from_hf_mamba``: a ``transformers`` Mamba-1 model imported into an SSMModel.

The reference is ``transformers``' own forward on CPU (its slow torch path: no mamba_ssm or
causal_conv1d kernels here), on models built from a ``MambaConfig`` with random weights
(every parameter perturbed, so no structured init can hide a mismatch). Nothing is downloaded.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from compressm_tune.errors import ConfigError  # noqa: E402
from compressm_tune.exporter import (  # noqa: E402
    build_sequence_model,
    build_step_model,
    export_bundle,
    extract_weights,
    run_parity,
    script_model,
)
from compressm_tune.models import from_hf_mamba  # noqa: E402
from compressm_tune.reduction import (  # noqa: E402
    layer_inputs,  # noqa: E402
    reduce_layer,
    state_scores,
)

VOCAB = 40


def _hf(cls=None, seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=16,
                                      num_hidden_layers=2, **overrides)
    model = (cls or transformers.MambaForCausalLM)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _ids(batch=2, length=23, seed=1):
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides", [
    {},
    {"use_bias": True, "use_conv_bias": False, "expand": 3, "time_step_rank": 5,
     "conv_kernel": 3, "layer_norm_epsilon": 1e-3, "tie_word_embeddings": False},
], ids=["defaults", "variant"])
def test_logits_match_transformers(overrides):
    hf = _hf(**overrides)
    model = from_hf_mamba(hf)
    ids = _ids()
    with torch.no_grad():
        want = hf(ids).logits
        got = model(ids)
    assert got.shape == want.shape == (2, 23, VOCAB)
    assert float((got - want).abs().max()) <= 1e-4
    assert model.config.pooling == "none" and model.config.vocab_size == VOCAB
    assert model.state_dims == [16, 16]


def test_mamba_model_gives_the_last_hidden_states():
    hf = _hf(transformers.MambaModel)
    ids = _ids()
    with torch.no_grad():
        want = hf(ids).last_hidden_state
        got = from_hf_mamba(hf)(ids)
    assert float((got - want).abs().max()) <= 1e-4


def test_local_directory_and_bad_input(tmp_path):
    hf = _hf()
    hf.save_pretrained(tmp_path / "m")
    ids = _ids()
    with torch.no_grad():
        assert float((from_hf_mamba(tmp_path / "m")(ids) - hf(ids).logits).abs().max()) <= 1e-4
    with pytest.raises(ConfigError, match="no config.json"):
        from_hf_mamba(tmp_path / "missing")
    with pytest.raises(ConfigError, match="MambaForCausalLM or MambaModel"):
        from_hf_mamba(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="hidden_act"):
        from_hf_mamba(_hf(hidden_act="gelu"))


def test_imported_model_trains_reduces_and_exports():
    model = from_hf_mamba(_hf()).train()
    ids = _ids(batch=4, length=32, seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):  # next-token prediction on a fixed batch: the loss must fall
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]
    model.eval()

    layer = model.blocks[0].ssm
    u = layer_inputs(model, ids)[0]  # what the first mixer receives, (4, 32, 32)
    scores = state_scores(layer, u)
    # reference: the full layer with the dropped states never driven (their B rows zeroed)
    keep = np.sort(np.argsort(-scores)[:6])
    silenced = copy.deepcopy(layer)
    with torch.no_grad():
        silenced.s6.B_proj[np.setdiff1d(np.arange(16), keep)] = 0.0
        want = silenced(u)
    assert reduce_layer(layer, 6, scores=scores).tolist() == keep.tolist()
    assert model.state_dims == [6, 16]
    with torch.no_grad():
        torch.testing.assert_close(layer(u), want, rtol=1e-5, atol=1e-5)

    import onnxruntime as ort

    w = extract_weights(model)

    def session(proto):
        return ort.InferenceSession(proto.SerializeToString(),
                                    providers=["CPUExecutionProvider"])

    report = run_parity(model, onnx_sequence=session(build_sequence_model(w)),
                        onnx_step=session(build_step_model(w)), torchscript=script_model(w),
                        lengths=(1, 12), batches=(1, 2))
    assert report["max_abs_error"] <= 1e-4 and report["inputs"].startswith("token ids")


def test_imported_model_exports_a_bundle_matching_transformers(tmp_path):
    """The checkpoint of an imported model exports to a token bundle whose torch-free runner
    gives ``transformers``' own logits, whole-sequence and token by token."""
    from compressm_tune.exporter._edge import EdgeBundle
    from compressm_tune.training import save_checkpoint

    hf = _hf()
    save_checkpoint(tmp_path / "hf.pt", from_hf_mamba(hf))
    manifest = export_bundle(tmp_path / "hf.pt", tmp_path / "b", formats="onnx",
                             parity_lengths=(1, 20))
    assert manifest["input"]["vocab_size"] == VOCAB
    ids = _ids(2, 15, seed=2)
    with torch.no_grad():
        want = hf(ids).logits.numpy()
    edge = EdgeBundle(tmp_path / "b")
    assert np.abs(edge.predict(ids.numpy()) - want).max() <= 1e-4
    assert np.abs(edge.streamer(2).run(ids.numpy()) - want).max() <= 1e-4


def _session(proto):
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("chunk", [4, 16])
def test_chunked_graphs_match_transformers(chunk):
    """The chunked sequence graph (ONNX and TorchScript) of an imported model gives
    transformers' logits around the chunk boundaries (T-1, T, T+1, 3T+2)."""
    hf = _hf()
    w = extract_weights(from_hf_mamba(hf))
    sequence, scripted = _session(build_sequence_model(w, chunk=chunk)), script_model(w, chunk)
    for length in (chunk - 1, chunk, chunk + 1, 3 * chunk + 2):
        ids = _ids(2, length, seed=length)
        with torch.no_grad():
            want = hf(ids).logits
            got_ts = scripted(ids)
        got = sequence.run(None, {"input_ids": ids.numpy()})[0]
        assert np.abs(got - want.numpy()).max() <= 1e-4, length
        assert float((got_ts - want).abs().max()) <= 1e-4, length


def test_step_graph_cache_equals_transformers_cache_after_prefill():
    """Streaming a prompt through the step graph leaves in ``present_conv_state.{i}`` and
    ``present_ssm_state.{i}`` what transformers' cache holds after a prefill of that prompt
    (the last d_conv conv inputs, the SSM state), and the last logits agree."""
    hf = _hf(conv_kernel=3)
    w = extract_weights(from_hf_mamba(hf))
    step = _session(build_step_model(w))
    ids = _ids(2, 9, seed=4)
    with torch.no_grad():
        out = hf(ids, use_cache=True)
    cache = out.cache
    names = [o.name for o in step.get_outputs()]
    states = [np.zeros([2 if isinstance(d, str) else d for d in i.shape], np.float32)
              for i in step.get_inputs()[1:]]
    for t in range(ids.shape[1]):
        logits, *states = step.run(None, dict(zip(
            [i.name for i in step.get_inputs()], [ids[:, t].numpy(), *states], strict=True)))
    got = dict(zip(names[1:], states, strict=True))
    assert np.abs(logits - out.logits[:, -1].numpy()).max() <= 1e-4
    for i, layer in enumerate(cache.layers):
        conv, ssm = layer.conv_states[0].numpy(), layer.recurrent_states[0].numpy()
        assert got[f"present_conv_state.{i}"].shape == conv.shape == (2, 64, 3)
        assert got[f"present_ssm_state.{i}"].shape == ssm.shape == (2, 64, 16)
        assert np.abs(got[f"present_conv_state.{i}"] - conv).max() <= 1e-5
        assert np.abs(got[f"present_ssm_state.{i}"] - ssm).max() <= 1e-4
