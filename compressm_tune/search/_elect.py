"""Which worker of a study exports and reports: elected through the study's own storage.

Workers that share a study share its storage, not a folder. On a database server the
election is a lock of that server that it releases with the connection: a PostgreSQL
advisory lock (``pg_try_advisory_lock``) or MySQL's ``GET_LOCK``, keyed by the study. A
finalizer that dies (killed, its machine lost) closes its connection, or the server drops it,
and the lock is free for a rerun at once; no lease to expire, no clocks to agree. A study in
a file (SQLite, journal) is shared by the processes that open that file, so the lock is a
:class:`~compressm_tune._io.FolderLock` beside it, which the kernel releases when its holder
dies. The winner records who it is in the study, so the others can say who finishes.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import optuna
import sqlalchemy

from compressm_tune._io import FolderLock
from compressm_tune.errors import StorageError
from compressm_tune.search._artifacts import storage_folder
from compressm_tune.search._config import TuneConfig
from compressm_tune.search._study import GRACE_S, rdb_of

__all__ = ["FINALIZER_KEY", "finalize_lock", "finalizer", "study_lock"]

FINALIZER_KEY = "compressm:finalizer"  # study system attr: who finalizes (host, pid, out)
_LOCK_CLASS = 0x636D7074  # "cmpt": the first key of this package's PostgreSQL advisory locks
_SERVER_LOCKS = {  # dialect: (take without waiting, release); both return 1/true on success
    "postgresql": ("SELECT pg_try_advisory_lock(:cls, :study)",
                   "SELECT pg_advisory_unlock(:cls, :study)"),
    "mysql": ("SELECT GET_LOCK(SHA1(CONCAT(DATABASE(), '/', :cls, '/', :study)), 0)",
              "SELECT RELEASE_LOCK(SHA1(CONCAT(DATABASE(), '/', :cls, '/', :study)))"),
}
_SERVER_LOCKS["mariadb"] = _SERVER_LOCKS["mysql"]


@contextlib.contextmanager
def finalizer(study: optuna.Study, config: TuneConfig, others: list[int]) -> Iterator[str | None]:
    """Elect the one worker that exports and reports: yields ``None`` to it, and to every
    other worker the reason it does not.

    That is the last worker to finish while no trial ``others`` still runs elsewhere, under
    :func:`study_lock`.
    """
    if others:
        yield (f"trial(s) {others} still run in other workers; the last of them to finish "
               f"exports and reports (if a worker died, rerun this command after {GRACE_S} s)")
        return
    with study_lock(study, config) as mine:
        if not mine:
            yield f"{_holder(study)} is exporting and reporting"
            return
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "out": str(Path(config.out).resolve())}
        study._storage.set_study_system_attr(study._study_id, FINALIZER_KEY, me)
        yield None


def _holder(study: optuna.Study) -> str:
    """Who holds the election, as the winner recorded it."""
    who = study._storage.get_study_system_attrs(study._study_id).get(FINALIZER_KEY)
    if not isinstance(who, dict):
        return "another worker"
    return f"another worker (pid {who.get('pid')} on {who.get('host')}, into {who.get('out')})"


@contextlib.contextmanager
def study_lock(study: optuna.Study, config: TuneConfig) -> Iterator[bool]:
    """Yield True to the one process holding the study's finalizer lock, False to others: a
    lock of the database server, else a lock file beside the study's file (OUT for a
    storage this package cannot lock through)."""
    rdb = rdb_of(study)
    dialect = rdb.engine.dialect.name if rdb is not None else None
    if dialect in _SERVER_LOCKS:
        with _server_lock(rdb.engine, dialect, study._study_id) as mine:
            yield mine
        return
    folder = storage_folder(config.storage, config.out) or Path(config.out)
    with finalize_lock(folder, f".finalize-{study._study_id}.lock") as mine:
        yield mine


@contextlib.contextmanager
def _server_lock(engine: sqlalchemy.Engine, dialect: str, study_id: int) -> Iterator[bool]:
    """A session lock of the database server on its own connection, held while the block
    runs and released with the connection if this process dies."""
    take, release = (sqlalchemy.text(sql) for sql in _SERVER_LOCKS[dialect])
    params = {"cls": _LOCK_CLASS, "study": study_id}
    conn = None
    try:
        conn = engine.connect()
        mine = bool(conn.execute(take, params).scalar())
        conn.commit()  # a session lock outlives the transaction
    except sqlalchemy.exc.SQLAlchemyError as exc:
        if conn is not None:
            conn.close()
        reason = str(exc).splitlines()[0][:200]
        raise StorageError(f"cannot take the finalizer lock in the study's database: "
                           f"{reason}") from None
    try:
        yield mine
    finally:
        try:
            if mine:
                conn.execute(release, params)
                conn.commit()
        except sqlalchemy.exc.SQLAlchemyError:
            conn.invalidate()  # closed, not pooled: the server releases the lock with it
        conn.close()


@contextlib.contextmanager
def finalize_lock(folder: Path, name: str = ".finalize.lock") -> Iterator[bool]:
    """Yield True for the one process that holds ``folder/name``, False for others."""
    lock = FolderLock(folder, name)
    if not lock.acquire():
        yield False
        return
    try:
        yield True
    finally:
        lock.release()
