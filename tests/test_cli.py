"""The ``compressm-tune`` command line: ``train`` end to end and its error handling."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from compressm_tune.cli import main
from compressm_tune.training import load_checkpoint, model_from_checkpoint

TINY = ["--blocks", "1", "--hidden", "8", "--state-dim", "8", "--batch-size", "16",
        "--eval-every", "5", "--no-progress"]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("compressm-tune: error:"), err
    assert "Traceback" not in err
    return lines[0]


def test_train_end_to_end(tmp_path, capsys, mnist1d):
    out = tmp_path / "run"
    code = main(["train", "--dataset", "mnist1d", "--steps", "10", "--seed", "3",
                 "--out", str(out), *TINY])
    assert code == 0
    assert {"best.pt", "last.pt", "summary.json", "metrics.jsonl"} <= {
        p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "mnist1d" and summary["steps"] == 10
    assert summary["final_state_dims"] == [8]
    payload = load_checkpoint(out / "last.pt")
    cfg = payload["model_config"]
    assert (cfg["d_model"], cfg["state_dims"], cfg["d_input"], cfg["d_output"]) == (8, [8], 1, 10)
    assert cfg["pooling"] == "mean" and cfg["dropout"] == 0.1  # classification's default
    assert payload["train_config"]["seed"] == 3 and payload["train_config"]["batch_size"] == 16
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10]
    stdout = capsys.readouterr().out
    assert "| dataset" in stdout and "mnist1d" in stdout and str(out) in stdout
    # the reported test accuracy is the best checkpoint's, recomputed here
    model = model_from_checkpoint(out / "best.pt").eval()
    with torch.no_grad():
        acc = (model(mnist1d.x_test).argmax(-1) == mnist1d.y_test).float().mean().item()
    # (batching may flip a near-tie among 1000 barely-trained predictions: allow two samples)
    assert summary["test_best"]["accuracy"] == pytest.approx(acc, abs=2e-3)


def test_train_regression_uses_per_step_outputs(tmp_path):
    out = tmp_path / "lti"
    assert main(["train", "--dataset", "lti-sysid", "--steps", "4", "--out", str(out),
                 *TINY]) == 0
    cfg = load_checkpoint(out / "last.pt")["model_config"]
    assert cfg["pooling"] == "none" and cfg["d_output"] == 1
    assert cfg["dropout"] == 0.0  # regression trains without dropout unless asked
    assert json.loads((out / "summary.json").read_text())["task"] == "regression"
    assert main(["train", "--dataset", "lti-sysid", "--steps", "2", "--out", str(out / "d"),
                 "--dropout", "0.2", *TINY]) == 0
    assert load_checkpoint(out / "d" / "last.pt")["model_config"]["dropout"] == 0.2


def test_train_user_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 12, 2)).astype(np.float32)
    y = (x[:, :, 0].mean(1) > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    out = tmp_path / "npz-run"
    assert main(["train", "--dataset", "npz", "--data", str(tmp_path / "d.npz"), "--steps", "3",
                 "--out", str(out), *TINY]) == 0
    cfg = load_checkpoint(out / "last.pt")["model_config"]
    assert (cfg["d_input"], cfg["d_output"]) == (2, 2)


def test_resume_flag_continues_a_run(tmp_path):
    out = tmp_path / "r"
    args = ["train", "--dataset", "lti-sysid", "--out", str(out), *TINY]
    assert main([*args, "--steps", "5"]) == 0
    assert main([*args, "--steps", "10", "--resume"]) == 0
    assert load_checkpoint(out / "last.pt")["step"] == 10


@pytest.mark.parametrize("change,needle", [
    (["--hidden", "16"], "d_model"),
    (["--blocks", "2"], "blocks"),
    (["--state-dim", "9"], "state_dims"),
    (["--arch", "selective"], "arch"),
    (["--dataset", "mnist1d"], "dataset lti-sysid (asked mnist1d)"),
])
def test_resume_of_another_run_is_refused_in_one_line(tmp_path, capsys, change, needle):
    """The checkpoint used to win silently over the flags (or a traceback, for another
    dataset): the user learns what differs."""
    out = tmp_path / "r"
    args = ["train", "--dataset", "lti-sysid", "--out", str(out), *TINY]
    assert main([*args, "--steps", "3"]) == 0
    capsys.readouterr()
    assert main([*args, "--steps", "6", "--resume", *change]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--resume" in line and needle in line
    assert load_checkpoint(out / "last.pt")["step"] == 3  # untouched


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    code = main(["train", "--dataset", "lti-sysid", "--out", str(tmp_path / "none"), "--steps",
                 "3", "--resume", *TINY])
    assert code == 2
    assert "no " in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "none" / "last.pt").exists()


@pytest.mark.parametrize("field,value", [("step", "abc"), ("optimizer", {"state": {}})])
def test_a_checkpoint_that_cannot_resume_is_one_line(tmp_path, capsys, field, value):
    import torch

    out = tmp_path / "r"
    args = ["train", "--dataset", "lti-sysid", "--out", str(out), *TINY]
    assert main([*args, "--steps", "3"]) == 0
    payload = load_checkpoint(out / "last.pt")
    payload[field] = value
    torch.save(payload, out / "last.pt")
    capsys.readouterr()
    assert main([*args, "--steps", "6", "--resume"]) == 2
    assert "cannot resume" in _one_error_line(capsys.readouterr().err)


def test_unknown_dataset_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--dataset", "imagenet"])
    assert info.value.code == 2
    assert "invalid choice: 'imagenet'" in capsys.readouterr().err


def test_missing_npz_is_one_error_line(tmp_path, capsys):
    missing = tmp_path / "nowhere.npz"
    code = main(["train", "--dataset", "npz", "--data", str(missing), "--steps", "2",
                 "--out", str(tmp_path / "o"), *TINY])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "nowhere.npz" in line
    assert not (tmp_path / "o" / "last.pt").exists()


def test_npz_without_path_is_one_error_line(tmp_path, capsys):
    assert main(["train", "--dataset", "npz", "--out", str(tmp_path / "o"), *TINY]) == 2
    _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--batch-size", "0"], ["--lr", "-1"],
                                 ["--state-dim", "0"], ["--dropout", "1.5"],
                                 ["--dropout", "-0.1"], ["--warmup", "1.0"]])
def test_invalid_settings_are_one_error_line(tmp_path, capsys, bad, mnist1d):
    code = main(["train", "--dataset", "mnist1d", "--out", str(tmp_path / "o"), *TINY, *bad])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert bad[0].lstrip("-").split("-")[0] in line.replace("_", "-")
    assert not (tmp_path / "o").exists()  # refused before any file is written


def test_non_integer_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--steps", "ten"])
    assert info.value.code == 2


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: compressm-tune" in capsys.readouterr().err


def test_interrupt_exits_130_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from compressm_tune.training import Trainer

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    code = main(["train", "--dataset", "lti-sysid", "--steps", "2", "--out", str(tmp_path),
                 *TINY])
    assert code == 130
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_runs(tmp_path, mnist1d):
    exe = shutil.which("compressm-tune")
    if exe is None:  # pragma: no cover - only when the package is not installed
        pytest.skip("the compressm-tune console script is not on PATH")
    out = tmp_path / "script-run"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # COMPRESSM_CACHE comes from the session
    proc = subprocess.run(
        [exe, "train", "--dataset", "mnist1d", "--steps", "5", "--out", str(out), *TINY],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "best.pt").is_file() and (out / "summary.json").is_file()
    assert "mnist1d" in proc.stdout


# ----------------------------------------------------------------------------- bad input


class _Payload:
    """A class: pickling an instance records a global to import, i.e. code to run."""

    def __reduce__(self):
        return (print, ("this ran",))


def _png(tmp_path):
    path = tmp_path / "picture.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return path


@pytest.mark.parametrize("name,argv,needles", [
    ("infinite budget", lambda t: ["--budget-ms", "inf", "--out", str(t / "o")],
     ["--budget-ms must be > 0 and finite"]),
    ("nan budget", lambda t: ["--budget-ms", "nan", "--out", str(t / "o")], ["finite"]),
    ("journal on a folder", lambda t: ["--budget-ms", "1", "--storage", f"journal:{t}",
                                       "--out", str(t / "o")], ["journal:PATH", "folder"]),
    ("journal without a path", lambda t: ["--budget-ms", "1", "--storage", "journal:",
                                          "--out", str(t / "o")], ["journal:PATH"]),
    ("export a picture", lambda t: ["export", str(_png(t)), "--out", str(t / "b")],
     ["picture.png", "not a torch checkpoint"]),
    ("export a bundle", lambda t: ["export", str(Path(__file__).parent / "data"
                                                / "old_mamba_token_bundle" / "bundle")],
     ["is an exported bundle, not a checkpoint", "run.py --help", "the checkpoint it was"]),
    ("profile a picture", lambda t: ["--budget-ms", "1", "--profile", str(_png(t)),
                                     "--out", str(t / "o")], ["picture.png", "binary"]),
    ("--data without npz", lambda t: ["train", "--dataset", "lti-sysid", "--data", "x.npz",
                                      "--out", str(t / "o")], ["--data", "--dataset npz"]),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, name, argv, needles):
    code = main(argv(tmp_path))
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2, name
    for needle in needles:
        assert needle in line, (needle, line)
    assert "weights_only" not in line and "Traceback" not in line


def test_a_pickle_with_code_is_refused_without_torchs_advice(tmp_path, capsys):
    import torch

    path = tmp_path / "hostile.pt"
    torch.save({"format": "compressm-tune/checkpoint", "payload": _Payload()}, path)
    code = main(["export", str(path), "--out", str(tmp_path / "b")])
    out = capsys.readouterr()
    line = _one_error_line(out.err)
    assert code == 2 and "refusing to unpickle code" in line
    assert "weights_only" not in line and "this ran" not in out.out


def test_a_checkpoint_with_a_string_width_is_one_line(tmp_path, capsys):
    import torch

    out = tmp_path / "r"
    assert main(["train", "--dataset", "lti-sysid", "--steps", "2", "--out", str(out),
                 *TINY]) == 0
    payload = load_checkpoint(out / "last.pt")
    payload["model_config"]["state_dims"] = ["abc"]
    torch.save(payload, out / "bad.pt")
    capsys.readouterr()
    assert main(["export", str(out / "bad.pt"), "--out", str(tmp_path / "b")]) == 2
    assert "does not describe a valid model" in _one_error_line(capsys.readouterr().err)


def test_sigterm_ends_a_run_like_ctrl_c(tmp_path):
    """What schedulers and `docker stop` send: exit 130 with the interrupt line and an intact
    checkpoint, not status 143 with nothing said."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "compressm_tune.cli", "train", "--dataset", "lti-sysid",
         "--steps", "100000", "--out", str(out), *TINY, "--eval-every", "2"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err
    assert load_checkpoint(out / "last.pt")["step"] >= 2


