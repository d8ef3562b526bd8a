"""A search across machines: the artifact store, the finalizer's election, their errors.

"Machines" are processes with their own run folder, HOME and cache on this box, sharing what
several machines share: one real PostgreSQL study (loopback) and one artifact folder.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from compressm_tune.cli import main
from compressm_tune.errors import ArtifactStoreError, ConfigError
from compressm_tune.search import TuneConfig

ROOT = Path(__file__).resolve().parents[1]


def _tune(out: Path, *args: str) -> int:
    return main(["--budget-ms", "50", "--dataset", "lti-sysid", "--blocks", "1", "--hidden",
                 "8", "--trials", "1", "--steps", "4", "--out", str(out), *args])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ----------------------------------------------------------------------------- store errors


def test_a_database_server_without_an_artifact_store_is_refused_in_one_line(tmp_path, capsys):
    """Machines sharing a PostgreSQL study share no folder: a trial's checkpoint kept in its
    worker's OUT could not be exported by another. Refused before any work or connection."""
    code = _tune(tmp_path / "run", "--storage", "postgresql://u:hunter2@127.0.0.1:9/db")
    line = _one_line(capsys)
    assert code == 2 and "--artifacts DIR|URL" in line and "hunter2" not in line
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="--artifacts"):
        TuneConfig(budget_ms=1, storage="mysql://u@host/db")
    TuneConfig(budget_ms=1, storage="mysql://u@host/db", artifacts=str(tmp_path))  # given


@pytest.mark.parametrize("where, says", [("ftp://host/x", "takes a folder, file:///DIR or s3"),
                                         ("s3://bucket/prefix", "names a bucket"),
                                         ("file://", "needs a folder")])
def test_an_artifact_store_that_names_no_store_is_refused_in_one_line(tmp_path, capsys, where,
                                                                      says):
    assert _tune(tmp_path / "run", "--artifacts", where) == 2
    assert says in _one_line(capsys) and not (tmp_path / "run").exists()


def test_s3_without_boto3_says_what_to_install(tmp_path, capsys):
    try:
        import boto3  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("boto3 is installed here")
    assert _tune(tmp_path / "run", "--artifacts", "s3://bucket") == 2
    assert "needs boto3" in _one_line(capsys) and not (tmp_path / "run").exists()


