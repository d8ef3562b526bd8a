"""One exception root for the package.

Every error a user can cause derives from :class:`CompressmError` *and* the builtin that
matches it, so ``except ValueError`` in user code still catches our validation errors while
``except CompressmError`` catches all of ours (the Optuna/python-control habit).
"""

from __future__ import annotations

__all__ = [
    "CompressmError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "ReductionError",
    "ProfileError",
    "ExportError",
    "MissingDependencyError",
    "OutputError",
    "ExportOptionError",
    "EnergyBackendError",
    "StorageError",
    "ArtifactStoreError",
    "BudgetMissedError",
    "DivergedError",
    "FolderBusyError",
    "DistributedError",
    "RankLostError",
]


class CompressmError(Exception):
    """Root of every error raised on purpose by compressm-tune."""


class ConfigError(CompressmError, ValueError):
    """A configuration value breaks a stated rule (the message names rule and value)."""


class DataError(CompressmError, ValueError):
    """A dataset file is missing, unreadable or malformed."""


class CheckpointError(CompressmError, ValueError):
    """A checkpoint is missing, corrupted or from an incompatible version."""


class ReductionError(CompressmError, ValueError):
    """A reduction request cannot be satisfied (bad rank, unstable system, non-finite values)."""


class ProfileError(CompressmError, ValueError):
    """A hardware profile file is corrupted, truncated, foreign or from another schema version."""


class ExportError(CompressmError, RuntimeError):
    """An export failed its parity check or its bundle is inconsistent."""


class OutputError(CompressmError, OSError):
    """A result cannot be written: disk full, no permission, read-only or missing folder."""


class MissingDependencyError(CompressmError, ImportError):
    """An optional dependency is missing; the message names the package to install."""


class ExportOptionError(ExportError, ValueError):
    """An export option is outside what the exporter supports (the message names it)."""


class EnergyBackendError(CompressmError, RuntimeError):
    """An energy backend that was asked for explicitly cannot be opened (the message says why)."""


class StorageError(CompressmError, RuntimeError):
    """The study storage cannot be reached or opened."""


class ArtifactStoreError(StorageError):
    """The artifact store of a search (trial checkpoints, the chosen bundle) cannot be reached
    or written, or lacks a file a trial recorded there."""


class BudgetMissedError(CompressmError, RuntimeError):
    """No candidate's exported model met the budget when measured."""


class DivergedError(CompressmError, RuntimeError):
    """Training produced a non-finite loss; the last checkpoint before it is kept."""


class FolderBusyError(CompressmError, RuntimeError):
    """Another live process is writing into the same output folder."""


class DistributedError(CompressmError, RuntimeError):
    """The ranks of a torch.distributed run disagree (settings, version, cut widths)."""


class RankLostError(DistributedError):
    """A rank of a torch.distributed run died or stopped answering; the last checkpoint is
    kept for ``--resume``."""
