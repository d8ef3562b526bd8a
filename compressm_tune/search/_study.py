"""The Optuna study: where it lives, how trials are proposed, and which worker finalizes.

A study lives in a SQLite file by default, any SQLAlchemy URL, or a journal file. Rerunning
the same command resumes it: finished trials are kept, and a trial whose process died (its
heartbeat went stale: Optuna's in a database, :func:`keep_alive`'s in a journal file) is
marked failed and retried once, so an interrupt neither loses nor repeats work. Several
processes or machines pointed at one storage share the study: the slot guard keeps its trial
count exact, and ``_elect`` elects the one worker that exports and reports.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages._rdb.models import TrialHeartbeatModel
from optuna.storages.journal import JournalFileBackend

from compressm_tune._io import ensure_dir
from compressm_tune.errors import CompressmError, ConfigError, StorageError
from compressm_tune.search._config import TuneConfig
from compressm_tune.search._objective import constraints_of

__all__ = [
    "check_storage",
    "fail_dead_trials",
    "keep_alive",
    "open_storage",
    "open_study",
    "rdb_of",
    "run_trials",
]

_OPEN_TRIES = 5
# what a worker that lost the schema-creation race sees (PostgreSQL, SQLite tables, SQLite's
# alembic_version row)
_TRANSIENT = ("already exists", "database is locked", "duplicate key",
              "UNIQUE constraint failed")
HEARTBEAT_S = 4  # a RUNNING trial silent for GRACE_S seconds belonged to a dead process
GRACE_S = 12
ALIVE_KEY = "compressm_alive_s"  # journal storages: the trial's last beat (epoch seconds)


def check_storage(url: str | None) -> None:
    """Refuse a ``--storage`` value that cannot name a storage, before any work is done."""
    if url is None:
        return
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        if not url.removeprefix("journal:") or path.is_dir():
            raise ConfigError(f"--storage journal:PATH needs a file path, got {url!r}"
                              + (" (a folder)" if path.is_dir() else ""))
        if path.is_file() and path.stat().st_size and not _is_journal(path):
            raise ConfigError(f"{path} is not an Optuna journal (its first line is not a "
                              "journal record); refusing to append to it: name a new file")
    elif "://" not in url:
        raise ConfigError(f"storage must be a SQLAlchemy URL or journal:PATH, got {url!r}")


def _is_journal(path: Path) -> bool:
    """Whether the file's first line is an Optuna journal record (a JSON object with an
    ``op_code``), read without writing a byte."""
    try:
        with open(path, "rb") as fh:
            first = fh.readline(1 << 16)
        record = json.loads(first)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "op_code" in record


def open_storage(url: str | None, out_dir: Path) -> optuna.storages.BaseStorage:
    """Open ``url`` (``None``: ``sqlite:///OUT/study.db``; ``journal:PATH``: a journal file).

    Raises
    ------
    StorageError
        The database cannot be reached (the message names the URL, without its password).
    """
    if url is None:
        ensure_dir(out_dir)
        url = f"sqlite:///{(out_dir / 'study.db').resolve()}"
    check_storage(url)
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        ensure_dir(path.parent)
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise StorageError(f"cannot open journal {path}: {exc.strerror}") from None
    attempt = 0
    while True:
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                    **_retry_stale(), engine_kwargs=None if url.startswith("sqlite") else {
                        "pool_pre_ping": True},
                )
        except Exception as exc:  # SQLAlchemy raises driver-specific types
            reason = str(exc).splitlines()[0][:200]
            attempt += 1
            # Workers starting together race to create the schema; the loser just retries.
            if attempt >= _OPEN_TRIES or not any(m in reason for m in _TRANSIENT):
                raise StorageError(
                    f"cannot open study storage {_redact(url)}: {reason}") from None
            time.sleep(0.5 * attempt)


def rdb_of(study: optuna.Study) -> RDBStorage | None:
    """The study's database storage, or None (a journal file)."""
    backend = getattr(study._storage, "_backend", study._storage)  # behind Optuna's cache
    return backend if isinstance(backend, RDBStorage) else None


@contextlib.contextmanager
def keep_alive(trial: optuna.Trial) -> Iterator[None]:
    """Beat for ``trial`` while the block runs, where the storage has no heartbeats of its own.

    Optuna's heartbeats exist only in database storages; without beats a killed worker's trial
    in a journal file would stay RUNNING for good. Here a thread records the time in a system
    attribute of the trial every ``HEARTBEAT_S`` seconds, which :func:`fail_dead_trials` reads.
    """
    if rdb_of(trial.study) is not None:
        yield
        return
    storage, stop = trial.study._storage, threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.set_trial_system_attr(trial._trial_id, ALIVE_KEY, time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # failed by another worker that took this one for dead
            if stop.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, name="compressm-keep-alive", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_dead_trials(study: optuna.Study) -> None:
    """Fail the RUNNING trials of dead workers, each retried once as a WAITING trial.

    Optuna fails those whose heartbeat went stale, but never one that has no heartbeat at all:
    a worker killed between creating its trial and the first beat (milliseconds right after
    the previous trial finished) would leave it RUNNING for good, and every rerun would wait
    on it. A live worker beats within milliseconds of creating its trial, so a heartbeat-less
    trial older than ``GRACE_S`` is dead. In a journal file, which has no heartbeats, the
    beats are :func:`keep_alive`'s.
    Times are the creating machine's clock: skew between machines must stay well below
    ``GRACE_S``, as NTP keeps it.
    """
    with warnings.catch_warnings():  # heartbeats and their retry callback are experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
        _fail_silent_trials(study)


def _fail_silent_trials(study: optuna.Study) -> None:
    """The heartbeat-less and journal half of :func:`fail_dead_trials`."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    cutoff = time.time() - GRACE_S
    dead = [t for t in running if t.datetime_start is not None and max(
        t.datetime_start.timestamp(), t.system_attrs.get(ALIVE_KEY, 0.0)) < cutoff]
    rdb = rdb_of(study)
    if dead and rdb is not None:  # there, only trials without a heartbeat row are left
        session = rdb.scoped_session()
        try:
            beating = {row.trial_id for row in session.query(TrialHeartbeatModel.trial_id)
                       .filter(TrialHeartbeatModel.trial_id.in_([t._trial_id for t in dead]))}
        finally:
            session.close()
        dead = [t for t in dead if t._trial_id not in beating]
    for trial in dead:
        try:
            failed = study._storage.set_trial_state_values(
                trial._trial_id, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed (or its owner finished) it first
        if failed:
            _retry_callback()(study, study._storage.get_trial(trial._trial_id))


def _retry_callback():
    """Retry a dead worker's trial once (Optuna 5's name, or Optuna 4's older one; callers
    suppress its experimental warning)."""
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    return (cls or optuna.storages.RetryFailedTrialCallback)(max_retry=1)


def _retry_stale() -> dict:
    """The retry callback under the keyword this Optuna's RDBStorage takes."""
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        return {"heartbeat_stale_trial_callback": _retry_callback()}
    return {"failed_trial_callback": _retry_callback()}


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


# ----------------------------------------------------------------------------- proposals


def _reseed(sampler: Any, seed: int) -> None:
    """Seed a sampler's random streams (its own and its startup sampler's) to ``seed``."""
    for depth, obj in enumerate((sampler, getattr(sampler, "_random_sampler", None))):
        rng = getattr(obj, "_rng", None)
        if rng is not None and hasattr(rng, "rng"):
            rng.rng.seed((seed + 7919 * depth) % 2**32)


class _TrialSeeded:
    """Reseed the sampler from (study seed, trial number) before every trial.

    A sampler seeded once per process proposes the same first points in every process, so
    each worker sharing a study, and each rerun after a kill, would replay the same trials.
    Trial numbers are unique across workers and continue after a resume, so every trial gets
    its own stream, and a single uninterrupted run still proposes exactly the same trials.
    """

    def __init__(self, *args: Any, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, seed=seed, **kwargs)
        self._study_seed = seed

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        super().before_trial(study, trial)
        _reseed(self, self._study_seed * 1_000_003 + trial.number)


class _TPESampler(_TrialSeeded, optuna.samplers.TPESampler):
    pass


class _NSGAIISampler(_TrialSeeded, optuna.samplers.NSGAIISampler):
    pass


def open_study(config: TuneConfig, storage: optuna.storages.BaseStorage | None = None
               ) -> optuna.Study:
    """Create or resume the study ``config`` names (in ``storage`` when the caller has opened
    it), refusing one run with other settings."""
    if storage is None:
        storage = open_storage(config.storage, Path(config.out))
    # Optuna 5 samplers read constraints recorded with trial.set_constraint; Optuna 4 needs them
    # passed as constraints_func (deprecated in 5).
    legacy = {} if hasattr(optuna.Trial, "set_constraint") else {
        "constraints_func": constraints_of}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if config.pareto:
            sampler = _NSGAIISampler(seed=config.seed, **legacy)
            kw: dict[str, Any] = {"directions": ["maximize", "minimize"]}
        else:
            sampler = _TPESampler(seed=config.seed, n_startup_trials=min(4, config.trials),
                                  **legacy)
            kw = {"direction": "maximize"}
    study = optuna.create_study(
        storage=storage, study_name=config.study, load_if_exists=True, sampler=sampler,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3), **kw)
    if len(study.directions) != (2 if config.pareto else 1):
        raise ConfigError(f"study {config.study!r} exists with {len(study.directions)} "
                          "objective(s); use another --study name to switch --pareto")
    _check_settings(study, config)
    return study


