"""Hugging Face folders out and back in, post-training reduction, and ``compressm-tune compress``.

References: ``transformers``' own ``from_pretrained`` and forward (CPU, its torch path) for a
folder we write; the in-memory model for a folder read back; the uncut model's logits for what
a cut loses. Models are built from a ``MambaConfig`` with random weights, every parameter
perturbed. Nothing is downloaded.
"""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from compressm_tune.cli import main  # noqa: E402
from compressm_tune.errors import ConfigError, OutputError, ReductionError  # noqa: E402
from compressm_tune.models import (  # noqa: E402
    from_hf_folder,
    from_hf_mamba,
    from_hf_mamba2,
    save_hf_folder,
)
from compressm_tune.reduction import (  # noqa: E402
    compress_pretrained,
    layer_scores,
    plan_widths,
    widths_for_budget,
)
from compressm_tune.search import CompressConfig, load_token_data  # noqa: E402

VOCAB = 40


def _hf(seed=0, arch="mamba"):
    torch.manual_seed(seed)
    if arch == "mamba":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(
            vocab_size=VOCAB, hidden_size=32, state_size=16, num_hidden_layers=2))
    else:  # heads in groups, biases everywhere: every tensor of the layout is exercised
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            vocab_size=VOCAB, hidden_size=32, state_size=16, num_hidden_layers=2, num_heads=4,
            head_dim=16, n_groups=2, use_bias=True))
    model = model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _ids(batch=4, length=24, seed=1, high=VOCAB):
    return torch.randint(high, (batch, length), generator=torch.Generator().manual_seed(seed))


_CAUSAL = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    folders = {arch: tmp_path_factory.mktemp("hf") / arch for arch in _CAUSAL}
    for arch, folder in folders.items():
        _hf(arch=arch).save_pretrained(folder)
    return folders


@pytest.fixture(scope="module")
def hf_dir(hf_dirs):
    return hf_dirs["mamba"]


@pytest.fixture(params=list(_CAUSAL))
def arch_dir(request, hf_dirs):
    return request.param, hf_dirs[request.param]


def test_a_transformers_folder_reads_without_transformers_as_it_computes(arch_dir):
    arch, hf_dir = arch_dir
    hf = getattr(transformers, _CAUSAL[arch]).from_pretrained(hf_dir,
                                                             local_files_only=True).eval()
    x = _ids()
    with torch.no_grad():
        ours, theirs = from_hf_folder(hf_dir)(x), hf(x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_round_trip_folder_compress_folder_gives_the_compressed_models_logits(arch_dir, tmp_path):
    arch, hf_dir = arch_dir
    model = from_hf_folder(hf_dir)
    result = compress_pretrained(model, _ids(8, seed=2), widths=[5, 11])
    assert result["state_dims_after"] == model.state_dims == [5, 11]
    save_hf_folder(model, tmp_path / "cut")
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert config["state_sizes"] == [5, 11] and config["model_type"] == arch
    back = from_hf_folder(tmp_path / "cut")
    assert back.state_dims == [5, 11]
    x = _ids(3, 31, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=0)


def test_a_uniform_folder_loads_in_transformers_with_the_same_logits(arch_dir, tmp_path):
    arch, hf_dir = arch_dir
    model = from_hf_folder(hf_dir)
    compress_pretrained(model, _ids(8, seed=2), keep=6)
    save_hf_folder(model, tmp_path / "cut")
    hf = getattr(transformers, _CAUSAL[arch]).from_pretrained(tmp_path / "cut",
                                                             local_files_only=True).eval()
    assert hf.config.state_size == 6
    x = _ids(2, 29, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)
    # and the transformers-based importer agrees with ours on our folder
    importer = from_hf_mamba if arch == "mamba" else from_hf_mamba2
    with torch.no_grad():
        torch.testing.assert_close(importer(hf)(x), model(x), atol=1e-5, rtol=0)


def test_a_folder_is_replaced_whole_but_never_over_a_users_files(hf_dir, tmp_path):
    model = from_hf_folder(hf_dir)
    save_hf_folder(model, tmp_path / "out")
    compress_pretrained(model, _ids(8), keep=3)
    save_hf_folder(model, tmp_path / "out")  # an earlier output of ours: replaced
    assert from_hf_folder(tmp_path / "out").state_dims == [3, 3]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="holds other files"):
        save_hf_folder(model, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]  # no debris


def _distortion(cut, full, x):
    with torch.no_grad():
        return float((cut(x) - full(x)).square().mean())


