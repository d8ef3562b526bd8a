"""The ``compressm-tune`` command line: the parser and how a run ends.

One module per sub-command (``tune`` is the budgeted job, run without a sub-command); each
adds its parser and runs it, importing the heavy packages only when it runs, so ``--help``
stays fast. Exit status: 0 done; 2 a user error (one line on stderr; ``--debug`` shows the
traceback); 3 the budget was not met; 130 interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from compressm_tune import __version__
from compressm_tune.cli import compare, compress, export, profile, train, tune
from compressm_tune.errors import BudgetMissedError, CompressmError

__all__ = ["main", "build_parser", "USER_ERROR", "INTERRUPTED"]

USER_ERROR = 2
INTERRUPTED = 130
_EPILOG = ("exit status: 0 done; 2 a user error; 3 the budget was not met (as measured); "
           "130 interrupted")


def _add_common(parser: argparse.ArgumentParser, top: bool) -> None:
    """-q/-v/--debug, accepted before and after the sub-command; a sub-command's copy leaves
    what the top level parsed unless given (``argparse.SUPPRESS``)."""
    unset = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="warnings and errors only, no progress bars", **unset)
    parser.add_argument("-v", "--verbose", action="count",
                        help="more log output (-vv: debug)", **(unset or {"default": 0}))
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line", **unset)


def build_parser() -> argparse.ArgumentParser:
    """The full ``compressm-tune`` argument parser (imports nothing heavy)."""
    parser = argparse.ArgumentParser(
        prog="compressm-tune",
        description="Compress state-space models while they train and ship them within a "
                    "latency/energy budget.",
        epilog=_EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_common(parser, top=True)
    tune.add_tune_args(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (train, export, compress, profile, compare):
        _add_common(command.add_parser(sub), top=False)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    level = (logging.ERROR if args.quiet else logging.WARNING if not args.verbose else
             logging.INFO if args.verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``compressm-tune`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except CompressmError as exc:  # a value argparse takes but cannot convert (IntList)
        print(f"compressm-tune: error: {exc}", file=sys.stderr)
        return USER_ERROR
    if args.command is None and (args.budget_ms is not None or args.budget is not None):
        args.func = tune.run
        args.argv = list(sys.argv[1:] if argv is None else argv)  # --workers reruns it
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return USER_ERROR
    _configure_logging(args)
    # SIGTERM (schedulers, `docker stop`) ends a run as Ctrl-C does: the running trial and
    # checkpoint bookkeeping finish through the same KeyboardInterrupt path
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args) or 0)
    except BudgetMissedError as exc:
        if args.debug:
            raise
        print(f"compressm-tune: error: {exc}", file=sys.stderr)
        return tune.BUDGET_MISSED
    except CompressmError as exc:
        if args.debug:
            raise
        print(f"compressm-tune: error: {exc}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        if args.debug:
            raise
        if args.command == "train" and not (Path(args.out) / "last.pt").is_file():
            print("compressm-tune: interrupted before the first checkpoint; nothing to resume "
                  "(rerun without --resume)", file=sys.stderr)
            return INTERRUPTED
        how = ("rerun with --resume" if args.command == "train" else
               "rerun the same command: finished trials are kept" if args.command is None else
               "rerun the command")
        print(f"compressm-tune: interrupted; what was finished is saved ({how})",
              file=sys.stderr)
        return INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