def saved_settings(storage: optuna.storages.BaseStorage, name: str) -> dict[str, Any] | None:
    """The settings study ``name`` in ``storage`` was begun with; None while it does not exist
    (a rerun or another worker then keeps what the first run measured, e.g. a relative
    budget's calibration, instead of measuring again)."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # Optuna's "no such study"
        return None
    return study.user_attrs.get("settings")


def _settings(config: TuneConfig) -> dict[str, Any]:
    """What a study's trials depend on: rerunning with other values is another study (trials
    cut to fit one budget answer nothing about another). The seed is not among them: workers
    of one study may use their own. ``budget_ms`` is the budget in milliseconds, resolved from
    a relative ``budget`` on this machine when one is given."""
    return {"budget_ms": config.budget_ms, "budget": config.budget, "budget_mj": config.budget_mj,
            "latency_mode": config.latency_mode, "arch": config.arch, "dataset": config.dataset,
            "steps": config.steps, "blocks": config.blocks, "hidden": config.hidden,
            "state_dims": sorted(config.state_dims), "batch_size": config.batch_size,
            "val_fraction": config.val_fraction, "adaptive": dict(vars(config.adaptive))}


def _check_settings(study: optuna.Study, config: TuneConfig) -> None:
    """Record the settings in a new study; refuse to resume one recorded with others."""
    settings = _settings(config)
    saved = study.user_attrs.get("settings")
    if saved is None:
        study.set_user_attr("settings", settings)
        return
    compared = dict(settings)
    if config.budget is not None and saved.get("budget") == config.budget:
        # the same relative budget resolves to slightly other ms as the machine drifts: the
        # caller keeps the study's
        compared["budget_ms"] = saved.get("budget_ms")
    if any(saved.get(k) != v for k, v in compared.items()):  # a key added since reads None
        diff = ", ".join(f"{k} {saved.get(k)} (now {v})" for k, v in compared.items()
                         if saved.get(k) != v)
        raise ConfigError(f"study {config.study!r} in this storage was run with {diff}: its "
                          "trials answer another question; use another --out or --study")


# ----------------------------------------------------------------------------- running

_FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
_SEARCH_PASSES = 3  # a search pass, then retries of trials found dead after it


SURPLUS = "surplus"  # user attr of a trial started after the study was full


class _Surplus(Exception):
    """Raised inside a trial started after the study already had its trials (other workers)."""


def _slot_guard(objective: Callable[[optuna.Trial], Any], trials: int):
    """Wrap the objective so the study ends with exactly ``trials`` finished trials even
    when several workers share it: a trial numbered past the quota stops its worker."""

    def run(trial: optuna.Trial):
        earlier = [t for t in trial.study.get_trials(deepcopy=False)
                   if t.number < trial.number and t.state != optuna.trial.TrialState.FAIL]
        if len(earlier) >= trials:
            trial.set_user_attr(SURPLUS, True)  # not one of the study's trials: reports skip it
            trial.study.stop()
            raise _Surplus(f"the study already has {trials} trials")
        try:
            with keep_alive(trial):
                return objective(trial)
        except CompressmError as exc:
            run.error = exc  # what to tell the user if the storage cannot record the failure
            raise
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM: the trial is retried once by the next run, as a killed
            # worker's is (Optuna then marks this one failed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                _retry_callback()(trial.study, trial.study._storage.get_trial(trial._trial_id))
            raise

    run.error = None
    return run


def run_trials(study: optuna.Study, objective: Callable[[optuna.Trial], Any],
               trials: int, progress: bool = True) -> list[int]:
    """Run trials until the study has ``trials`` finished ones (counting other workers'),
    with Optuna's progress bar if ``progress``; returns the numbers of trials other workers
    are still running."""
    # ERROR: a surplus trial's failure is bookkeeping, not news (Optuna logs every failed
    # trial with its traceback at WARNING); any other failure propagates to the caller anyway
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for _ in range(_SEARCH_PASSES):
        fail_dead_trials(study)  # before the slot guard counts a dead worker's trial as live
        finished = len(study.get_trials(states=_FINISHED))
        if finished < trials:
            guarded = _slot_guard(objective, trials)
            try:
                study.optimize(guarded, n_trials=trials - finished, catch=(_Surplus,),
                               show_progress_bar=progress, gc_after_trial=True)
            except (AssertionError, optuna.exceptions.StorageInternalError) as exc:
                raise _unrecorded(exc, guarded.error) from None
        others = _still_running(study)
        # a dead worker's trial found stale only now is queued for a retry (WAITING):
        # this worker runs it, unless live workers still hold trials of their own
        if others or not _waiting(study):
            break
    return others


def _unrecorded(exc: BaseException, trial_error: BaseException | None) -> BaseException:
    """What to raise when the storage could not record a trial's end (a full disk under
    SQLite ends in Optuna's "Should not reach" assertion): ``trial_error``, the error of ours
    that ended the trial, else a one-line StorageError; anything else unchanged."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if not any(isinstance(e, optuna.exceptions.StorageInternalError) for e in chain):
        return exc
    if trial_error is not None:
        return trial_error
    root = str(chain[-1]).strip().splitlines()[0] if str(chain[-1]).strip() else ""
    return StorageError(f"the study's storage could not record a trial ({root}); the trial "
                        "is retried when the same command is rerun")


def _still_running(study: optuna.Study) -> list[int]:
    """Trials other workers are still running (those of dead workers are failed first,
    which queues their retry as a WAITING trial)."""
    fail_dead_trials(study)
    running = (optuna.trial.TrialState.RUNNING,)
    return [t.number for t in study.get_trials(deepcopy=False, states=running)]


def _waiting(study: optuna.Study) -> list[int]:
    waiting = (optuna.trial.TrialState.WAITING,)
    return [t.number for t in study.get_trials(deepcopy=False, states=waiting)]
