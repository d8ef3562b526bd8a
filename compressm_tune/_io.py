"""Atomic file writes: the one way checkpoints, profiles, bundles and caches reach disk."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compressm_tune.errors import OutputError

__all__ = ["atomic_write", "atomic_write_text", "ensure_dir", "read_json"]

_UNWRITABLE = {
    errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system", errno.ENOTDIR: "a path component is a file",
    errno.EEXIST: "a path component is a file",
}


def atomic_write(path: str | Path, write: Callable[[str], object], mode: int | None = None
                 ) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it onto ``path``.

    An interrupt or error leaves the old file (if any) intact and no temporary file behind.
    ``mode`` sets the permissions (``mkstemp`` creates 0600); parent folders are created.
    A full disk or a folder that cannot be written is an :class:`OutputError` in one line
    naming the path (and, for a full disk, how much was written and how much is free).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        written = _size(tmp)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        reason = _why_unwritable(exc)
        if reason is None:
            raise
        if reason == "no space left on device":
            free = shutil.disk_usage(path.parent).free
            reason += f" ({written} bytes written before it filled, {free} bytes free)"
        raise OutputError(f"cannot write {path}: {reason}") from None
    return path


def ensure_dir(path: str | Path) -> Path:
    """Create the folder ``path`` (and parents), or raise a one-line :class:`OutputError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder {path}: "
                          f"{_why_unwritable(exc) or exc.strerror}") from None
    return path


def _size(tmp: str | None) -> int:
    try:
        return os.path.getsize(tmp) if tmp else 0
    except OSError:
        return 0


def _why_unwritable(exc: BaseException) -> str | None:
    """A short reason when ``exc`` says the disk or folder refuses writes, else None.
    torch.save reports a full disk as a RuntimeError from its zip writer, not an OSError."""
    if isinstance(exc, OSError) and exc.errno in _UNWRITABLE:
        return _UNWRITABLE[exc.errno]
    if isinstance(exc, RuntimeError) and ("inline_container" in str(exc)
                                          or "file write failed" in str(exc)):
        return "no space left on device"
    return None


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | Path) -> Any | None:
    """The JSON in ``path``, or None when the file is missing, unreadable or not valid JSON
    (a file cut short by a crash of an older version reads as absent, not as a traceback)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
