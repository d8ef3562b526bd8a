"""A real (small, quick) profile of this machine through the CLI commands, its latency model,
and ``compare`` on two real profiles (eager torch and TorchScript)."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from compressm_tune.cli import build_parser
from compressm_tune.cli.profile import config_from_args
from compressm_tune.errors import ConfigError
from compressm_tune.hardware import (
    Drift,
    LatencyModel,
    Profile,
    check_drift,
    load_profile,
    measure_models,
    reference_widths,
    save_profile,
)

# Leave-one-out tolerance on the real quick profile: the mean absolute error of predicting each
# interior width's latency from the others. The quick settings time sub-millisecond calls in
# 20 ms per model and round, and this machine runs in slow and fast spells lasting seconds
# (the same model 0.42 then 0.69 ms, thread CPU time alike): five quick profiles taken back to
# back on an idle machine gave p50 errors of 4-29 % (once 35 % in CI) but errors of 4-10 % on
# each model's fastest call; yet a CI-like run with other jobs on the machine saw 22 % on the
# fastest calls (one width +53 %). Both bounds therefore only catch a broken fit (a width's
# cost off by a factor, not by a spell); bench_results/profiler_accuracy.md measures the
# accuracy itself, interleaved and repeated, as a benchmark should.
HOLDOUT_MEAN_TOLERANCE = {"latency_min_ms": 0.40, "latency_ms": 0.60}
# Median error of predicting measured mixed-width models of 1-4 blocks from the quick profile,
# loose for the same reason. Wall-clock latency gets the loosest bound: on a loaded machine a
# long call waits for a core more often than a short one, which time on a core
# (latency_cpu_ms) does not count. A composition bug that breaks the scaling with the block
# count (widths averaged instead of summed, per-block costs off by a factor of the profiled
# block count) is off by 50 % or more on the multi-block models, beyond every bound here.
# Training steps are not judged here: their wall clock (forward, backward and AdamW of a
# few-millisecond step) moved by 27-63 % in both directions between the profile and the check
# in one CI run, and uniformly by 0.66x in another; the composition itself is the same code
# for every metric and is checked exactly on train_step_ms in test_hardware.py.
MIXED_MEDIAN_TOLERANCE = {"latency_ms": 0.45, "latency_cpu_ms": 0.40}

QUICK_MIN_TIME_S = 0.1
QUICK = ["--device", "cpu", "--widths", "4,8,...,128", "--hidden", "32", "--blocks", "2",
         "--seq-len", "64", "--batch", "4", "--throughput-batch", "8", "--threads", "1",
         "--min-time-s", str(QUICK_MIN_TIME_S), "--warmup", "2", "--rounds", "5", "--quiet"]


def _parser() -> argparse.ArgumentParser:
    return build_parser()


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings of the TorchScript runtime
        return args.func(args)


@pytest.fixture(scope="module")
def quick_profile(tmp_path_factory) -> tuple[Path, Profile]:
    path = tmp_path_factory.mktemp("profiles") / "quick.json"
    assert _run(["profile", *QUICK, "--note", "pytest quick profile", "--out", str(path)]) == 0
    return path, load_profile(path)


def test_cli_parses_into_the_config_dataclass() -> None:
    args = _parser().parse_args(["profile", "--widths", "8,16,...,64", "--blocks", "3"])
    config = config_from_args(args)
    assert config.widths == (8, 16, 32, 64) and config.blocks == 3
    assert config.hidden == 64 and config.runtime == "torch"  # dataclass defaults kept
    with pytest.raises(ConfigError, match="hidden must be an integer >= 1"):
        config_from_args(_parser().parse_args(["profile", "--hidden", "0"]))
    args = _parser().parse_args(["compare", "a.json", "b.json"])
    assert args.func.__module__ == "compressm_tune.cli.compare"


def test_quick_profile_records_everything(quick_profile) -> None:
    _, profile = quick_profile
    assert profile.widths == [4, 8, 16, 32, 64, 128]
    assert profile.config.threads == profile.device.torch_threads == 1
    assert profile.config.extra_blocks == (1, 4)  # the default: 1 and 2K blocks
    assert [(r.blocks, r.state_dim) for r in profile.extra_records] == [
        (k, w) for k in (1, 4) for w in profile.widths]
    assert "pytest quick profile" in profile.notes
    for record in profile.all_records:
        assert record.latency.repeats >= 5 and record.latency.total_s >= QUICK_MIN_TIME_S
        assert record.latency.p50_ms <= record.latency.p90_ms <= record.latency.p99_ms
        # one thread on a CPU: each call's time on a core, never above its wall-clock time
        # (+ the few microseconds of reading the clocks), so neither is any order statistic
        cpu, wall = record.latency_cpu, record.latency
        assert cpu is not None and cpu.repeats == wall.repeats and cpu.min_ms > 0
        assert cpu.min_ms <= wall.min_ms + 0.02 and cpu.p50_ms <= wall.p50_ms + 0.02
        assert record.step.p50_ms > 0 and record.train_step.p50_ms > 0
        assert record.throughput_samples_per_s > 0 and record.param_mb > 0
        assert record.energy_mj is not None and record.energy_mj > 0
    params = [r.param_mb for r in profile.records]
    assert params == sorted(params)  # more state, more parameters


def test_quick_profile_energy_is_labelled(quick_profile) -> None:
    _, profile = quick_profile
    assert profile.energy_method in ("rapl", "estimate_cpu_time")
    assert {r.energy_method for r in profile.records} == {profile.energy_method}
    if profile.is_energy_estimate:
        assert any("energy figures are estimates" in note for note in profile.notes)
    if not torch.cuda.is_available():
        assert any("no CUDA device found" in n for n in profile.notes) or \
            profile.config.device == "cpu"


def test_latency_model_predicts_held_out_widths_of_a_real_profile(quick_profile) -> None:
    _, profile = quick_profile
    model = LatencyModel.from_profile(profile)
    for metric, tolerance in HOLDOUT_MEAN_TOLERANCE.items():
        holdout = model.holdout_error(metric)
        assert holdout.widths == (8, 16, 32, 64)
        assert holdout.mean_abs_rel_error <= tolerance, holdout
    mixed = model.predict([128, 4, 32])
    assert model.predict([4, 4, 32]) < mixed < model.predict([128, 128, 128]) * 1.5


def test_latency_model_predicts_measured_mixed_width_models(quick_profile) -> None:
    """Compose per-block costs into models the profile never measured, and measure them."""
    _, profile = quick_profile
    combos = [[128, 4, 32], [8], [64, 16, 4, 128], [24, 100]]
    # The machine's speed moves between the profile and now (a whole suite runs in between;
    # seen 1.7x in CI) and within minutes (the same model 0.42 then 0.69 ms): re-time the
    # profile's own reference models interleaved with the new ones, in the same rounds, and
    # rescale each metric by their ratio, as Drift does. A uniform rescale cannot hide a
    # composition bug, which errs differently at 1, 2, 3 and 4 blocks.
    refs = reference_widths(profile)
    K = profile.config.blocks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shared-machine notes
        records = measure_models([*combos, *[[w] * K for w in refs]], profile.config,
                                 progress=False)
    records, ref_records = records[: len(combos)], records[len(combos):]
    by_width = {r.state_dim: r for r in profile.records}
    now = {m: Drift(m, refs, tuple(by_width[w].metric(m) for w in refs),
                    tuple(r.metric(m) for r in ref_records)).scale
           for m in MIXED_MEDIAN_TOLERANCE}
    for metric, tolerance in MIXED_MEDIAN_TOLERANCE.items():
        model = LatencyModel.from_profile(profile, scale=now[metric])
        errors = [model.predict(dims, metric) / r.metric(metric) - 1
                  for dims, r in zip(combos, records, strict=True)]
        assert np.median(np.abs(errors)) <= tolerance, (metric, errors)


def test_compare_two_real_profiles(quick_profile, tmp_path: Path, capsys) -> None:
    torch_path, _ = quick_profile
    script_path = tmp_path / "script.json"
    quick_script = ["--device", "cpu", "--runtime", "torchscript", "--widths", "4,32",
                    "--hidden", "16", "--seq-len", "16", "--batch", "2", "--throughput-batch",
                    "4", "--threads", "1", "--min-time-s", "0.02", "--warmup", "1",
                    "--rounds", "1", "--extra-blocks", "1", "--quiet"]
    assert _run(["profile", *quick_script, "--out", str(script_path)]) == 0
    script = load_profile(script_path)
    assert "torchscript" in script.timing_method
    assert [r.state_dims for r in script.extra_records] == [(4,), (32,)]  # --extra-blocks 1
    capsys.readouterr()
    plot, markdown = tmp_path / "cmp.png", tmp_path / "cmp.md"
    assert _run(["compare", str(torch_path), str(script_path), "--plot", str(plot),
                 "--markdown", str(markdown)]) == 0
    out = capsys.readouterr().out
    assert "[torch]" in out and "[torchscript]" in out and "steps up at" in out
    # H=32, L=64 vs H=16, L=16: the ratios are not about the devices, and the table says so
    assert "measured different things" in out and "H=16, L=16" in out
    assert markdown.read_text() == out
    assert plot.read_bytes()[:4] == b"\x89PNG"
    before = set(Path.cwd().iterdir())
    assert _run(["compare", str(torch_path), str(script_path)]) == 0
    assert set(Path.cwd().iterdir()) == before  # no compare.png in the working directory


def _slowed(profile: Profile, factor: float) -> Profile:
    """The profile as if measured on a machine ``factor`` times slower (latency fields)."""
    data = json.loads(json.dumps(profile.to_dict()))  # tuples as lists, as from_dict reads
    for record in data["records"] + data["extra_records"]:
        record["latency"] = {k: v * factor if k.endswith("_ms") else v
                             for k, v in record["latency"].items()}
    return Profile.from_dict(data)


def test_drift_check_sees_a_machine_that_changed_since_its_profile(quick_profile) -> None:
    """A profile whose latencies are 10x looks like a machine now 10x faster: the check
    re-measures its reference models and must report about 0.1. The factor is large because
    on a shared 2-core machine the same models ran 2x slower minutes apart (seen in CI)."""
    _, profile = quick_profile
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shared-machine notes
        drift = check_drift(_slowed(profile, 10.0), rounds=3)
    assert drift.widths == reference_widths(profile) and len(drift.widths) == 3
    assert 0.03 < drift.scale < 0.4, drift
    scaled = LatencyModel.from_profile(profile, scale=drift.scale)
    plain = LatencyModel.from_profile(profile)
    assert scaled.predict([8, 64]) == pytest.approx(drift.scale * plain.predict([8, 64]))
    assert scaled.predict([8, 64], "peak_mem_mb") == plain.predict([8, 64], "peak_mem_mb")


def test_cli_drift_check(quick_profile, tmp_path: Path, capsys) -> None:
    path, profile = quick_profile
    slowed = tmp_path / "slowed.json"
    save_profile(_slowed(profile, 10.0), slowed)  # far beyond a slow spell (seen 1.7x)
    capsys.readouterr()
    assert _run(["profile", "--check", str(slowed), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "latency_ms now / profile" in out and "faster than when profiled" in out


def test_drift_check_rejects_widths_or_metrics_the_profile_lacks(quick_profile) -> None:
    _, profile = quick_profile
    with pytest.raises(ConfigError, match="profiled widths"):
        check_drift(profile, widths=[5])
    with pytest.raises(ConfigError, match="time metric"):
        check_drift(profile, metric="peak_mem_mb")


def test_cli_drift_check_refuses_another_machine_in_one_line(quick_profile, tmp_path) -> None:
    from compressm_tune.cli import main

    path, profile = quick_profile
    data = json.loads(json.dumps(profile.to_dict()))
    data["device"]["cpu_model"] = "Some Other CPU 9000"
    foreign = tmp_path / "foreign.json"
    save_profile(Profile.from_dict(data), foreign)
    assert main(["profile", "--check", str(foreign), "--quiet"]) == 2


@pytest.mark.parametrize("content", ["{not json", '{"schema": "something else"}', ""])
def test_cli_drift_check_of_a_bad_file_is_one_line(tmp_path, capsys, content) -> None:
    from compressm_tune.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert main(["profile", "--check", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compressm-tune: error:")
    assert bad.read_text() == content  # read, never rewritten


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_latency_model_rejects_a_bad_scale(quick_profile, scale) -> None:
    _, profile = quick_profile
    with pytest.raises(ValueError, match="scale must be a positive finite factor"):
        LatencyModel.from_profile(profile, scale=scale)


@pytest.mark.parametrize("value", [-0.5, 0.0, 1e308])
def test_a_profile_with_impossible_latencies_is_refused_in_one_line(quick_profile, tmp_path,
                                                                    value) -> None:
    """Zero, negative or astronomically large times were never measured: refused on load,
    before a search runs to its end on them or the latency model's fit fails on them."""
    from compressm_tune.errors import ProfileError

    data = json.loads(quick_profile[0].read_text())
    data["records"][1]["latency"]["p50_ms"] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=r"latency_ms must be > 0 and < 1e\+07 ms") as err:
        load_profile(bad)
    assert len(str(err.value).splitlines()) == 1


def test_profile_without_out_never_overwrites_a_profile(quick_profile, tmp_path, monkeypatch):
    """It used to write profiles/<device>.json, replacing the committed profile of the
    machine; now each run writes a new, time-stamped file."""
    from compressm_tune import hardware

    _, profile = quick_profile
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hardware, "profile_device", lambda *a, **k: profile)
    committed = tmp_path / "profiles" / f"{profile.device.slug}.json"
    committed.parent.mkdir()
    committed.write_text("the committed profile")
    assert _run(["profile", "--device", "cpu", "--quiet"]) == 0
    assert committed.read_text() == "the committed profile"
    written = [p for p in committed.parent.iterdir() if p != committed]
    assert len(written) == 1 and load_profile(written[0]).widths == profile.widths