def test_a_reduction_window_without_evaluations_still_attempts_cuts(tmp_path, capsys):
    """--steps 200 --eval-every 100: no evaluation in the 20-step window. The request used to
    be ignored, then the HSV plot crashed on no data; now cuts are attempted inside the window
    (said in a note) and the run reports what it did."""
    out = tmp_path / "r"
    code = main(["train", "--dataset", "lti-sysid", "--steps", "200", "--eval-every", "100",
                 "--reduce", "rank=3", "--schedule", "window", "--max-drop", "inf",
                 "--out", str(out), *TINY[:-3],
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "attempting cuts every 6 steps" in captured.err
    assert load_checkpoint(out / "last.pt")["model_config"]["state_dims"] == [3]
    assert "HSV plot: " in captured.out


def test_a_window_with_no_step_is_refused(tmp_path, capsys):
    code = main(["train", "--dataset", "lti-sysid", "--steps", "5", "--reduce", "tau=0.04",
                 "--out", str(tmp_path / "r"), *TINY])
    assert code == 2 and "holds no step" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv", [
    ["--budget-ms", "1", "--state-dims", "10000000"],
    ["train", "--state-dim", "10000000", "--steps", "2"],
])
def test_a_width_the_machine_cannot_hold_is_refused_before_allocating(tmp_path, capsys, argv):
    """--state-dims 100000 once grew to 22 GB and was killed by the kernel, taking other
    processes with it; a width that cannot fit is refused up front, with the numbers."""
    import time

    t0 = time.perf_counter()
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "needs about" in line and "GiB is available" in line
    assert time.perf_counter() - t0 < 30  # refused, not attempted


