"""The budgeted job: bad inputs, the infeasible-budget floor, foreign profiles, storages.

A small real profile of this machine (eager torch, tiny model) is measured once per module;
nothing here is mocked.
"""

from __future__ import annotations

import dataclasses
import json
import time

import optuna
import pytest
from optuna.storages._heartbeat import get_heartbeat_thread

from compressm_tune.cli import main
from compressm_tune.errors import ConfigError
from compressm_tune.hardware import (
    LatencyModel,
    Profile,
    ProfilerConfig,
    drift_scale,
    load_profile,
    save_profile,
)
from compressm_tune.search import StorageError, TuneConfig, open_storage, resolve_profile
from compressm_tune.training import load_checkpoint

SMALL = {"blocks": 1, "hidden": 8}


def _tune(tmp_path, *args):
    return main(["--dataset", "lti-sysid", "--blocks", "1", "--hidden", "8", "--trials", "1",
                 "--steps", "4", "--out", str(tmp_path / "run"), *args])


@pytest.mark.parametrize("budget", ["0", "-3"])
def test_nonpositive_budget_is_one_line_error(tmp_path, capsys, budget):
    assert _tune(tmp_path, "--budget-ms", budget) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--budget-ms must be > 0" in err[0]


def test_budget_below_the_fastest_model_names_the_minimum(tmp_path, capsys, profile_path):
    latency = LatencyModel.from_profile(load_profile(profile_path))
    fastest = min(latency.predict([w], "latency_ms") for w in (1, 4, 16, 64))  # its widths
    code = _tune(tmp_path, "--budget-ms", f"{fastest / 10:.6f}", "--profile", str(profile_path),
                 "--no-drift-check")  # the numbers as stored, not rescaled by a noisy re-time
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "below the fastest model" in err[0] and f"{fastest:.4g} ms" in err[0]


def test_unknown_dataset_is_rejected_by_the_parser(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--budget-ms", "1", "--dataset", "cifar"])
    assert exc.value.code == 2


def test_unreachable_storage_is_one_line_error(tmp_path, capsys, profile_path):
    code = _tune(tmp_path, "--budget-ms", "50", "--profile", str(profile_path),
                 "--storage", "sqlite:////nonexistent-dir/x/study.db")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot open study storage" in err[0]


def test_storage_urls(tmp_path):
    assert isinstance(open_storage(None, tmp_path), optuna.storages.RDBStorage)
    assert (tmp_path / "study.db").exists()
    journal = open_storage(f"journal:{tmp_path / 'j' / 'study.log'}", tmp_path)
    assert isinstance(journal, optuna.storages.JournalStorage)
    with pytest.raises(ConfigError, match="SQLAlchemy URL or journal:PATH"):
        open_storage("not-a-url", tmp_path)
    with pytest.raises(StorageError) as exc:
        open_storage("postgresql://user:hunter2@127.0.0.1:9/db", tmp_path)
    assert "hunter2" not in str(exc.value)


def test_profile_from_another_device_warns_and_is_noted(tmp_path, profile_path):
    data = json.loads(profile_path.read_text())
    data["device"]["cpu_model"] = "Some Other CPU 9000"
    data["device"]["cpu_logical_cores"] = 128
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(data))
    config = TuneConfig(budget_ms=5, profile=str(foreign), **SMALL)
    with pytest.warns(UserWarning, match="not on this machine"):
        _, notes = resolve_profile(config, 1, 1, 40)
    assert any("Some Other CPU 9000" in n for n in notes)
    _, notes = resolve_profile(dataclasses.replace(config, profile=str(profile_path)), 1, 1, 40)
    assert not any("not on this machine" in n for n in notes)


def test_a_profile_of_another_shape_is_noted(profile_path):
    config = TuneConfig(budget_ms=5, profile=str(profile_path), blocks=1, hidden=16)
    _, notes = resolve_profile(config, 1, 1, 100)
    assert any("extrapolated" in n for n in notes)


