"""Bad input, command by command: one line on stderr, exit 2, nothing of the user's changed.

Each case is one a user met (or could meet) that once gave a traceback, a silent wrong answer
or a damaged file. Add the next class of bad input here when you fix it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compressm_tune.exporter import export_bundle
from compressm_tune.models import SSMConfig, SSMModel
from compressm_tune.training import save_checkpoint

SEQ_LEN = 16


def _one_line_error(done: subprocess.CompletedProcess, prog: str) -> str:
    """The error line, after checking the contract: exit 2, one line, no traceback."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A small exported classifier (1 input channel, 3 classes)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bad-input")
    model = SSMModel(SSMConfig(d_input=1, d_output=3, d_model=8, state_dims=[6])).eval()
    ckpt = root / "model.pt"
    save_checkpoint(ckpt, model, step=1, dataset={
        "name": "synthetic", "task": "classification", "d_input": 1, "d_output": 3,
        "seq_len": SEQ_LEN, "norm_mean": [0.0], "norm_std": [1.0], "info": {}})
    export_bundle(ckpt, root / "bundle", formats=("onnx",))
    return root / "bundle"


def _run_py(bundle: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(bundle / "run.py"), str(bundle), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_run_py_refuses_an_empty_batch(bundle, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((0, SEQ_LEN, 1), np.float32))
    line = _one_line_error(_run_py(bundle, "--input", "x.npy", cwd=tmp_path), "run.py")
    assert "batch >= 1" in line and "(0, 16, 1)" in line


def test_run_py_refuses_complex_input(bundle, tmp_path):
    """float32 would silently drop the imaginary parts."""
    np.save(tmp_path / "x.npy", np.ones((2, SEQ_LEN, 1), np.complex64))
    line = _one_line_error(_run_py(bundle, "--input", "x.npy", cwd=tmp_path), "run.py")
    assert "real numbers" in line and "complex64" in line


def test_run_py_refuses_input_the_model_overflows_on(bundle, tmp_path):
    np.save(tmp_path / "x.npy", np.full((2, SEQ_LEN, 1), 1e38, np.float32))
    line = _one_line_error(_run_py(bundle, "--input", "x.npy", "--output", "y.npy",
                                   cwd=tmp_path), "run.py")
    assert "not finite" in line and "1e+38" in line
    assert not (tmp_path / "y.npy").exists()  # no output file for a refused input


def test_run_py_bench_refuses_a_zero_length(bundle, tmp_path):
    line = _one_line_error(_run_py(bundle, "--bench", "--seq-len", "0", cwd=tmp_path),
                           "run.py")
    assert "--seq-len" in line


@pytest.mark.parametrize("output", ["missing/y.npy", "folder", "y.txt"])
def test_run_py_refuses_an_output_it_cannot_write_before_running(bundle, tmp_path, output):
    (tmp_path / "folder").mkdir()
    np.save(tmp_path / "x.npy", np.zeros((1, SEQ_LEN, 1), np.float32))
    done = _run_py(bundle, "--input", "x.npy", "--output", output, cwd=tmp_path)
    line = _one_line_error(done, "run.py")
    assert "--output" in line
    assert done.stdout == ""  # refused before any result was printed


def test_run_py_refuses_a_model_file_that_is_not_onnx(bundle, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in bundle.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    junk = b"not a protobuf"
    (broken / "model.onnx").write_bytes(junk)
    manifest = json.loads((broken / "manifest.json").read_text())
    for entry in manifest["files"].values():  # a manifest that vouches for the junk
        if entry["path"] == "model.onnx":
            entry["sha256"] = hashlib.sha256(junk).hexdigest()
    (broken / "manifest.json").write_text(json.dumps(manifest))
    np.save(tmp_path / "x.npy", np.zeros((1, SEQ_LEN, 1), np.float32))
    line = _one_line_error(_run_py(broken, "--input", "x.npy", cwd=tmp_path), "run.py")
    assert "cannot load" in line and "model.onnx" in line


class _RunsCode:
    """Unpickling this calls a function: what a hostile weights file carries."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_from_hf_mamba_refuses_a_weights_file_that_holds_code(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from compressm_tune.errors import CheckpointError
    from compressm_tune.models import from_hf_mamba

    hf = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=32, hidden_size=8, state_size=4, num_hidden_layers=1))
    hf.save_pretrained(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    torch.save({"backbone.embeddings.weight": _RunsCode()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="could run code") as info:
        from_hf_mamba(tmp_path)
    assert "weights_only=False" not in str(info.value)
    assert "this must never run" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- a full disk
# ``ulimit -f`` stands in for a full disk: the kernel refuses writes past the limit (Python
# ignores SIGXFSZ, so the write fails with EFBIG), in CI as on any POSIX machine.

CLI = "import sys; from compressm_tune.cli import main; sys.exit(main())"


def _cli_limited(args: list[str], cwd: Path, limit_bytes: int) -> subprocess.CompletedProcess:
    resource = pytest.importorskip("resource")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-c", CLI, *args], cwd=cwd, preexec_fn=limit,
                          capture_output=True, text=True, timeout=300)


def _tiny_npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.standard_normal((800, 12, 1)).astype(np.float32),
             y=rng.integers(0, 2, 800))
    return path


def test_train_into_a_full_disk_is_one_line(tmp_path):
    data = _tiny_npz(tmp_path / "d.npz")
    done = _cli_limited(["train", "--dataset", "npz", "--data", str(data), "--blocks", "1",
                         "--hidden", "8", "--state-dim", "8", "--steps", "4", "--eval-every",
                         "2", "--no-progress", "--out", "run"], tmp_path, 16 * 1024)
    line = _one_line_error(done, "compressm-tune")
    assert "cannot write" in line and "file size limit" in line
    assert not list((tmp_path / "run").glob(".*.tmp"))  # no torn temporary files left


def test_export_into_a_full_disk_is_one_line_and_leaves_nothing(bundle, tmp_path):
    ckpt = bundle.parent / "model.pt"
    done = _cli_limited(["export", str(ckpt), "--out", "b"], tmp_path, 64 * 1024)
    line = _one_line_error(done, "compressm-tune")
    assert "the bundle" in line and "file size limit" in line
    assert not (tmp_path / "b").exists()


PROFILE = Path(__file__).resolve().parent.parent / "profiles" / "cpu-amd-epyc-2c.json"
JOB = ["-q", "--budget", "0.8x", "--trials", "1", "--steps", "10", "--no-baseline", "--profile",
       str(PROFILE), "--no-drift-check", "--out", "run"]
# an absolute budget: no calibration's exports (a relative budget's largest files, right after
# the study's storage is created) before the trials, so the disk can fill at each later stage
JOB_MS = [*JOB[:1], "--budget-ms", "10", *JOB[3:]]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("job,limit_kib,needle,rerun", [
    pytest.param(JOB, 150, "full-untrained", False, id="calibration"),  # study.db fits: 112 KiB
    pytest.param(JOB_MS, 32, "study storage", False, id="storage"),
    pytest.param(JOB_MS, 150, "best.pt", True, marks=pytest.mark.slow, id="trial-checkpoint"),
    pytest.param(JOB_MS, 500, "the bundle", True, marks=pytest.mark.slow, id="bundle"),
])
def test_the_budgeted_job_on_a_full_disk_is_one_line_and_resumes(tmp_path, job, limit_kib,
                                                                 needle, rerun):
    """Wherever the disk fills (a relative budget's calibration, the study's storage, a
    trial's checkpoint, the exported bundle), the job ends in one line with exit 2, the
    profile it read is unchanged, and the same command finishes the job once there is room."""
    profile = _sha(PROFILE)
    done = _cli_limited(job, tmp_path, limit_kib * 1024)
    line = _one_line_error(done, "compressm-tune")
    assert needle in line, line
    assert _sha(PROFILE) == profile
    if rerun:  # the rerun is the slow part; the earlier stages resume the same way
        again = _cli(job, tmp_path)
        assert again.returncode == 0, again.stderr
        assert json.loads((tmp_path / "run" / "summary.json").read_text())["meets_budget"]


# ----------------------------------------------------------------------------- train


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


TINY = ["--blocks", "1", "--hidden", "8", "--state-dim", "8", "--steps", "6", "--eval-every",
        "3", "--no-progress"]


def test_a_second_run_into_a_busy_folder_is_refused_and_changes_nothing(tmp_path):
    from compressm_tune._io import FolderLock

    data = _tiny_npz(tmp_path / "d.npz")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')  # the live run's log so far
    held = FolderLock(run)
    assert held.acquire()
    try:
        done = _cli(["train", "--dataset", "npz", "--data", str(data), *TINY, "--out", "run"],
                    tmp_path)
    finally:
        held.release()
    line = _one_line_error(done, "compressm-tune")
    assert "another run" in line and "run" in line
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert not (run / "last.pt").exists()


def test_a_dead_runs_lock_does_not_block_the_next(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from compressm_tune._io import FolderLock; "
         f"lock = FolderLock({str(tmp_path)!r}); assert lock.acquire(); "
         "print('locked', flush=True); "
         "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # an event, not a sleep
        from compressm_tune._io import FolderLock

        assert not FolderLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = FolderLock(tmp_path)
    assert lock.acquire()
    lock.release()


@pytest.mark.parametrize("flags,needle", [
    (["--lr", "inf"], "lr=inf"),
    (["--weight-decay", "inf"], "weight_decay=inf"),
    (["--ssm-lr-factor", "inf"], "ssm_lr_factor=inf"),
    (["--reduce", "tau=0.1", "--max-drop", "nan"], "--max-drop"),
    (["--reduce", "tau=0.1", "--window", "inf"], "--window"),
    (["--dist-timeout", "nan"], "dist_timeout=nan"),
    (["--dist-timeout", "0"], "dist_timeout=0"),
    (["--arch", "mamba2", "--head-dim", "7"], "head_dim must divide"),
])
def test_train_refuses_settings_that_cannot_train_and_leaves_no_folder(tmp_path, flags, needle):
    data = _tiny_npz(tmp_path / "d.npz")
    done = _cli(["train", "--dataset", "npz", "--data", str(data), *TINY, *flags, "--out",
                 "run"], tmp_path)
    assert needle in _one_line_error(done, "compressm-tune")
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_stops_with_one_line(tmp_path):
    data = _tiny_npz(tmp_path / "d.npz")
    done = _cli(["train", "--dataset", "npz", "--data", str(data), *TINY, "--lr", "1e30",
                 "--out", "run"], tmp_path)
    line = _one_line_error(done, "compressm-tune")
    assert "diverged" in line and "lower the learning rate" in line


def test_an_interrupt_before_the_first_checkpoint_does_not_advise_resume(tmp_path, capsys,
                                                                          monkeypatch):
    from compressm_tune import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.train, "run", interrupted)
    assert cli.main(["train", "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "rerun with --resume" not in err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    assert cli.main(["train", "--out", str(tmp_path / "run")]) == 130
    assert "rerun with --resume" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the search


def test_a_journal_storage_never_appends_to_a_file_that_is_not_a_journal(tmp_path, capsys):
    from compressm_tune.cli import main

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nline 2\n")
    code = main(["--budget-ms", "1", "--storage", f"journal:{notes}", "--out",
                 str(tmp_path / "run")])
    assert code == 2
    assert "not an Optuna journal" in capsys.readouterr().err
    assert notes.read_text() == "my notes\nline 2\n"
    assert not (tmp_path / "run").exists()


def test_a_refused_budget_leaves_no_run_folder(tmp_path, capsys):
    from compressm_tune.cli import main

    code = main(["--budget-ms", "0.0001", "--profile", str(PROFILE), "--no-drift-check",
                 "--out", str(tmp_path / "run")])
    assert code == 2
    assert "below the fastest model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--workers", "0"], "workers must be >= 1"),
    (["--artifacts", "notes.txt/store"], "notes.txt is a file"),
])
def test_the_job_refuses_bad_worker_settings_and_leaves_no_folder(tmp_path, capsys, flags,
                                                                  needle):
    from compressm_tune.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    code = main(["--budget-ms", "100", "--profile", str(PROFILE), "--no-drift-check", *[
        f.replace("notes.txt", str(tmp_path / "notes.txt")) for f in flags],
        "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- compress


def _mamba_folder(path: Path) -> Path:
    pytest.importorskip("safetensors")
    from compressm_tune.models import save_hf_folder

    model = SSMModel(SSMConfig(arch="mamba", d_output=12, d_model=8, state_dims=[4, 4],
                               pooling="none", vocab_size=12))
    return save_hf_folder(model, path)


@pytest.mark.parametrize("make,needle", [
    (lambda p: p.write_text("not a model") and p, "is not a folder"),
    (lambda p: p.mkdir() or p, "no config.json"),
    (lambda p: p.mkdir() or (p / "config.json").write_text('{"model_type": "gpt2"}') and p,
     "holds a 'gpt2' model"),
    (lambda p: p.mkdir() or (p / "config.json").write_text("{oops") and p, "cannot read"),
])
def test_compress_refuses_a_source_that_is_not_a_mamba_folder(tmp_path, capsys, make, needle):
    from compressm_tune.cli import main

    source = make(tmp_path / "model")
    code = main(["compress", str(source), "--keep", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_compress_refuses_an_output_folder_of_the_users_before_any_work(tmp_path, capsys):
    from compressm_tune.cli import main

    source = _mamba_folder(tmp_path / "model")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    code = main(["compress", str(source), "--keep", "2", "--data", "missing.npy", "--out",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "holds other files" in err, err  # before the data is even read
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_compress_refuses_token_ids_outside_the_vocabulary(tmp_path, capsys):
    from compressm_tune.cli import main

    source = _mamba_folder(tmp_path / "model")
    np.save(tmp_path / "ids.npy", np.full((20, 9), 12))
    code = main(["compress", str(source), "--keep", "2", "--data", str(tmp_path / "ids.npy"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "vocabulary has 12" in err, err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the Python API


@pytest.mark.parametrize("settings", [{"window": float("nan")}, {"window": float("inf")},
                                      {"max_drop": float("nan")}])
def test_compressor_refuses_settings_that_are_not_numbers_in_range(settings):
    """Checked by ReduceConfig before they are used (a NaN window was turned into a step
    count first: ValueError; a NaN max_drop passed every comparison)."""
    from compressm_tune import Compressor
    from compressm_tune.errors import ConfigError

    model = SSMModel(SSMConfig(d_input=1, d_output=2, d_model=4, state_dims=[8]))
    with pytest.raises(ConfigError, match=next(iter(settings))):
        Compressor(model, torch.optim.AdamW(model.parameters()), total_steps=10,
                   validate=lambda: {"loss": 1.0}, **settings)


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("flags,needle", [
    (["--tolerance", "inf"], "tolerance"),  # a parity check that checks nothing
    (["--bench", "--min-time-s", "-1"], "--min-time-s"),
    (["--bench", "--min-time-s", "nan"], "--min-time-s"),
])
def test_export_refuses_settings_before_writing_the_bundle(bundle, tmp_path, capsys, flags,
                                                           needle):
    from compressm_tune.cli import main

    out = tmp_path / "b"
    assert main(["export", str(bundle.parent / "model.pt"), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


# ----------------------------------------------------------------------------- profile


@pytest.mark.parametrize("setting", ["min_time_s", "watts_per_core"])
def test_profile_settings_must_be_finite(setting):
    """An infinite minimum time never ends a timing; infinite watts give infinite energy."""
    from compressm_tune.errors import ConfigError
    from compressm_tune.hardware import ProfilerConfig

    with pytest.raises(ConfigError, match=setting):
        ProfilerConfig(**{setting: float("inf")})


def test_timing_refuses_an_endless_minimum_time():
    from compressm_tune.hardware import time_calls

    with pytest.raises(ValueError, match="min_time_s"):
        time_calls(lambda: None, min_time_s=float("inf"), min_repeats=1, max_repeats=3)


def test_a_study_storage_that_cannot_open_leaves_no_run_folder(tmp_path, capsys):
    from compressm_tune.cli import main

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    code = main(["--budget-ms", "1", "--profile", str(PROFILE), "--no-drift-check",
                 "--storage", f"sqlite:///{notes}", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "cannot open study storage" in capsys.readouterr().err
    assert notes.read_text() == "my notes\n"
    assert not (tmp_path / "run").exists()


def test_profile_never_overwrites_a_profile(tmp_path, capsys):
    from compressm_tune.cli import main

    mine = tmp_path / "mine.json"
    mine.write_text(PROFILE.read_text())
    assert main(["profile", "--widths", "4,8", "--out", str(mine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "never overwritten" in err[0], err
    assert mine.read_text() == PROFILE.read_text()


def test_compare_refuses_an_infinite_tolerance(tmp_path, capsys):
    from compressm_tune.cli import main

    assert main(["compare", str(PROFILE), str(PROFILE), "--tolerance", "inf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tolerance" in err[0], err


@pytest.mark.parametrize("text", ["4,,8", "4,8,", ""])
def test_profile_widths_with_an_empty_item_are_refused(text):
    from compressm_tune.errors import ConfigError
    from compressm_tune.hardware import parse_widths

    with pytest.raises(ConfigError, match="widths"):
        parse_widths(text)


def test_train_into_a_finished_run_without_resume_is_refused_and_changes_nothing(tmp_path,
                                                                                capsys):
    """Starting afresh would overwrite that run's checkpoints and metrics."""
    from compressm_tune.cli import main

    data = _tiny_npz(tmp_path / "d.npz")
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"the earlier run's checkpoint")
    (run / "metrics.jsonl").write_text('{"step": 3}\n')
    code = main(["train", "--dataset", "npz", "--data", str(data), *TINY, "--out", str(run)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--resume" in err[-1] and len([ln for ln in err if "error:" in ln]) == 1, err
    assert (run / "last.pt").read_bytes() == b"the earlier run's checkpoint"
    assert (run / "metrics.jsonl").read_text() == '{"step": 3}\n'


def test_the_budgeted_job_refuses_a_training_run_s_folder(tmp_path, capsys):
    """The job writes OUT/summary.json and OUT/report.md: not over a training run's."""
    from compressm_tune.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 3}\n')
    (run / "summary.json").write_text("{}")
    # an impossible budget: without the check the job would refuse it, in other words
    assert main(["--budget-ms", "0.0001", "--profile", str(PROFILE), "--no-drift-check",
                 "--out", str(run)]) == 2
    assert "holds a training run" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "summary.json"]
    assert (run / "summary.json").read_text() == "{}"