# ----------------------------------------------------------------------------- conventions


def test_building_the_parser_imports_nothing_heavy():
    """``--help`` must stay fast: the parser reads the config dataclasses without importing
    torch, optuna, onnx or matplotlib."""
    import sys
    from pathlib import Path

    import compressm_tune

    root = str(Path(compressm_tune.__file__).resolve().parents[1])  # this tree's package
    code = ("import sys; from compressm_tune.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'torch','optuna','onnx','onnxruntime','matplotlib'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": root}, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout


@pytest.mark.parametrize("where", ["compressm_tune.models:SSMConfig",
                                   "compressm_tune.training:TrainConfig",
                                   "compressm_tune.reduction:ReduceConfig",
                                   "compressm_tune.hardware:ProfilerConfig",
                                   "compressm_tune.search:TuneConfig",
                                   "compressm_tune.search:CompressConfig"])
def test_flags_read_the_same_fields_the_dataclasses_have(where):
    """What ``_flags`` reads from the source equals the imported dataclass: names, defaults
    (where the flag has one) and metadata."""
    import dataclasses
    import importlib

    from compressm_tune.cli._flags import _UNKNOWN, fields_of

    module, name = where.split(":")
    real = {f.name: f for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
    read = fields_of(where)
    assert list(read) == list(real)
    for key, f in read.items():
        assert f.meta == dict(real[key].metadata), key
        if f.default is not _UNKNOWN and real[key].default is not dataclasses.MISSING:
            assert f.default == real[key].default, key
        if "help" in f.meta and f.meta.get("cli", True) and f.default is _UNKNOWN:
            assert key in ("budget_ms",), f"{key}: a flag needs a literal default"


def test_shared_run_settings_are_declared_once_and_their_defaults_may_change():
    """TrainConfig and TuneConfig inherit seed/threads/device/precision/cuda_graphs/batch_size/
    mamba2_scan from RunSettings; TuneConfig's own defaults (one thread, batch 32) keep the
    shared help, in the dataclass and in what the flag reader reads; compress's fine-tune
    declares mamba2_scan with the same metadata."""
    import ast
    import dataclasses

    from compressm_tune.cli._flags import fields_of
    from compressm_tune.search import TuneConfig
    from compressm_tune.training import RunSettings, TrainConfig

    shared = [f.name for f in dataclasses.fields(RunSettings)]
    assert shared == ["seed", "threads", "device", "precision", "cuda_graphs", "batch_size",
                      "mamba2_scan"]
    tune = fields_of("compressm_tune.search:TuneConfig")
    train = fields_of("compressm_tune.training:TrainConfig")
    for name in shared:
        assert tune[name].meta == train[name].meta == dict(RunSettings.__dataclass_fields__[
            name].metadata), name
    compress = fields_of("compressm_tune.search:CompressConfig")["mamba2_scan"]
    assert compress.meta == train["mamba2_scan"].meta and compress.default == "ssd"
    assert (tune["threads"].default, tune["batch_size"].default) == (1, 32)
    assert (train["threads"].default, train["batch_size"].default) == (None, 64)
    assert TuneConfig(budget="0.4x").threads == 1 and TrainConfig().threads is None
    for cls in (TrainConfig, TuneConfig):  # no shared field is written out again
        source = ast.parse(Path(inspect.getsourcefile(cls)).read_text())
        body = next(n for n in source.body if isinstance(n, ast.ClassDef) and n.name
                    == cls.__name__).body
        for node in body:
            if isinstance(node, ast.AnnAssign) and node.target.id in shared:
                assert not isinstance(node.value, ast.Call), (cls.__name__, node.target.id)


def test_choices_come_from_their_modules():
    from compressm_tune._device import PRECISIONS
    from compressm_tune.cli._flags import constant
    from compressm_tune.data import DATASETS
    from compressm_tune.models import ARCHS

    assert constant("compressm_tune.models:ARCHS") == ARCHS
    assert constant("compressm_tune.data:DATASETS") == DATASETS
    assert constant("compressm_tune._device:PRECISIONS") == PRECISIONS


def test_version(capsys):
    from compressm_tune import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and __version__ in capsys.readouterr().out


def test_flags_keep_their_names_and_defaults():
    from compressm_tune.cli import build_parser

    args = build_parser().parse_args(["train"])
    assert (args.arch, args.blocks, args.d_model, args.state_dim, args.dropout) == (
        "lru", 4, 64, 256, None)
    assert (args.steps, args.lr, args.warmup_frac, args.device, args.cuda_graphs) == (
        1500, 3e-3, 0.1, "auto", True)
    assert (args.window, args.every, args.max_drop, args.moments, args.schedule) == (
        0.1, None, 0.02, "reset", "adaptive")
    args = build_parser().parse_args(["--budget-ms", "2", "--state-dims", "8,16",
                                      "--no-drift-check", "--data", "d.npz"])
    assert (args.budget_ms, args.state_dims, args.drift_check, args.data_path) == (
        2.0, (8, 16), False, "d.npz")
    assert build_parser().parse_args([]).state_dims == (256,)  # trials start at the full width
    args = build_parser().parse_args(["--budget", "0.4x", "--no-baseline"])
    assert (args.budget, args.budget_ms, args.baseline) == ("0.4x", None, False)
    assert build_parser().parse_args(["-q", "profile"]).quiet  # before the sub-command
    assert build_parser().parse_args(["profile", "--quiet"]).quiet  # and after it


def test_a_missed_budget_exits_3(monkeypatch, capsys, tmp_path):
    from compressm_tune import search
    from compressm_tune.errors import BudgetMissedError

    def missed(config, progress=True):
        raise BudgetMissedError("no trial met the budget")

    monkeypatch.setattr(search, "run_tune", missed)
    argv = ["--budget-ms", "1", "--out", str(tmp_path / "o")]
    assert main(argv) == 3
    assert "no trial met the budget" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "report.md").write_text("# report\n")
    monkeypatch.setattr(search, "run_tune", lambda config, progress=True: {"meets_budget": False})
    assert main(argv) == 3
    with pytest.raises(BudgetMissedError):  # --debug: the traceback instead of one line
        monkeypatch.setattr(search, "run_tune", missed)
        main([*argv, "--debug"])