def test_an_unwritable_artifact_store_is_one_line_error_and_writes_no_study(tmp_path, capsys,
                                                                          profile_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = _tune(tmp_path / "run", "--artifacts", str(blocker / "store"), "--profile",
                 str(profile_path), "--no-drift-check")
    line = _one_line(capsys)
    assert code == 2 and "artifact store" in line and "is a file" in line
    assert not (tmp_path / "run").exists()


def test_a_folder_store_writes_atomically_and_a_failed_upload_is_one_line(tmp_path):
    """A worker killed mid-upload must leave nothing another could download half of; an
    upload that fails names the store."""
    from compressm_tune.search._artifacts import FileStore, open_artifacts

    class Broken(io.RawIOBase):
        def __init__(self):
            self.sent = False

        def readable(self):
            return True

        def readinto(self, buf):
            if self.sent:
                raise OSError(5, "Input/output error")
            self.sent = True
            buf[:4] = b"half"
            return 4

    store = FileStore(tmp_path / "store")
    with pytest.raises(OSError, match="Input/output"):
        store.write("abc", Broken())
    assert list((tmp_path / "store").iterdir()) == []  # neither the id nor a temporary file

    artifacts = open_artifacts(str(tmp_path / "gone"))
    (tmp_path / "gone").write_text("the folder was replaced by a file")
    study = optuna.create_study()
    (tmp_path / "best.pt").write_bytes(b"weights")
    with pytest.raises(ArtifactStoreError) as exc:
        artifacts.upload(study.ask(), {"best.pt": tmp_path / "best.pt"})
    assert str(exc.value).startswith(f"cannot upload {tmp_path / 'best.pt'} to the artifact "
                                     f"store {tmp_path / 'gone'}")
    assert "\n" not in str(exc.value)


def _feasible_trial(study: optuna.Study, **attrs) -> None:
    trial = study.ask()
    trial.set_user_attr("constraints", {"latency_ms": -1.0})
    for key, value in {"val": 0.5, "predicted_ms": 1.0, **attrs}.items():
        trial.set_user_attr(key, value)
    study.tell(trial, 0.5)


def test_a_trial_missing_from_the_store_names_the_flag(tmp_path):
    """The finalizer pointed at another store than the trials' workers: one line saying so,
    not a skip to a worse trial."""
    from compressm_tune.search._artifacts import open_artifacts
    from compressm_tune.search._finalize import choose_and_export

    config = TuneConfig(budget_ms=5.0, out=str(tmp_path / "run"))
    study = optuna.create_study(direction="maximize")
    _feasible_trial(study, artifacts={"best.pt": "0000-not-here"})
    with pytest.raises(ArtifactStoreError, match=r"trial 0's best.pt \(artifact 0000-not-here\) "
                                                 r"is not in the artifact store .*same shared "
                                                 r"--artifacts"):
        choose_and_export(config, study, None, open_artifacts(str(tmp_path / "other")))


def test_an_old_studys_local_checkpoint_is_still_found(tmp_path):
    """Studies run before the store recorded a local path: still exported where it exists."""
    from compressm_tune.search._artifacts import open_artifacts
    from compressm_tune.search._finalize import trial_files

    (tmp_path / "t0").mkdir()
    (tmp_path / "t0" / "best.pt").write_bytes(b"weights")
    study = optuna.create_study(direction="maximize")
    _feasible_trial(study, checkpoint=str(tmp_path / "t0" / "best.pt"))
    _feasible_trial(study, checkpoint=str(tmp_path / "elsewhere" / "best.pt"))
    config, artifacts = TuneConfig(budget_ms=5.0, out=str(tmp_path)), open_artifacts(
        str(tmp_path / "a"))
    first, second = study.get_trials()
    assert trial_files(config, artifacts, first) == tmp_path / "t0"
    assert trial_files(config, artifacts, second) is None


def test_the_default_store_is_beside_the_storage_file(tmp_path):
    from compressm_tune.search._artifacts import default_artifacts

    assert default_artifacts(None, tmp_path / "out") == str(tmp_path / "out" / "artifacts")
    assert default_artifacts(f"sqlite:///{tmp_path}/s/x.db", "o") == str(tmp_path / "s" /
                                                                        "artifacts")
    assert default_artifacts(f"journal:{tmp_path}/j/x.log", "o") == str(tmp_path / "j" /
                                                                       "artifacts")


# ----------------------------------------------------------------------------- election


def _study(storage: str | None, out: Path, artifacts: Path, name: str) -> tuple:
    """The study a worker with its own OUT opens (its own connection pool, as on a machine)."""
    from compressm_tune.search._study import open_study

    config = TuneConfig(budget_ms=5.0, out=str(out), storage=storage, artifacts=str(artifacts),
                        study=name)
    out.mkdir(parents=True, exist_ok=True)
    return open_study(config), config


@pytest.mark.parametrize("server", [True, False])
def test_two_finalizers_with_their_own_out_elect_one_through_the_storage(tmp_path, server,
                                                                         request):
    """Two workers on two machines (their own OUT) finish together: one exports, the other
    names it and leaves; a lock in OUT elected both. After the winner is done, a rerun wins."""
    from compressm_tune.search._elect import FINALIZER_KEY, finalizer

    url = (request.getfixturevalue("postgres_url") if server
           else f"sqlite:///{tmp_path / 'shared.db'}")
    a, config_a = _study(url, tmp_path / "a", tmp_path / "store", "elect")
    b, config_b = _study(url, tmp_path / "b", tmp_path / "store", "elect")
    with finalizer(a, config_a, []) as why_a:
        assert why_a is None
        with finalizer(b, config_b, []) as why_b:
            assert why_b == (f"another worker (pid {os.getpid()} on {os.uname().nodename}, "
                             f"into {tmp_path / 'a'}) is exporting and reporting")
    assert b._storage.get_study_system_attrs(b._study_id)[FINALIZER_KEY]["out"] == str(
        tmp_path / "a")
    with finalizer(b, config_b, []) as why_b:
        assert why_b is None  # released when the winner finished


_HOLDER = """
import sys
from compressm_tune.search import TuneConfig
from compressm_tune.search._elect import finalizer
from compressm_tune.search._study import open_study
config = TuneConfig(budget_ms=5.0, out=sys.argv[2], storage=sys.argv[1], artifacts=sys.argv[3],
                    study="dies")
with finalizer(open_study(config), config, []) as why_not:
    print("held" if why_not is None else why_not, flush=True)
    sys.stdin.readline()  # until killed
"""


def test_a_finalizer_killed_mid_way_does_not_block_the_rerun(tmp_path, postgres_url):
    """The lock is the database server's and goes with the killed worker's connection: no
    lease to wait out."""
    from compressm_tune.search._elect import finalizer

    mine, config = _study(postgres_url, tmp_path / "b", tmp_path / "store", "dies")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, postgres_url, str(tmp_path / "a"), str(tmp_path / "store")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with finalizer(mine, config, []) as why_not:
            assert why_not is not None and str(tmp_path / "a") in why_not
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 60  # the server notices the closed socket at once
    while True:
        with finalizer(mine, config, []) as why_not:
            if why_not is None:
                break
        assert time.monotonic() < deadline, why_not


# ----------------------------------------------------------------------------- two machines


def _machine(home: Path) -> dict[str, str]:
    """The environment of a "machine": its own HOME and cache (profiles, datasets)."""
    home.mkdir(parents=True)
    return {**os.environ, "HOME": str(home), "COMPRESSM_CACHE": str(home / ".cache"),
            "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_the_best_trial_trained_on_one_machine_is_exported_by_another(tmp_path, profile_path,
                                                                      postgres_url):
    """Machine A runs every trial of the study, then machine B (its own OUT, HOME and cache;
    nothing of A's but the database and the artifact folder) finalizes: B's bundle holds the
    weights A trained. B used to stop at "no feasible trial's checkpoint is on this machine"."""
    store = tmp_path / "shared-artifacts"
    args = ["--budget-ms", "50", "--dataset", "lti-sysid", "--blocks", "1", "--hidden", "8",
            "--state-dims", "16", "--trials", "2", "--steps", "8", "--no-baseline",
            "--profile", str(profile_path), "--no-drift-check", "--storage", postgres_url,
            "--study", "machines", "--artifacts", str(store)]
    for name in ("a", "b"):
        run = subprocess.run([sys.executable, "-m", "compressm_tune.cli", *args, "--out",
                              str(tmp_path / name / "run")], env=_machine(tmp_path / name / "home"),
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert not (b / "trials").exists()  # B trained no trial
    chosen = json.loads((b / "summary.json").read_text())["chosen_trial"]
    trained = torch.load(a / "trials" / f"machines-{chosen:04d}" / "best.pt", weights_only=True)
    exported = torch.load(b / "checkpoint.pt", weights_only=True)
    assert exported["model_config"] == trained["model_config"]
    for key, value in trained["model"].items():
        assert torch.equal(exported["model"][key], value), key
    # the trials' files and B's chosen bundle are in the shared store, under their ids
    study = optuna.load_study(study_name="machines", storage=postgres_url)
    bundle = study.user_attrs["bundle"]
    assert bundle["trial"] == chosen and {"model.onnx", "checkpoint.pt", "report.md"} <= set(
        bundle["files"])
    recorded = {*study._storage.get_study_system_attrs(study._study_id),
                *(k for t in study.trials for k in t.system_attrs)}
    every = {k.removeprefix("artifacts:") for k in recorded if k.startswith("artifacts:")}
    assert {i for t in study.trials for i in t.user_attrs["artifacts"].values()} <= every
    assert set(bundle["files"].values()) <= every
    assert every == {p.name for p in store.iterdir()}  # and nothing half-written beside them
    assert (store / bundle["files"]["model.onnx"]).read_bytes() == (b / "model.onnx").read_bytes()


# ----------------------------------------------------------------------------- local workers


def test_workers_are_pinned_one_gpu_each_round_robin():
    from compressm_tune.cli.tune import pinned

    assert pinned(3, "auto", 2, None) == [{"CUDA_VISIBLE_DEVICES": d} for d in "010"]
    assert pinned(2, "cuda", 2, "4,7") == [{"CUDA_VISIBLE_DEVICES": "4"},
                                           {"CUDA_VISIBLE_DEVICES": "7"}]
    assert pinned(2, "auto", 0, None) == [{}, {}]  # CPU: unchanged
    assert pinned(2, "cpu", 2, None) == [{}, {}]
    with pytest.raises(ConfigError, match="--workers 2 pins each worker to one GPU"):
        TuneConfig(budget_ms=1, workers=2, device="cuda:1")


@pytest.mark.slow
def test_workers_run_one_study_between_them(tmp_path, profile_path):
    """--workers 2 on CPU: two processes of the same command share the study in OUT."""
    out = tmp_path / "run"
    assert _tune(out, "--trials", "2", "--workers", "2", "--state-dims", "16", "--no-baseline",
                 "--profile", str(profile_path), "--no-drift-check") == 0
    study = optuna.load_study(study_name="compressm-tune", storage=f"sqlite:///{out}/study.db")
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,
                                        optuna.trial.TrialState.PRUNED))) == 2
    assert (out / "report.md").is_file() and (out / "model.onnx").is_file()
