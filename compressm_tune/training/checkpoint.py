"""Checkpoints: config + weights (+ optimizer, step, RNG), written atomically.

A checkpoint stores ``asdict(model.config)`` with the *current* per-layer widths, so the
model is rebuilt from the file alone after any number of reductions (nanoGPT's ``model_args``
habit). Files are written to a temporary name in the same directory and renamed, so an
interrupt never leaves a half-written checkpoint, and they load with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any

import torch

from compressm_tune._device import resolve_device
from compressm_tune._io import atomic_write
from compressm_tune.errors import CheckpointError
from compressm_tune.models import SSMConfig, SSMModel

__all__ = ["save_checkpoint", "load_checkpoint", "model_from_checkpoint", "file_sha256"]

FORMAT = "compressm-tune/checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, model: SSMModel, **extra: Any) -> None:
    """Write ``model`` (config + state_dict) and any ``extra`` entries atomically.

    ``extra`` holds what a resume needs (``optimizer``, ``step``, ``rng``, ``train_config``,
    ``metrics``, ``dataset``); values must be tensors, numbers, strings, lists or dicts so the
    file loads with ``weights_only=True``.
    """
    payload = {"format": FORMAT, "version": VERSION, "model_config": model.config.to_dict(),
               "model": model.state_dict(), **extra}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate a checkpoint written by :func:`save_checkpoint`.

    Raises
    ------
    CheckpointError
        The file is missing, not a torch file, truncated, or not one of ours.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    _check_crc(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        text = str(exc)
        if not zipfile.is_zipfile(path):  # every torch.save since torch 1.6 writes a zip
            raise CheckpointError(f"cannot read checkpoint {path}: not a zip archive (cut short, "
                                  "or not a torch checkpoint)") from None
        if "weights_only" in text or "Unsupported global" in text:
            # a pickle that names code to run: torch's message goes on to suggest loading it
            # with weights_only=False, which would run that code; never pass that on
            raise CheckpointError(f"refusing to unpickle code from {path}: it is not a plain "
                                  "checkpoint of tensors and numbers") from None
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a compressm-tune checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {payload.get('version')!r}; this build reads {VERSION}"
        )
    for key in ("model_config", "model"):
        if key not in payload:
            raise CheckpointError(f"{path} lacks the {key!r} entry")
    return payload


def _check_crc(path: Path) -> None:
    """torch.load does not verify the zip CRCs, so damaged tensor bytes would load silently
    as wrong weights; check them first (a non-zip file is left to torch.load to reject)."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError, ValueError,
            NotImplementedError) as exc:  # damaged headers fail in any of these
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: a damaged archive ({reason})"
                              ) from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupted: CRC mismatch in {bad}")


def model_from_checkpoint(payload_or_path: dict[str, Any] | str | Path,
                          device: torch.device | str = "cpu") -> SSMModel:
    """Rebuild the exact model (widths and weights) stored in a checkpoint, on ``device``
    (a checkpoint written on either device loads on either)."""
    payload = payload_or_path if isinstance(payload_or_path, dict) else load_checkpoint(
        payload_or_path)
    try:
        model = SSMModel(SSMConfig(**payload["model_config"]))
        # checkpoints written before blocks held either layer kind named it `lru`
        model.load_state_dict({k.replace(".lru.", ".ssm."): v
                               for k, v in payload["model"].items()})
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint does not describe a valid model: {first}") from None
    return model.to(resolve_device(device) if isinstance(device, str) else device)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (the exporter records the source checkpoint's hash)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
