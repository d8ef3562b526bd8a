"""Where a study lives: a SQLite file by default, any SQLAlchemy URL, or a journal file.

Rerunning the same command resumes the study: trials that finished are kept, and a trial
whose process died (its heartbeat went stale: Optuna's in a database, :func:`keep_alive`'s in a
journal file) is marked failed and retried once, so an interrupt neither loses nor repeats
work. Several processes or machines pointed at one URL share the study.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from compressm_tune._io import ensure_dir
from compressm_tune.errors import ConfigError, StorageError

__all__ = ["open_storage", "fail_dead_trials", "keep_alive", "StorageError"]

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
    elif "://" not in url:
        raise ConfigError(f"storage must be a SQLAlchemy URL or journal:PATH, got {url!r}")


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


def _rdb(study: optuna.Study) -> RDBStorage | None:
    backend = getattr(study._storage, "_backend", study._storage)  # behind Optuna's cache
    return backend if isinstance(backend, RDBStorage) else None


@contextlib.contextmanager
def keep_alive(trial: optuna.Trial) -> Iterator[None]:
    """Beat for ``trial`` while the block runs, where the storage has no heartbeats of its own.

    Optuna's heartbeats exist only in database storages; in a journal file a killed worker's
    trial stayed RUNNING for good, and every rerun waited on it. Here a thread records the
    time in a system attribute of the trial every ``HEARTBEAT_S`` seconds, which
    :func:`fail_dead_trials` reads.
    """
    if _rdb(trial.study) is not None:
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
    the previous trial finished; a CI run's kill landed there) left it RUNNING for good, and
    every rerun then waited on a "worker still running". A live worker beats within
    milliseconds of creating its trial, so a heartbeat-less trial older than ``GRACE_S`` is
    dead. In a journal file, which has no heartbeats, the beats are :func:`keep_alive`'s.
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
    rdb = _rdb(study)
    if dead and rdb is not None:  # there, only trials without a heartbeat row are left
        from optuna.storages._rdb.models import TrialHeartbeatModel

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
