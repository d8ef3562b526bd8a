"""The budgeted job end to end: search, export, measured latency, resume, shared studies.

Each run is tiny (1 block, H=8, a few steps) but real: real training, a real SQLite or
PostgreSQL study, a real ONNX export measured in onnxruntime by the test itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import optuna
import pytest

from compressm_tune.hardware import ProfilerConfig, profile_device, save_profile
from compressm_tune.search import open_storage

pytestmark = pytest.mark.slow

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    """A real onnxruntime profile of this machine at the tests' shape (H=8, 1 block, L=40)."""
    profile = profile_device(ProfilerConfig(
        device="cpu", runtime="onnxruntime", widths=(1, 4, 16, 32), hidden=8, blocks=1,
        seq_len=40, min_time_s=0.05, rounds=2, min_repeats=5, warmup=2, threads=1),
        progress=False)
    return save_profile(profile, tmp_path_factory.mktemp("prof") / "here.json")


def _args(out: Path, profile: Path, trials: int, *extra: str) -> list[str]:
    """The job's arguments. The drift check stays off: runs that compare or resume
    predictions need the same ones every time, not a fresh re-time's (tested in test_search)."""
    return ["--budget-ms", "50", "--dataset", "mnist1d", "--blocks", "1", "--hidden", "8",
            "--state-dims", "16,32", "--trials", str(trials), "--steps", "12",
            "--profile", str(profile), "--no-drift-check", "--out", str(out), *extra]


def _cli(args: list[str], **kw) -> subprocess.Popen:
    """The CLI in a subprocess; its output goes to OUT.log (a pipe nobody reads would fill
    up with progress bars and block the child)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    out = Path(args[args.index("--out") + 1])
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(f"{out}.log", "w")  # noqa: SIM115 - closed with the process by _wait
    proc = subprocess.Popen([sys.executable, "-m", "compressm_tune.cli", *args], env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True, **kw)
    proc.log_path = log.name
    return proc


def _wait(proc: subprocess.Popen, timeout: float) -> str:
    proc.wait(timeout=timeout)
    return Path(proc.log_path).read_text()[-3000:]


def _finished(storage: str, study: str = "compressm-tune") -> list[optuna.trial.FrozenTrial]:
    # through the job's own opener: a test polling while the job creates the schema loses the
    # same race a second worker would (a raw load_study raised IntegrityError in CI)
    return optuna.load_study(study_name=study, storage=open_storage(storage, Path())).get_trials(
        states=FINISHED)


def _ort_p50_ms(model: Path, seq_len: int, repeats: int = 200) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, seq_len, 1)).astype(np.float32)
    for _ in range(20):
        session.run(None, {"x": x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def test_search_exports_a_model_whose_measured_latency_meets_the_budget(tmp_path,
                                                                        profile_path):
    from compressm_tune.search import TuneConfig, run_tune

    probe = tmp_path / "probe"
    summary = run_tune(TuneConfig(budget_ms=50, dataset="mnist1d", blocks=1, hidden=8,
                                  state_dims=(16, 32), trials=2, steps=12,
                                  profile=str(profile_path), drift_check=False, out=str(probe)))
    # the budget the test sets: above the smallest trial's prediction (with a margin for the
    # latency model's error on this tiny, quickly profiled shape), below the full's
    budget = summary["predicted_ms"] * 1.6
    out = tmp_path / "run"
    proc = _cli(_args(out, profile_path, 3) + ["--budget-ms", f"{budget:.5f}"])
    log = _wait(proc, 600)
    assert proc.returncode == 0, log
    s = json.loads((out / "summary.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert s["meets_budget"] and s["measured_ms"] <= budget
    assert manifest["model"]["state_dims"] == s["final_state_dims"]
    # measured here, independently of the package's own timing
    assert _ort_p50_ms(out / "model.onnx", seq_len=40) <= budget * 1.1
    for name in ("model.onnx", "model_step.onnx", "model.ts", "checkpoint.pt", "report.md",
                 "history.png", "hsv.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "meets" in report
    assert "the training-step fit's leave-one-out error is up to" in report  # cost's error


def test_the_report_sets_the_chosen_model_beside_the_full_one_and_a_scratch_baseline(
        tmp_path, profile_path):
    """What compression bought: the full model and the chosen widths from scratch, trained with
    the chosen trial's settings and steps, exported and measured beside the chosen model."""
    from compressm_tune.search import TuneConfig, run_tune

    out = tmp_path / "run"
    s = run_tune(TuneConfig(budget_ms=50, dataset="mnist1d", blocks=1, hidden=8,
                            state_dims=(32,), trials=2,
                            steps=12, profile=str(profile_path), drift_check=False,
                            out=str(out)))
    assert s == json.loads((out / "summary.json").read_text())
    for name in ("full", "chosen", "scratch"):
        entry = s[name]
        assert entry["measured_ms_p50"] > 0 and entry["measured_ms_p90"] >= entry[
            "measured_ms_p50"]
        assert entry["metric_name"] == "test_accuracy" and 0 <= entry["metric"] <= 1
    assert s["full"]["state_dims"] == [32]
    assert s["chosen"]["state_dims"] == s["scratch"]["state_dims"] == s["final_state_dims"]
    assert s["chosen"]["initial_state_dims"] == [32]  # every trial starts at the full width
    assert all(r["initial_state_dims"] == [32] for r in s["trial_table"])
    chosen = next(r for r in s["trial_table"] if r["trial"] == s["chosen_trial"])
    assert s["full"]["settings"]["lr"] == chosen["lr"]  # the full reference: the same settings
    for name in ("full", "scratch"):  # the same steps
        done = json.loads((out / "references" / f"compressm-tune-{s['chosen_trial']:04d}-{name}"
                           / "summary.json").read_text())
        assert done["steps"] == 12
    # measured here, independently: the full model's bundle is the full model
    assert _ort_p50_ms(out / "bundles" / f"compressm-tune-{s['chosen_trial']:04d}-full"
                       / "model.onnx", seq_len=40) > 0
    report = (out / "report.md").read_text()
    first = report.split("\n\n")[1]  # the first table, right under the title
    assert "full (no cuts)" in first and "scratch" in first and "measured p50 ms" in first
    assert "What compression bought" in report and "1-minute load" in report