@pytest.mark.parametrize("arch,margin", [("mamba", 0.8), ("mamba2", 1.0)])
def test_the_data_scored_cut_loses_less_than_random_cuts_of_equal_width(arch, margin):
    """The method's claim on calibration data: keeping the states the data scores highest
    changes the output on more text of that kind less than keeping as many chosen at random
    (every one of 5 seeds; Mamba-1 by a margin). The SSM path is strengthened (out_proj x10,
    Mamba-1's x_proj x3) so that the states carry a visible share of the output, as in a
    trained model."""
    hf = _hf(arch=arch)
    with torch.no_grad():
        for layer in hf.backbone.layers:
            layer.mixer.out_proj.weight.mul_(10)
            if arch == "mamba":
                layer.mixer.x_proj.weight.mul_(3)
    importer = from_hf_mamba if arch == "mamba" else from_hf_mamba2
    full = importer(hf)
    calib, held = _ids(16, 32, seed=5), _ids(16, 32, seed=6)
    ours = importer(hf)
    compress_pretrained(ours, calib, keep=4)
    mine = _distortion(ours, full, held)
    for seed in range(5):
        rand = importer(hf)
        compress_pretrained(rand, calib, keep=4, select="random", seed=seed)
        assert mine < margin * _distortion(rand, full, held)


def test_widths_for_a_budget_are_the_smallest_tau_that_fits():
    rng = np.random.default_rng(0)
    scores = [np.sort(rng.random(16))[::-1] ** 4, np.sort(rng.random(16))[::-1]]
    widths, tau = widths_for_budget(scores, sum, 12)
    assert sum(widths) <= 12
    looser = plan_widths(scores, tau=tau * 0.98)
    assert sum(looser) > 12  # a slightly smaller tau would not fit
    assert widths[0] < widths[1]  # the steeper spectrum gives up more states
    with pytest.raises(ReductionError, match="even one state"):
        widths_for_budget(scores, sum, 1)


def test_magnitude_scores_are_data_free_and_per_state(arch_dir):
    model = from_hf_folder(arch_dir[1])
    a, b = layer_scores(model, None, "magnitude"), layer_scores(model, _ids(), "magnitude")
    assert [len(s) for s in a] == [16, 16]
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    layer = model.blocks[0].ssm
    before = a[0].copy()
    with torch.no_grad():  # a state whose B rows are zero has no magnitude
        (layer.bc_proj[0, :, 3] if arch_dir[0] == "mamba2" else layer.s6.B_proj[3]).zero_()
    after = layer_scores(model, None, "magnitude")[0]
    assert after[3] == 0 and np.array_equal(np.delete(after, 3), np.delete(before, 3))


def _token_file(path, n=60, length=33, seed=0):
    ids = np.random.default_rng(seed).integers(0, VOCAB, (n, length))
    np.save(path, ids)
    return path


