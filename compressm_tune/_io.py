"""Atomic file writes: the one way checkpoints, profiles, bundles and caches reach disk."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from compressm_tune.errors import OutputError

__all__ = ["FolderLock", "atomic_write", "atomic_write_text", "ensure_dir", "made_dir", "read_json",
           "require_space", "why_unwritable"]

_UNWRITABLE = {
    errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system", errno.ENOTDIR: "a path component is a file",
    errno.EEXIST: "a path component is a file", errno.EISDIR: "it is a folder",
    errno.ENOENT: "a folder on its path does not exist and cannot be made",
}
# torch's writers report a failed write as a RuntimeError of its C++ stream or zip writer
_TORCH_WRITE_FAILURES = ("inline_container", "file write failed", "basic_ios", "iostream error",
                         "unexpected pos")
_LOW_SPACE = 16 * 2**20  # bytes: a disk with less free space than this is taken as full


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
        reason = why_unwritable(exc, path.parent, written)
        if reason is None:
            raise
        raise OutputError(f"cannot write {path}: {reason}") from None
    return path


def ensure_dir(path: str | Path) -> Path:
    """Create the folder ``path`` (and parents), or raise a one-line :class:`OutputError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder {path}: "
                          f"{why_unwritable(exc, path.parent) or exc.strerror}") from None
    return path


@contextlib.contextmanager
def made_dir(path: str | Path) -> Iterator[Path]:
    """:func:`ensure_dir` for a block that may still refuse: when the block fails, the folder
    is removed again if this call made it and it is still empty (a refused run leaves none)."""
    path = Path(path)
    existed = path.exists()
    made = ensure_dir(path)
    try:
        yield made
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):
                made.rmdir()
        raise


def _size(tmp: str | None) -> int:
    try:
        return os.path.getsize(tmp) if tmp else 0
    except OSError:
        return 0


def _file_size_limit() -> int | None:
    """The process's file size limit in bytes (``ulimit -f``), or None when unlimited."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _free_bytes(folder: Path) -> int | None:
    for candidate in (folder, *folder.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def why_unwritable(exc: BaseException, folder: str | Path = ".", written: int = 0
                   ) -> str | None:
    """A one-line reason when ``exc`` says a write into ``folder`` was refused, else None.

    Tells a full disk (with the bytes written and free), the file size limit and a folder that
    refuses writes apart, whether the error came from Python (``OSError``) or from torch's
    writers, which report a failed write as a ``RuntimeError``.
    """
    folder = Path(folder)
    limit = _file_size_limit()
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG or (
            limit is not None and written >= limit and isinstance(exc, (OSError, RuntimeError))):
        return f"the file size limit (ulimit -f) of {limit} bytes was reached"
    free = _free_bytes(folder)
    full = (f"no space left on device ({written} bytes written before it filled, "
            f"{free} bytes free)")
    if isinstance(exc, OSError) and exc.errno in _UNWRITABLE:
        reason = _UNWRITABLE[exc.errno]
        return full if reason == "no space left on device" else reason
    if isinstance(exc, RuntimeError) and any(s in str(exc) for s in _TORCH_WRITE_FAILURES):
        if free is not None and free < _LOW_SPACE:
            return full
        return f"the write failed ({str(exc).strip().splitlines()[0][:120]})"
    return None


def require_space(folder: str | Path, needed: int, what: str, largest: int | None = None
                  ) -> None:
    """Refuse, before writing, output that this disk (or ``ulimit -f``) cannot hold.

    Some writers cannot fail cleanly once started (TorchScript's aborts the process on a full
    disk), so their callers check here first with a generous estimate ``needed`` in bytes.
    """
    folder = Path(folder)
    free = _free_bytes(folder)
    if free is not None and free < needed:
        raise OutputError(f"cannot write {what} in {folder}: it needs about {needed} bytes and "
                          f"the disk has {free} bytes free")
    limit, largest = _file_size_limit(), needed if largest is None else largest
    if limit is not None and limit < largest:
        raise OutputError(f"cannot write {what} in {folder}: it needs files up to about "
                          f"{largest} bytes and the file size limit (ulimit -f) is {limit} bytes")


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


class FolderLock:
    """An exclusive lock on ``folder/name`` that the kernel releases when the process dies.

    ``acquire()`` returns False when another live process holds it. Two runs writing into one
    folder would interleave their logs and overwrite each other's checkpoints; a lock file
    whose holder died (a kill -9) does not block anyone, unlike a file that merely exists.
    """

    def __init__(self, folder: str | Path, name: str = ".lock") -> None:
        self.path = Path(folder) / name
        self._fh: Any = None

    def acquire(self) -> bool:
        fh = open(self.path, "a+")
        try:
            if os.name == "nt":
                import msvcrt

                msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return True

    def holder(self) -> str:
        """The pid the holder wrote, for messages ("?" when unreadable)."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor releases the lock
            self._fh = None
