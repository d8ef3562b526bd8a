"""The exporter's own error type (the root is :class:`compressm_tune.errors.ExportError`)."""

from __future__ import annotations

from compressm_tune.errors import ExportError

__all__ = ["ExportOptionError"]


class ExportOptionError(ExportError, ValueError):
    """An export option is outside what the exporter supports (the message names it).

    Caught by ``except ExportError`` and by ``except ValueError`` alike.
    """