def test_no_baseline_skips_the_scratch_model(tmp_path, profile_path):
    out = tmp_path / "run"
    proc = _cli(_args(out, profile_path, 1) + ["--state-dims", "32", "--no-baseline"])
    log = _wait(proc, 600)
    assert proc.returncode == 0, log
    s = json.loads((out / "summary.json").read_text())
    assert s["scratch"] is None and s["full"]["measured_ms_p50"] > 0
    assert not list((out / "references").glob("*-scratch"))
    assert "No scratch baseline" in (out / "report.md").read_text()


def test_resume_after_kill_finishes_the_study_without_losing_or_repeating(tmp_path,
                                                                          profile_path):
    out = tmp_path / "run"
    storage = f"sqlite:///{out / 'study.db'}"
    args = _args(out, profile_path, 4)
    proc = _cli(args, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, Path(proc.log_path).read_text()[-3000:]
        if (out / "study.db").exists():
            try:
                if len(_finished(storage)) >= 1:
                    break
            except KeyError:  # the study is not created yet
                pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _finished(storage)
    assert 1 <= len(before) < 4
    time.sleep(13)  # past the heartbeat grace period: the killed trial is now known dead
    rerun = _cli(args)
    log = _wait(rerun, 600)
    assert rerun.returncode == 0, log
    after = _finished(storage)
    assert len(after) == 4
    numbers = [t.number for t in after]
    assert len(set(numbers)) == 4
    kept = {t.number: t.params for t in before}
    assert all(t.params == kept[t.number] for t in after if t.number in kept)  # none redone


def _two_workers(tmp_path, profile_path, storage, *extra):
    # the same command on both: their proposals differ because trials are seeded by number
    procs = [_cli(_args(tmp_path / f"w{i}", profile_path, 4, "--storage", storage, *extra))
             for i in range(2)]
    logs = [_wait(p, 900) for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log
    trials = _finished(storage)
    assert len(trials) == 4  # in total, not per worker
    assert len({t.number for t in trials}) == 4
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4


def test_two_workers_share_one_sqlite_study(tmp_path, profile_path):
    _two_workers(tmp_path, profile_path, f"sqlite:///{tmp_path / 'shared.db'}")


def test_two_workers_share_one_postgresql_study(tmp_path, profile_path, postgres_url):
    _two_workers(tmp_path, profile_path, postgres_url, "--artifacts", str(tmp_path / "shared"))


def test_selective_search_meets_its_budget_with_a_selective_profile(tmp_path):
    """--arch selective end to end: its own onnxruntime profile, training with data-driven
    truncation, export of a selective bundle, and a measured latency within the budget."""
    from compressm_tune.search import TuneConfig, run_tune

    profile = save_profile(profile_device(ProfilerConfig(
        device="cpu", runtime="onnxruntime", arch="selective", widths=(1, 4, 16), hidden=8,
        blocks=1, seq_len=40, min_time_s=0.05, rounds=2, min_repeats=5, warmup=2, threads=1),
        progress=False), tmp_path / "selective.json")
    out = tmp_path / "run"
    summary = run_tune(TuneConfig(budget_ms=50, dataset="mnist1d", arch="selective", blocks=1,
                                  hidden=8, state_dims=(8, 16), trials=2, steps=12,
                                  profile=str(profile), out=str(out)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["arch"] == "selective" and manifest["model"]["arch"] == "selective"
    assert summary["meets_budget"] and _ort_p50_ms(out / "model.onnx", seq_len=40) <= 50
    assert manifest["model"]["state_dims"] == summary["final_state_dims"]
    assert (out / "hsv.png").stat().st_size > 0