def test_cli_compress_writes_a_folder_our_importer_reads_back(arch_dir, tmp_path, capsys):
    data = _token_file(tmp_path / "ids.npy")
    out = tmp_path / "out"
    code = main(["compress", str(arch_dir[1]), "--data", str(data), "--keep", "4", "--out",
                 str(out), "--calibration", "8", "--finetune-steps", "3", "--batch-size", "4",
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "after the cut" in printed and "after 3 fine-tune steps" in printed
    summary = json.loads((out / "compress_summary.json").read_text())
    assert summary["before"]["state_dims"] == [16, 16]
    assert summary["after_cut"]["state_dims"] == summary["state_dims"] == [4, 4]
    model = from_hf_folder(out)
    assert model.state_dims == [4, 4]
    # the summary's last figure is the folder's model, evaluated again on the same split
    ds = load_token_data(str(data), VOCAB, 0)
    from compressm_tune.training import evaluate

    bits = evaluate(model, ds.x_test, ds.y_test, "classification", bits_name="b")["b"]
    assert bits == pytest.approx(summary["after_finetune"]["bits_per_token"], abs=1e-5)


@pytest.mark.parametrize("scan", ["ssd", "fused"])
def test_cli_compress_finetunes_mamba2_on_the_scan_it_is_told(hf_dirs, tmp_path, capsys,
                                                             monkeypatch, scan):
    """``compress --mamba2-scan``: every training forward of the fine-tune (the ones that
    build a graph; scoring and evaluation run without one) takes the chosen scan only."""
    from compressm_tune.models import mamba2

    calls = {"ssd": 0, "fused": 0}

    def counted(fn, key):
        def wrapper(*args, **kwargs):
            calls[key] += torch.is_grad_enabled()
            return fn(*args, **kwargs)
        return wrapper

    for name, key in (("ssd_scan", "ssd"), ("scan_readout", "fused")):
        monkeypatch.setattr(mamba2, name, counted(getattr(mamba2, name), key))
    data = _token_file(tmp_path / "ids.npy")
    code = main(["compress", str(hf_dirs["mamba2"]), "--data", str(data), "--keep", "4",
                 "--out", str(tmp_path / "out"), "--calibration", "8", "--finetune-steps", "3",
                 "--batch-size", "4", "--mamba2-scan", scan, "--no-progress"])
    assert code == 0, capsys.readouterr().err
    other = "fused" if scan == "ssd" else "ssd"
    assert calls[scan] >= 3 * 2 and calls[other] == 0, calls  # 3 steps x 2 layers
    settings = json.loads((tmp_path / "out" / "compress_summary.json").read_text())["settings"]
    assert settings["mamba2_scan"] == scan
    with pytest.raises(ConfigError, match="--mamba2-scan must be one of ssd, fused"):
        CompressConfig(model=str(hf_dirs["mamba2"]), out="x", keep=4, mamba2_scan="triton")


@pytest.mark.parametrize("args,needle", [
    (["--keep", "0"], "--keep must be >= 1"),
    (["--keep", "17"], "above the widest layer"),
    (["--keep", "4", "--tau", "0.1"], "exactly one of"),
    ([], "exactly one of"),
    (["--tau", "1.5"], "--tau must satisfy"),
    (["--budget", "2x"], "relative budget"),
    (["--keep", "4", "--data", "missing.npy"], "no such file"),
    (["--keep", "4", "--finetune-reduce", "tau=0.1"], "--finetune-steps >= 2"),
    (["--keep", "4", "--finetune-steps", "2", "--distill", "1.5"], "--distill must be in [0, 1]"),
])
def test_cli_compress_refuses_bad_settings_in_one_line(hf_dir, tmp_path, capsys, args, needle,
                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["compress", str(hf_dir), *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def mamba_profile(tmp_path_factory):
    """A profile at the shape of ``hf_dir``'s model whose batch-1 latencies are set to a known
    line, ``0.2 + blocks * (0.01 + 0.02 * width)`` ms, and whose device is another machine's:
    widths under a budget then follow from the arithmetic, not from this machine's load (a
    profile of another machine is not drift-checked)."""
    from compressm_tune.hardware import ProfilerConfig, profile_device, save_profile

    profile = profile_device(ProfilerConfig(
        device="cpu", runtime="torch", arch="mamba", widths=(1, 16), extra_blocks=(1,),
        hidden=32, blocks=2, seq_len=32, batch=1, throughput_batch=1, d_input=VOCAB,
        d_output=VOCAB, min_time_s=0.001, rounds=1, min_repeats=1, warmup=0, threads=1),
        progress=False)
    path = save_profile(profile, tmp_path_factory.mktemp("prof") / "mamba.json")
    raw = json.loads(path.read_text())
    raw["device"]["cpu_model"] = "Synthetic Test CPU"
    for record in raw["records"] + raw["extra_records"]:
        dims = record["state_dims"]
        ms = 0.2 + len(dims) * (0.01 + 0.02 * dims[0])
        record["latency"].update(p50_ms=ms, p90_ms=ms, p99_ms=ms, mean_ms=ms, min_ms=ms,
                                 iqr_ms=0.0)
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.filterwarnings("ignore::UserWarning")  # the synthetic profile's other metrics
@pytest.mark.parametrize("flag", ["--budget", "--budget-ms"])
def test_cli_compress_to_a_latency_budget_cuts_to_the_widths_that_fit(hf_dir, tmp_path, capsys,
                                                                      mamba_profile, flag):
    from compressm_tune.hardware import LatencyModel, load_profile

    data = _token_file(tmp_path / "ids.npy")
    predict = LatencyModel.from_profile(load_profile(mamba_profile)).predict
    assert predict([16, 16]) == pytest.approx(0.2 + 2 * (0.01 + 0.02 * 16), rel=1e-6)
    value = "0.6x" if flag == "--budget" else f"{0.6 * predict([16, 16]):.6g}"
    code = main(["compress", str(hf_dir), "--data", str(data), flag, value, "--profile",
                 str(mamba_profile), "--calibration", "8", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert "budget" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "compress_summary.json").read_text())
    b, dims = summary["budget"], summary["state_dims"]
    assert from_hf_folder(tmp_path / "out").state_dims == dims and sum(dims) < 32
    assert b["predicted_ms"] <= b["budget_ms"] < b["predicted_full_ms"]
    assert b["budget_ms"] == pytest.approx(0.6 * predict([16, 16]), rel=1e-5)
    assert b["predicted_ms"] == pytest.approx(predict(dims), rel=1e-6)
    scores = layer_scores(from_hf_folder(hf_dir), load_token_data(str(data), VOCAB, 0)
                          .x_train[:8])
    assert dims == widths_for_budget(scores, predict, b["budget_ms"])[0]


def test_export_takes_a_compressed_folder(hf_dir, tmp_path, capsys):
    model = from_hf_folder(hf_dir)
    compress_pretrained(model, _ids(8, seed=2), widths=[5, 11])
    save_hf_folder(model, tmp_path / "cut")
    code = main(["export", str(tmp_path / "cut"), "--format", "torchscript", "--chunk", "scan",
                 "--out", str(tmp_path / "bundle")])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["model"]["state_dims"] == [5, 11]
    assert manifest["parity"]["max_abs_error"] < 1e-4
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["config.json",
                                                                    "model.safetensors"]


@pytest.mark.parametrize("module", ["compressm_tune.models.hf_folder",
                                    "compressm_tune.exporter._weights",
                                    "compressm_tune.reduction._pretrained"])
def test_docstring_examples_run(module):
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0
