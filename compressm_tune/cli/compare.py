"""``compressm-tune compare``: profiles side by side, their ratios and a latency plot."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``compare``: print a side-by-side table of profiles and plot latency vs width."""
    parser = sub.add_parser(
        "compare",
        help="compare device profiles: table, ratios, step-up widths, plot",
        description="Compare profiles; the first one is the reference for ratios.",
    )
    parser.add_argument("profiles", nargs="+", type=Path, help="profile JSON files")
    parser.add_argument("--plot", type=Path, default=None,
                        help="also plot latency vs width per device into this PNG")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also write the table to this Markdown file")
    parser.add_argument("--tolerance", type=float, default=0.1,
                        help="relative latency rise that counts as a step up (default: 0.1)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the comparison table; write the Markdown and the plot when asked."""
    from compressm_tune._io import atomic_write_text
    from compressm_tune.hardware import compare, load_profile, plot_comparison

    if not 0 <= args.tolerance < math.inf:
        from compressm_tune.errors import ConfigError

        raise ConfigError(f"--tolerance must be >= 0 and finite, got {args.tolerance}")
    profiles = [load_profile(p) for p in args.profiles]
    table = compare(profiles, tolerance=args.tolerance)
    text = table.to_markdown()
    shapes = {_measured(p) for p in profiles}
    if len(shapes) > 1:  # a ratio between these says nothing about the devices
        warning = ("note: these profiles measured different things ("
                   + "; ".join(f"{path.name}: {_measured(p)}"
                               for path, p in zip(args.profiles, profiles, strict=True))
                   + "): the ratios compare those, not only the devices")
        text += f"\n{warning}\n"
        print(warning, file=sys.stderr)
    print(text, end="")
    if args.markdown is not None:
        atomic_write_text(args.markdown, text)
    if args.plot is not None:
        plot_comparison(table, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _measured(profile) -> str:
    c = profile.config
    return f"{c.runtime}, {c.arch}, H={c.hidden}, L={c.seq_len}, {c.blocks} blocks"
