"""Where a study lives: a SQLite file by default, any SQLAlchemy URL, or a journal file.

Rerunning the same command resumes the study: trials that finished are kept, and a trial
whose process died (its heartbeat went stale) is marked failed and retried once, so an
interrupt neither loses nor repeats work. Several processes or machines pointed at one URL
share the study, and ``MaxTrialsCallback`` stops them all once ``trials`` are done.
"""

from __future__ import annotations

import time
import warnings
from datetime import datetime, timedelta
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from compressm_tune._io import ensure_dir
from compressm_tune.errors import CompressmError, ConfigError

__all__ = ["open_storage", "fail_dead_trials", "StorageError"]

_OPEN_TRIES = 5
# what a worker that lost the schema-creation race sees (PostgreSQL, SQLite tables, SQLite's
# alembic_version row)
_TRANSIENT = ("already exists", "database is locked", "duplicate key",
              "UNIQUE constraint failed")
HEARTBEAT_S = 4  # a RUNNING trial silent for GRACE_S seconds belonged to a dead process
GRACE_S = 12


class StorageError(CompressmError, RuntimeError):
    """The study storage cannot be reached or opened."""


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


def fail_dead_trials(study: optuna.Study) -> None:
    """Fail the RUNNING trials of dead workers, each retried once as a WAITING trial.

    Optuna fails those whose heartbeat went stale, but never one that has no heartbeat at all:
    a worker killed between creating its trial and the first beat (milliseconds right after
    the previous trial finished; a CI run's kill landed there) left it RUNNING for good, and
    every rerun then waited on a "worker still running". A live worker beats within
    milliseconds of creating its trial, so a heartbeat-less trial older than ``GRACE_S`` is
    dead (its start time is the creating machine's clock: skew between machines must stay
    well below ``GRACE_S``, as NTP keeps it).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    backend = getattr(study._storage, "_backend", study._storage)  # behind Optuna's cache
    if not isinstance(backend, RDBStorage) or backend.heartbeat_interval is None:
        return
    from optuna.storages._rdb.models import TrialHeartbeatModel

    cutoff = datetime.now() - timedelta(seconds=GRACE_S)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    old = [t for t in running if t.datetime_start is not None and t.datetime_start < cutoff]
    if not old:
        return
    session = backend.scoped_session()
    try:
        beating = {row.trial_id for row in session.query(TrialHeartbeatModel.trial_id).filter(
            TrialHeartbeatModel.trial_id.in_([t._trial_id for t in old]))}
    finally:
        session.close()
    retry = backend.get_heartbeat_stale_trial_callback()
    for trial in old:
        if trial._trial_id in beating:
            continue  # Optuna's own rule judged it above
        try:
            failed = study._storage.set_trial_state_values(
                trial._trial_id, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed (or its owner finished) it first
        if failed and retry is not None:
            retry(study, study._storage.get_trial(trial._trial_id))


def _retry_stale() -> dict:
    """Retry a dead worker's trial once: Optuna 5's callback, or Optuna 4's older name
    (called under the caller's suppression of experimental warnings)."""
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        cb = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
        return {"heartbeat_stale_trial_callback": cb}
    return {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)}


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