@pytest.mark.parametrize("kw, match", [
    ({"budget_mj": 0}, "budget-mj"), ({"latency_mode": "batch"}, "latency mode"),
    ({"trials": 0}, "trials"), ({"state_dims": ()}, "state_dims"), ({"arch": "mamba3"}, "arch")])
def test_tune_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        TuneConfig(budget_ms=1, **kw)


@pytest.mark.parametrize("widths", ["abc", "64,,128", "0,64"])
def test_bad_state_dims_is_one_line_error(tmp_path, capsys, widths):
    assert _tune(tmp_path, "--budget-ms", "1", "--state-dims", widths) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "state" in err[0] and not (tmp_path / "run").exists()


def test_corrupt_profile_is_one_line_error_and_writes_no_study(tmp_path, capsys, profile_path):
    broken = tmp_path / "broken.json"
    broken.write_text(profile_path.read_text()[:200])
    assert _tune(tmp_path, "--budget-ms", "1", "--profile", str(broken)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.json" in err[0]
    assert not (tmp_path / "run" / "study.db").exists()


def test_a_profile_of_another_arch_is_one_line_error(tmp_path, capsys, profile_path):
    """An LRU profile says nothing about selective layers' cost: refuse, say how to fix."""
    assert _tune(tmp_path, "--budget-ms", "5", "--arch", "selective",
                 "--profile", str(profile_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "profile --arch selective" in err[0]
    assert not (tmp_path / "run" / "study.db").exists()


def test_profiler_config_rejects_an_unknown_arch():
    with pytest.raises(ConfigError, match="arch must be one of"):
        ProfilerConfig(arch="mamba3")


def test_cli_unknown_arch_exits_2_without_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        _tune(tmp_path, "--budget-ms", "1", "--arch", "mamba3")
    assert info.value.code == 2 and "mamba3" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_stale_profile_of_this_machine_is_rescaled_and_noted(profile_path):
    """Latencies x10 in the file = a machine that now runs 10x faster than profiled (a large
    factor: load on a shared machine alone moved the same models 2x minutes apart)."""
    data = json.loads(profile_path.read_text())
    for record in data["records"] + data["extra_records"]:
        record["latency"] = {k: v * 10 if k.endswith("_ms") else v
                             for k, v in record["latency"].items()}
    notes: list[str] = []
    scale = drift_scale(Profile.from_dict(data), "latency_ms", notes)
    assert 0.03 < scale < 0.4
    assert len(notes) == 1 and "faster than when its profile was measured" in notes[0]


def test_a_profile_of_another_machine_is_not_drift_checked(profile_path):
    data = json.loads(profile_path.read_text())
    data["device"]["cpu_model"] = "Some Other CPU 9000"
    notes: list[str] = []
    assert drift_scale(Profile.from_dict(data), "latency_ms", notes) == 1.0 and notes == []


def test_the_job_rescales_a_stale_profile_unless_told_not_to(tmp_path, capsys, profile_path):
    """Stored latencies x10: the job's drift check scales its predictions by about 1/10,
    visible in the fastest-model error; --no-drift-check keeps the stored numbers."""
    data = json.loads(profile_path.read_text())
    data["created_utc"] = "2026-01-01T00:00:00+00:00"  # measured before this run: stale
    for record in data["records"] + data["extra_records"]:
        record["latency"] = {k: v * 10 if k.endswith("_ms") else v
                             for k, v in record["latency"].items()}
    stale = save_profile(Profile.from_dict(data), tmp_path / "stale.json")
    stored = min(LatencyModel.from_profile(load_profile(stale)).predict([w], "latency_ms")
                 for w in (1, 4, 16, 64))
    budget = f"{stored / 100:.6f}"  # below the fastest model either way

    def fastest_named(*extra):
        assert _tune(tmp_path, "--budget-ms", budget, "--profile", str(stale), *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "below the fastest model" in err[0]
        return float(err[0].split("runs: ")[1].split(" ms")[0])

    assert fastest_named("--no-drift-check") == pytest.approx(stored, rel=1e-3)
    assert 0.03 < fastest_named() / stored < 0.4


def test_a_cached_profile_far_off_is_remeasured_and_replaced(tmp_path, capsys, monkeypatch):
    """A cache measured while the machine was loaded (here: its times x10) is not rescaled
    but measured again and replaced; the job then predicts from the new measurement."""
    monkeypatch.setenv("COMPRESSM_CACHE", str(tmp_path / "cache"))

    def fastest_named() -> float:
        assert _tune(tmp_path, "--budget-ms", "0.000001", "--state-dims", "2") == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the profile's bar
        assert "below the fastest model" in err
        return float(err.split("runs: ")[1].split(" ms")[0])

    first = fastest_named()  # measures and caches a profile (fresh: no drift check)
    (cache,) = (tmp_path / "cache" / "profiles").glob("*.json")
    data = json.loads(cache.read_text())
    data["created_utc"] = "2026-01-01T00:00:00+00:00"
    for record in data["records"] + data["extra_records"]:
        record["latency"] = {k: v * 10 if k.endswith("_ms") else v
                             for k, v in record["latency"].items()}
    cache.write_text(json.dumps(data))
    second = fastest_named()
    replaced = load_profile(cache)
    assert replaced.created_utc > "2026-01-01T00:00:00+00:00"
    stored = [r.metric("latency_ms") for r in replaced.records]
    edited = [r["latency"]["p50_ms"] for r in data["records"]]
    assert all(s < e / 3 for s, e in zip(stored, edited, strict=True))  # not the x10 file
    assert 0.4 < second / first < 2.5  # a shared machine's spread, far from 10x


# ----------------------------------------------------------------------------- sampling


def _propose(study: optuna.Study, config: TuneConfig, finish: bool = True) -> tuple:
    """One trial's proposal, as a worker would get it (told a value unless ``finish`` is off,
    which leaves the trial RUNNING as a killed worker does)."""
    from compressm_tune.search._space import suggest

    trial = study.ask()
    suggest(trial, config)
    if finish:
        study.tell(trial, 0.5)
    return tuple(sorted(trial.params.items()))


@pytest.mark.parametrize("pareto", [False, True])
def test_workers_sharing_a_study_propose_distinct_configurations(tmp_path, pareto):
    """Three workers (three samplers built alike on one SQLite study, asking in turn) get
    nine different configurations; each worker used to replay the same first proposals."""
    from compressm_tune.search._study import open_study

    config = TuneConfig(budget_ms=1.0, out=str(tmp_path), trials=9, pareto=pareto)
    workers = [open_study(config) for _ in range(3)]
    proposals = [_propose(w, config, finish=not pareto) for _ in range(3) for w in workers]
    assert len(set(proposals)) == 9, proposals


def test_a_rerun_after_a_kill_proposes_new_configurations_and_runs_stay_reproducible(tmp_path):
    from compressm_tune.search._study import open_study

    config = TuneConfig(budget_ms=1.0, out=str(tmp_path / "a"), trials=5)
    first = open_study(config)
    seen = [_propose(first, config), _propose(first, config, finish=False)]  # then killed
    rerun = open_study(config)
    seen += [_propose(rerun, config) for _ in range(3)]
    assert len(set(seen)) == 5, seen
    # the same command in a fresh folder proposes the same first trials: reproducible
    again = open_study(dataclasses.replace(config, out=str(tmp_path / "b")))
    assert [_propose(again, config) for _ in range(2)] == seen[:2]


# ----------------------------------------------------------------------------- workers


def _beating(trial: optuna.Trial, journal: bool):
    """A live worker's heartbeat: Optuna's in a database, keep_alive's in a journal file."""
    from compressm_tune.search._study import keep_alive

    return keep_alive(trial) if journal else get_heartbeat_thread(trial._trial_id,
                                                                 trial.study._storage)


@pytest.mark.parametrize("journal", [False, True])
def test_a_worker_leaves_export_and_report_to_the_one_still_running(tmp_path, capsys,
                                                                    profile_path, journal,
                                                                    monkeypatch):
    """Another worker holds trial 0 RUNNING (alive: its heartbeat is not stale, though the
    grace period is 2 s here, with beats every 0.2 s): this worker runs trial 1, then exits 0
    saying so, and writes no model, full reference or report."""
    from compressm_tune.search import _study
    from compressm_tune.search._study import open_study

    monkeypatch.setattr(_study, "GRACE_S", 2)
    monkeypatch.setattr(_study, "HEARTBEAT_S", 0.2)  # keep_alive's, and Optuna's below
    storage = ["--storage", f"journal:{tmp_path / 'study.log'}"] if journal else []
    config = TuneConfig(budget_ms=50.0, out=str(tmp_path / "run"), trials=2, steps=4,
                        dataset="lti-sysid", storage=storage[1] if journal else None,
                        **SMALL)  # the settings of the command below
    (tmp_path / "run").mkdir()
    other = open_study(config)
    held = other.ask()  # the other worker's trial, still running: its heartbeat goes on
    with _beating(held, journal):
        time.sleep(2.5)  # older than the grace period: only its beats show it alive
        code = _tune(tmp_path, "--budget-ms", "50", "--trials", "2", "--profile",
                     str(profile_path), "--no-drift-check", *storage)
    err = capsys.readouterr().err
    assert code == 0 and f"trial(s) [{held.number}] still run in other workers" in err
    run = tmp_path / "run"
    assert not (run / "model.onnx").exists() and not (run / "report.md").exists()
    assert not (run / "full").exists()
    states = [t.state.name for t in other.get_trials(deepcopy=False)]
    assert states.count("COMPLETE") == 1 and states.count("RUNNING") == 1  # (+ a surplus FAIL)
    # the trial this worker started after the study was full is marked, and said nothing
    surplus = [t for t in other.get_trials(deepcopy=False) if t.user_attrs.get("surplus")]
    assert len(surplus) == 1 and surplus[0].state.name == "FAIL"
    assert "Traceback" not in err and "_Surplus" not in err


@pytest.mark.parametrize("journal", [False, True])
def test_a_worker_killed_before_its_first_heartbeat_is_found_dead(tmp_path, capsys,
                                                                   profile_path, monkeypatch,
                                                                   journal):
    """A kill between creating a trial and its first heartbeat (right after the previous trial
    finished) left the trial RUNNING with no heartbeat: Optuna never finds it stale (and a
    journal file has no heartbeats at all), so every rerun ended with "still run in other
    workers" and no model. The rerun must fail it, run its retry with the same parameters,
    and finish the study."""
    from compressm_tune.search import _study
    from compressm_tune.search._space import suggest
    from compressm_tune.search._study import open_study

    monkeypatch.setattr(_study, "GRACE_S", 2)
    storage = ["--storage", f"journal:{tmp_path / 'study.log'}"] if journal else []
    config = TuneConfig(budget_ms=50.0, out=str(tmp_path / "run"), trials=2, steps=4,
                        dataset="lti-sysid", storage=storage[1] if journal else None,
                        **SMALL)  # the settings of the command below
    (tmp_path / "run").mkdir()
    killed = open_study(config)
    _propose(killed, config)
    held = killed.ask()  # created, then killed before its heartbeat thread started
    suggest(held, config)
    time.sleep(2.5)
    code = _tune(tmp_path, "--budget-ms", "50", "--trials", "2", "--profile",
                 str(profile_path), "--no-drift-check", *storage)
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "report.md").exists()
    # (and, as `train`, the search trains a regression task without dropout)
    chosen = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert chosen["model_config"]["dropout"] == 0.0
    trials = killed.get_trials(deepcopy=False)
    assert trials[held.number].state == optuna.trial.TrialState.FAIL
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                 optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 2
    assert finished[1].params == held.params  # its retry, not a new proposal


def test_the_finalize_lock_admits_one_process_at_a_time(tmp_path):
    from compressm_tune.search._elect import finalize_lock

    with finalize_lock(tmp_path) as first:
        with finalize_lock(tmp_path) as second:  # another open file: as another process
            assert first and not second
    with finalize_lock(tmp_path) as again:
        assert again  # released on exit


def test_the_full_reference_resumes_and_a_cut_summary_is_not_trusted(tmp_path, lti_sysid):
    """A kill while the full reference trains: the rerun continues from its last checkpoint
    (the run's log is appended to, not restarted); a summary cut short is retrained from
    there, never a JSONDecodeError."""
    from compressm_tune.models import SSMConfig
    from compressm_tune.search._finalize import train_reference
    from compressm_tune.training import Trainer

    config = TuneConfig(budget_ms=1.0, out=str(tmp_path), steps=4, dataset="lti-sysid",
                        state_dims=(8,), **SMALL)
    full = tmp_path / "full"
    model_config = SSMConfig(d_input=lti_sysid.d_input, d_output=lti_sysid.d_output, d_model=8,
                             state_dims=[8], pooling=lti_sysid.pooling)
    Trainer(model_config, dataclasses.replace(config.train_config(), steps=2), lti_sysid, full,
            progress=False).fit()  # then "killed": no final summary of the 4-step run
    (full / "summary.json").write_text('{"final_state_dims": [8], "test_be')  # cut short
    with open(full / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 2, "marker": "written before the kill"}) + "\n")
    summary = train_reference(config, lti_sysid, "full", [8], {})
    assert summary["steps"] == 4
    assert json.loads((full / "summary.json").read_text())["steps"] == 4
    log = (full / "metrics.jsonl").read_text()
    assert "written before the kill" in log  # appended to: resumed, not restarted


@pytest.mark.parametrize(("text", "fraction"), [("0.4x", 0.4), ("0.4", 0.4), (" 0.25X ", 0.25),
                                                (0.8, 0.8)])
def test_a_relative_budget_parses(text, fraction):
    from compressm_tune.search import parse_relative_budget

    assert parse_relative_budget(text) == fraction
    config = TuneConfig(budget=text)
    assert config.budget == f"{fraction:g}x" and config.budget_fraction == fraction
    assert config.budget_ms is None


@pytest.mark.parametrize("text", ["0x", "1x", "1.5x", "-0.2x", "abc", "nanx", "x", "", "2"])
def test_a_relative_budget_outside_0_1_or_unparsable_is_refused(text):
    with pytest.raises(ConfigError, match=r"fraction of the full model's latency in \(0, 1\)"):
        TuneConfig(budget=text)


@pytest.mark.parametrize("bad", [["--budget", "1.5x"], ["--budget", "0.4y"],
                                 ["--budget", "0.4x", "--budget-ms", "1"]])
def test_cli_refuses_a_bad_relative_budget_in_one_line(tmp_path, capsys, bad):
    assert _tune(tmp_path, *bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "budget" in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_config_needs_exactly_one_latency_budget():
    with pytest.raises(ConfigError, match="give one latency budget"):
        TuneConfig()
    with pytest.raises(ConfigError, match="give one latency budget"):
        TuneConfig(budget_ms=1.0, budget="0.5x")


def test_a_relative_budget_is_that_fraction_of_the_full_models_prediction(tmp_path,
                                                                          profile_path):
    """It binds on any machine: resolved against this machine's latency model, recorded in
    the study in both forms, and a rerun keeps the study's resolution."""
    from compressm_tune.search._run import _resolve_budget
    from compressm_tune.search._study import open_study

    latency = LatencyModel.from_profile(load_profile(profile_path))
    config = TuneConfig(budget="0.4x", state_dims=(16, 64), out=str(tmp_path), **SMALL)
    resolved = _resolve_budget(config, latency)
    assert resolved.budget_ms == pytest.approx(0.4 * latency.predict([64], "latency_ms"))
    assert resolved.budget == "0.4x" and config.budget_ms is None  # the caller's is untouched
    settings = open_study(resolved).user_attrs["settings"]
    assert settings["budget"] == "0.4x" and settings["budget_ms"] == resolved.budget_ms
    open_study(resolved.with_budget_ms(1.01 * resolved.budget_ms))  # drifted: resumes
    with pytest.raises(ConfigError, match=r"budget 0.4x \(now 0.5x\)"):
        other = TuneConfig(budget="0.5x", state_dims=(16, 64), out=str(tmp_path), **SMALL)
        open_study(_resolve_budget(other, latency))


def test_trials_start_at_the_full_width_unless_told_otherwise(tmp_path):
    """The search's subject is how to cut the full model: by default no trial starts small;
    initial widths are searched only when several are given."""
    from compressm_tune.search import suggest

    default = TuneConfig(budget="0.4x")
    assert default.state_dims == (256,) and default.full_width == 256
    study = optuna.create_study()
    for _ in range(5):
        trial = study.ask()
        plan = suggest(trial, default)
        assert plan.state_dim == 256 and "state_dim" not in trial.params
        assert {"tau", "window", "schedule", "max_drop", "weighting", "lr"} <= set(trial.params)
        study.tell(trial, 0.5)
    widths = TuneConfig(budget="0.4x", state_dims=(64, 256))
    trial = study.ask()
    assert suggest(trial, widths).state_dim == trial.params["state_dim"] in (64, 256)


def test_a_rerun_with_another_budget_is_refused_not_silently_resumed(tmp_path):
    """The study's trials were cut to fit the first budget: reusing them under another one
    reported 'budget 1.5 ms' for trials that fit 1.0."""
    from compressm_tune.search._study import open_study

    first = TuneConfig(budget_ms=1.0, out=str(tmp_path), trials=2)
    _propose(open_study(first), first)
    open_study(first)  # the same command resumes
    with pytest.raises(ConfigError, match=r"budget_ms 1.0 \(now 1.5\).*another --out or --study"):
        open_study(dataclasses.replace(first, budget_ms=1.5))
    with pytest.raises(ConfigError, match=r"steps 600 \(now 100\)"):
        open_study(dataclasses.replace(first, steps=100))


def test_an_energy_budget_that_binds_is_named_not_blamed_on_latency(tmp_path):
    """With 4 mJ the job said 'none of 2 trials is predicted to meet 1 ms; raise --budget-ms'."""
    from compressm_tune.search._finalize import infeasible_message
    from compressm_tune.search._study import open_study

    config = TuneConfig(budget_ms=1.0, budget_mj=4.0, out=str(tmp_path), trials=2)
    study = open_study(config)
    for latency, energy in ((-0.2, 1.5), (0.1, 0.5)):  # excess over each budget
        trial = study.ask()
        trial.set_user_attr("constraints", {"latency_ms": latency, "energy_mj": energy})
        study.tell(trial, 0.5)
    message = infeasible_message(config, study)
    assert "1 ms (--budget-ms) met by some, closest 0.8 ms" in message
    assert "4 mJ (--budget-mj) missed by all, closest 4.5 mJ" in message


def test_the_job_holds_out_the_validation_share_it_is_given(tmp_path, monkeypatch):
    """--val-fraction was accepted by the job and never passed on."""
    from compressm_tune.search import _run

    seen = {}

    def load(name, **kwargs):
        seen.update(kwargs)
        raise ConfigError("stop here")

    monkeypatch.setattr(_run, "load_dataset", load)
    with pytest.raises(ConfigError, match="stop here"):
        _run.run_tune(TuneConfig(budget_ms=1.0, out=str(tmp_path), val_fraction=0.3))
    assert seen["val_fraction"] == 0.3


def test_a_training_saving_within_the_models_error_is_not_reported_as_one():
    from compressm_tune.search._report import _training_cost_line

    within = "than the full model's, within the model's error"
    assert f"5% lower {within}" in _training_cost_line(0.05, 0.12)
    assert f"8% higher {within}" in _training_cost_line(-0.08, 0.12)
    assert "40% lower than the full model's (the" in _training_cost_line(0.40, 0.12)
    assert "30% higher than the full model's (the" in _training_cost_line(-0.30, 0.12)
    assert _training_cost_line(0.05, None).endswith("5% lower than the full model's.")
    assert _training_cost_line(None, 0.1) == "Training cost: not modelled."


@pytest.mark.parametrize("saved, error, reads", [
    (0.28, 0.30, "28% lower than the full model's, within"),  # within the fit's error
    (-0.28, 0.30, "28% higher than the full model's, within"),
    (0.28, 0.10, "28% lower than the full model's (the"),  # beyond it
    (-0.28, 0.10, "28% higher than the full model's (the")])
def test_the_training_cost_sentence_says_lower_or_higher_never_a_sign(saved, error, reads):
    """A modelled cost 28% below the full model's reads "28% lower", in both branches."""
    from compressm_tune.search._report import _training_cost_line

    line = _training_cost_line(saved, error)
    assert reads in line and "+" not in line and "-2" not in line


def test_an_interrupted_trial_is_retried_by_the_next_run(tmp_path):
    """Ctrl-C or SIGTERM (both reach the trial as KeyboardInterrupt) fails the running trial;
    the next run retries it with the same parameters, as it does a killed worker's."""
    from compressm_tune.search._study import run_trials

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    calls = []

    def objective(trial):
        calls.append(trial.suggest_float("x", 0.0, 1.0))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return calls[-1]

    with pytest.raises(KeyboardInterrupt):
        run_trials(study, objective, 3)
    run_trials(study, objective, 3)
    trials = study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state.name == "FAIL"]
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(failed) == 1 and len(done) == 3
    assert failed[0].params in [t.params for t in done]  # retried with the same parameters


def test_a_storage_that_cannot_record_a_failed_trial_gives_the_trial_s_own_error(tmp_path,
                                                                                 monkeypatch):
    """A full disk: the trial fails writing its checkpoint, then the storage cannot record
    the failure either, which Optuna reports as an internal assertion. The user sees the
    trial's one-line error instead."""
    from compressm_tune.errors import OutputError
    from compressm_tune.search._study import run_trials

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    storage = study._storage
    record = storage.set_trial_state_values

    def full(trial_id, state, values=None):
        if state == optuna.trial.TrialState.FAIL:
            raise optuna.exceptions.StorageInternalError("database or disk is full")
        return record(trial_id, state, values)

    monkeypatch.setattr(storage, "set_trial_state_values", full)

    def objective(trial):
        raise OutputError("cannot write run/best.pt: no space left on device")

    with pytest.raises(OutputError, match="no space left"):
        run_trials(study, objective, 1)


def test_a_rerun_of_a_relative_budget_keeps_the_studys_calibration_and_does_not_remeasure(
        tmp_path, profile_path, monkeypatch):
    """A resumed study (or a worker joining it) re-ran the calibration's exports and timing
    rounds, only to throw the result away for the study's budget."""
    from compressm_tune.search import _run
    from compressm_tune.search._finalize import CALIBRATION_ROUNDS

    calls = []
    real = _run.calibrate_budget

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    class Stop(Exception):
        pass

    seen = []

    def stop(study, objective, trials, progress):
        seen.append((objective.config.budget_ms, study.user_attrs))
        raise Stop

    class Line:  # a latency that follows the width (this tiny model's barely does)
        def predict(self, dims, metric="latency_ms"):
            return 0.04 + 0.002 * sum(dims)

    def line_model(**kwargs):
        _, profile, notes = real_model(**kwargs)
        return Line(), profile, notes

    real_model = _run.latency_model_for
    monkeypatch.setattr(_run, "latency_model_for", line_model)
    monkeypatch.setattr(_run, "calibrate_budget", counted)
    monkeypatch.setattr(_run, "run_trials", stop)
    config = TuneConfig(budget="0.5x", dataset="lti-sysid", state_dims=(64,), steps=4,
                        trials=1, profile=str(profile_path), out=str(tmp_path / "run"), **SMALL)
    for _ in range(2):
        with pytest.raises(Stop):
            _run.run_tune(config, progress=False)
    assert len(calls) == 1
    (first_ms, attrs), (second_ms, _) = seen
    record = attrs["calibration"]
    assert record["budget_ms"] == first_ms == second_ms == attrs["settings"]["budget_ms"]
    assert record["width"] < 64 and len(record["ratios"]) == CALIBRATION_ROUNDS
