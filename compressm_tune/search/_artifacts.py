"""Where a search keeps the files every worker needs: trial checkpoints and the chosen bundle.

An Optuna artifact store (:mod:`optuna.artifacts`): a folder (``--artifacts DIR`` or
``file:///DIR``), or an S3 bucket (``s3://BUCKET``, with boto3). A trial uploads its files
and records their artifact ids in the study, so any worker that shares the study and the store
exports the best trial, whoever trained it.

The default: a study kept in a file (SQLite, journal; ``OUT/study.db`` unless ``--storage``
says otherwise) keeps its artifacts in the folder ``artifacts`` beside that file, which every
worker that opens the file reaches too. A study on a database server (PostgreSQL, MySQL...) is
shared by machines that share no folder by nature, and no path is right on all of them: there
``--artifacts`` must be given (a folder on a shared filesystem, or a bucket). A local default
would reproduce the failure the store exists to end: the best trial's checkpoint on a machine
the finalizer cannot read.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

from compressm_tune._io import atomic_write
from compressm_tune.errors import (
    ArtifactStoreError,
    CompressmError,
    ConfigError,
    MissingDependencyError,
)

__all__ = ["Artifacts", "FileStore", "check_artifacts", "default_artifacts", "open_artifacts",
           "storage_folder"]


def storage_folder(storage: str | None, out: str | Path) -> Path | None:
    """The folder of the file a study's storage lives in; None for a database server.

    ``None`` (the default storage) is ``OUT/study.db``; an in-memory SQLite database counts
    as ``OUT``.
    """
    if storage is None:
        return Path(out)
    if storage.startswith("journal:"):
        return Path(storage.removeprefix("journal:")).parent
    if storage.startswith("sqlite"):
        database = storage.partition("://")[2].removeprefix("/").partition("?")[0]
        if not database or database == ":memory:":
            return Path(out)
        return Path(database).parent
    return None


def default_artifacts(storage: str | None, out: str | Path) -> str:
    """The store of a study whose ``--artifacts`` is not given: ``artifacts`` beside its file.

    Raises
    ------
    ConfigError
        The study is on a database server: no folder is shared by every machine by default.
    """
    folder = storage_folder(storage, out)
    if folder is None:
        scheme = (storage or "").partition("://")[0]
        raise ConfigError(
            f"--storage {scheme}://... is a database server that workers on several machines "
            "share, but their folders are their own: give --artifacts DIR|URL, a folder every "
            "worker reaches (a shared filesystem) or s3://BUCKET, where trials keep their "
            "checkpoints")
    return str(folder / "artifacts")


def check_artifacts(where: str | None, storage: str | None) -> None:
    """Refuse an ``--artifacts`` value that cannot name a store (or a missing one the storage
    needs), before any work is done and without touching the disk."""
    if where is None:
        if storage is not None and "://" in storage:  # (other values: check_storage's)
            default_artifacts(storage, ".")
        return
    scheme, sep, rest = where.partition("://")
    if not sep or scheme == "file":
        if not (rest if sep else where).strip():
            raise ConfigError(f"--artifacts needs a folder, got {where!r}")
    elif scheme == "s3":
        if not rest.strip("/") or "/" in rest.strip("/"):
            raise ConfigError(f"--artifacts s3://BUCKET names a bucket (no key prefix), got "
                              f"{where!r}")
        if importlib.util.find_spec("boto3") is None:
            raise MissingDependencyError(f"--artifacts {where} needs boto3, which is not "
                                         "installed: pip install boto3")
    else:
        raise ConfigError(f"--artifacts takes a folder, file:///DIR or s3://BUCKET, got {where!r}")


class FileStore(FileSystemArtifactStore):
    """Optuna's folder store, with atomic writes: a file appears under its id only complete,
    so a worker killed mid-upload leaves nothing another worker could read half of."""

    def __init__(self, base_path: str | Path) -> None:
        super().__init__(Path(base_path))
        self.root = Path(base_path)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        if Path(artifact_id).name != artifact_id or artifact_id in ("", ".", ".."):
            raise ValueError(f"invalid artifact id {artifact_id!r}")

        def copy(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                shutil.copyfileobj(content_body, fh)

        atomic_write(self.root / artifact_id, copy)


@dataclass
class Artifacts:
    """An artifact store and where it is (``where``, for messages)."""

    where: str
    store: Any  # an optuna.artifacts store

    def upload(self, owner: optuna.Trial | optuna.Study, files: dict[str, Path]
               ) -> dict[str, str]:
        """Upload ``files`` (name -> path; missing files are skipped) as artifacts of a trial
        or a study; returns name -> artifact id.

        Raises
        ------
        ArtifactStoreError
            A file could not be written to the store (the trial then fails; rerunning the
            command runs a trial in its place).
        """
        ids = {}
        for name, path in files.items():
            if not Path(path).is_file():
                continue
            try:
                ids[name] = upload_artifact(artifact_store=self.store, file_path=str(path),
                                            study_or_trial=owner)
            except Exception as exc:  # OSError, OutputError, botocore's ClientError...
                raise ArtifactStoreError(f"cannot upload {path} to the artifact store "
                                         f"{self.where}: {_reason(exc)}") from None
        return ids

    def fetch(self, ids: dict[str, str], folder: Path, what: str) -> Path:
        """Download the artifacts ``ids`` (name -> id) into ``folder`` as those names (files
        already there, written atomically, are kept); returns ``folder``.

        Raises
        ------
        ArtifactStoreError
            An artifact is not in this store, or the store cannot be read.
        """
        for name, artifact_id in ids.items():
            target = folder / name
            if target.is_file():
                continue
            try:
                with self.store.open_reader(artifact_id) as reader:
                    atomic_write(target, lambda tmp, r=reader: _save(r, tmp))
            except ArtifactNotFound:
                raise ArtifactStoreError(
                    f"{what}'s {name} (artifact {artifact_id}) is not in the artifact store "
                    f"{self.where}: give every worker of the study the same shared "
                    "--artifacts") from None
            except CompressmError:
                raise
            except Exception as exc:
                raise ArtifactStoreError(f"cannot read {what}'s {name} from the artifact store "
                                         f"{self.where}: {_reason(exc)}") from None
        return folder


def _save(reader: BinaryIO, path: str) -> None:
    with open(path, "wb") as fh:
        shutil.copyfileobj(reader, fh)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.strerror and not text.startswith("cannot"):
        text = exc.strerror
    return text.splitlines()[0][:200] if text else type(exc).__name__


def open_artifacts(where: str) -> Artifacts:
    """Open the store ``where`` names and check that it takes a file, creating nothing: a
    folder store's folder is created by its first upload (so a refused run leaves no folder);
    until then the nearest existing folder above it must be writable.

    Raises
    ------
    ArtifactStoreError
        The store cannot be reached or written (one line naming it).
    ConfigError, MissingDependencyError
        ``where`` names no store this machine can open (see :func:`check_artifacts`).
    """
    check_artifacts(where, None)
    if where.startswith("s3://"):
        from optuna.artifacts import Boto3ArtifactStore

        try:
            store: Any = Boto3ArtifactStore(where.removeprefix("s3://").strip("/"))
        except Exception as exc:  # no credentials, no region...
            raise ArtifactStoreError(f"cannot open the artifact store {where}: "
                                     f"{_reason(exc)}") from None
    else:
        folder = Path(where.removeprefix("file://")).absolute()
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir():
            raise ArtifactStoreError(f"the artifact store {where} cannot be a folder: "
                                     f"{existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ArtifactStoreError(f"cannot write to the artifact store {where}: {existing} "
                                     "is not writable")
        store = FileStore(folder)
        if existing != folder:
            return Artifacts(where, store)
    probe = f".probe-{uuid.uuid4().hex}"
    try:
        store.write(probe, io.BytesIO(b"compressm-tune"))
        store.remove(probe)
    except Exception as exc:
        raise ArtifactStoreError(f"cannot write to the artifact store {where}: "
                                 f"{_reason(exc)}") from None
    return Artifacts(where, store)