def test_quiet_hides_the_job_s_progress_bar_and_verbose_shows_it(tmp_path, monkeypatch):
    """``-q`` reaches the search as ``progress=False`` (and Optuna's own logging at WARNING);
    without it, or with ``-v``, the bar is shown."""
    import optuna

    import compressm_tune.search as search

    asked = []
    monkeypatch.setattr(search, "run_tune", lambda config, progress=True: asked.append(
        (progress, optuna.logging.get_verbosity())) or {"finalized": False})
    before = optuna.logging.get_verbosity()
    try:
        for flags in (["-q"], ["-v"], []):
            optuna.logging.set_verbosity(optuna.logging.INFO)
            assert main([*flags, "--budget", "0.4x", "--out", str(tmp_path / "run")]) == 0
    finally:
        optuna.logging.set_verbosity(before)
    assert asked == [(False, optuna.logging.WARNING), (True, optuna.logging.INFO),
                     (True, optuna.logging.INFO)]


@pytest.mark.parametrize("scan", ["ssd", "fused"])
def test_the_job_trains_mamba2_on_the_scan_it_is_told(tmp_path, monkeypatch, scan):
    """``--mamba2-scan`` reaches the training settings every trial and reference is built
    from (``TuneConfig.train_config``; the Trainer sets each Mamba-2 layer's scan from it)."""
    import compressm_tune.search as search

    asked = []
    monkeypatch.setattr(search, "run_tune", lambda config, progress=True: asked.append(
        config) or {"finalized": False})
    argv = ["-q", "--budget", "0.4x", "--arch", "mamba2", "--out", str(tmp_path / "run")]
    assert main([*argv, "--mamba2-scan", scan]) == 0
    assert asked[0].train_config(lr=1e-3).mamba2_scan == scan  # as trials call it
    with pytest.raises(SystemExit):  # a scan that does not exist: argparse's exit 2
        main([*argv, "--mamba2-scan", "triton"])


@pytest.mark.parametrize("progress", [False, True])
def test_run_trials_draws_optuna_s_progress_bar_only_when_asked(tmp_path, capsys, progress):
    import optuna

    from compressm_tune.search._study import run_trials

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    run_trials(study, lambda trial: trial.suggest_float("x", 0.0, 1.0), 2, progress=progress)
    err = capsys.readouterr().err
    assert ("2/2" in err) is progress, err
