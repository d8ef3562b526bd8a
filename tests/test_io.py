"""Writes that cannot happen (full disk, no permission, a file where a folder should be) are one
line naming the path, leave the previous file intact and leave no temporary file behind."""

from __future__ import annotations

import errno

import pytest
import torch

from compressm_tune._io import atomic_write, atomic_write_text, ensure_dir
from compressm_tune.cli import main
from compressm_tune.errors import OutputError
from compressm_tune.models import SSMConfig, SSMModel
from compressm_tune.training.checkpoint import save_checkpoint


def _failing(exc: BaseException):
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(b"x" * 1000)  # part of the file made it before the failure
        raise exc
    return write


@pytest.mark.parametrize("exc,reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
    # what torch.save raises when the disk fills under its zip writer
    (RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
                  "writing file data/0: file write failed"), "no space left on device"),
])
def test_unwritable_is_one_line_keeps_the_old_file_and_leaves_no_debris(tmp_path, exc, reason,
                                                                       monkeypatch):
    if isinstance(exc, RuntimeError):  # torch's failure reads as a full disk when it is full
        _disk_is_full(monkeypatch)
    target = tmp_path / "summary.json"
    atomic_write_text(target, "old")
    with pytest.raises(OutputError) as err:
        atomic_write(target, _failing(exc))
    message = str(err.value)
    assert "\n" not in message and str(target) in message and reason in message
    if reason == "no space left on device":
        assert "1000 bytes written" in message and "bytes free" in message
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def _disk_is_full(monkeypatch) -> None:
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))


def test_a_torch_write_failure_with_space_left_is_not_called_a_full_disk(tmp_path):
    exc = RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
                       "writing file data/0: file write failed")
    with pytest.raises(OutputError) as err:
        atomic_write(tmp_path / "f.pt", _failing(exc))
    message = str(err.value)
    assert "\n" not in message and "the write failed" in message
    assert "no space left" not in message


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(ZeroDivisionError):
        atomic_write(tmp_path / "f", lambda tmp: 1 / 0)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """torch.save's own failure on a full disk, not a 38-line traceback."""
    model = SSMModel(SSMConfig(d_model=4, state_dims=[3]))

    def full(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                           "failed writing file data/3: file write failed")

    monkeypatch.setattr(torch, "save", full)
    _disk_is_full(monkeypatch)
    with pytest.raises(OutputError, match=r"last\.pt: no space left on device"):
        save_checkpoint(tmp_path / "last.pt", model)
    assert list(tmp_path.iterdir()) == []


def test_a_file_where_the_run_folder_should_be(tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot create the folder"):
        ensure_dir(blocker / "run")
    code = main(["train", "--dataset", "lti-sysid", "--steps", "2", "--blocks", "1",
                 "--hidden", "4", "--state-dim", "4", "--no-progress", "--out", str(blocker)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(blocker) in err[0]
