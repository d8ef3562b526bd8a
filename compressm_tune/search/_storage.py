"""Where a study lives: a SQLite file by default, any SQLAlchemy URL, or a journal file.

Rerunning the same command resumes the study: trials that finished are kept, and a trial
whose process died (its heartbeat went stale) is marked failed and retried once, so an
interrupt neither loses nor repeats work. Several processes or machines pointed at one URL
share the study, and ``MaxTrialsCallback`` stops them all once ``trials`` are done.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from compressm_tune._io import ensure_dir
from compressm_tune.errors import CompressmError, ConfigError

__all__ = ["open_storage", "StorageError"]

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
