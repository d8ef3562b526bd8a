"""The ``profile`` and ``compare`` sub-commands: argument parsing into :class:`ProfilerConfig`.

``cli.py`` calls :func:`add_profile_parser` and :func:`add_compare_parser` on its sub-parsers;
each sets ``func``, which takes the parsed namespace and returns the exit status. Errors are
:class:`~compressm_tune.errors.CompressmError` subclasses for the CLI to print in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

from compressm_tune._io import atomic_write_text
from compressm_tune.hardware._compare import compare, plot_comparison
from compressm_tune.hardware._config import (
    RUNTIMES,
    ProfilerConfig,
    parse_block_counts,
    parse_widths,
)
from compressm_tune.hardware._drift import check_drift
from compressm_tune.hardware._energy import ENERGY_CHOICES
from compressm_tune.hardware._latency_model import LatencyModel
from compressm_tune.hardware._profiler import profile_device
from compressm_tune.hardware._schema import Profile, load_profile, save_profile
from compressm_tune.models import ARCHS

__all__ = ["add_compare_parser", "add_profile_parser", "config_from_args"]

_DEFAULTS = ProfilerConfig()

# (flag, config field, type, help); every default comes from ProfilerConfig.
_PROFILE_FLAGS = (
    ("--device", "device", str, "'auto' (cuda:0 if present, else cpu), 'cpu' or 'cuda:N'"),
    ("--hidden", "hidden", int, "H, residual width of every block"),
    ("--blocks", "blocks", int, "K, equal-width blocks per measured model"),
    ("--seq-len", "seq_len", int, "L, tokens per sequence"),
    ("--batch", "batch", int, "training-step batch"),
    ("--throughput-batch", "throughput_batch", int, "batch of the throughput measurement"),
    ("--threads", "threads", int, "torch intra-op threads"),
    ("--min-time-s", "min_time_s", float, "each timing repeats until this many seconds of work"),
    ("--warmup", "warmup", int, "untimed calls before each timing"),
    ("--min-repeats", "min_repeats", int, "timed calls at least"),
    ("--rounds", "rounds", int, "interleaved timing passes over all widths"),
    ("--watts-per-core", "watts_per_core", float, "W per busy core for the CPU-time estimate"),
    ("--seed", "seed", int, "torch seed for weights and inputs"),
)


def add_profile_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``profile``: measure this machine and write ``profiles/<device>.json``."""
    parser = subparsers.add_parser(
        "profile",
        help="measure latency, throughput, memory and energy per state width",
        description="Profile this machine at every state width and write a profile JSON.",
    )
    for flag, field, kind, text in _PROFILE_FLAGS:
        default = getattr(_DEFAULTS, field)
        shown = "one per physical core" if default is None else default
        parser.add_argument(flag, dest=field, type=kind, default=None,
                            help=f"{text} (default: {shown})")
    parser.add_argument("--arch", choices=ARCHS, default=None,
                        help=f"SSM layer of the measured models (default: {_DEFAULTS.arch})")
    parser.add_argument("--runtime", choices=RUNTIMES, default=None,
                        help=f"inference runtime (default: {_DEFAULTS.runtime})")
    parser.add_argument("--energy", choices=ENERGY_CHOICES, default=None,
                        help="energy source; an explicit choice that is unavailable is an error "
                             f"(default: {_DEFAULTS.energy})")
    parser.add_argument("--widths", type=str, default=None,
                        help="state widths: '4,8,16' or 'a,b,...,c' (default: "
                             + ",".join(map(str, _DEFAULTS.widths)) + ")")
    parser.add_argument("--extra-blocks", dest="extra_blocks", type=str, default=None,
                        help="other block counts also measured at every width, to separate "
                             "fixed from per-block cost: '1,4' (default: 1 and 2K)")
    parser.add_argument("--note", action="append", default=[],
                        help="remark stored in the profile (repeatable), e.g. 'machine shared'")
    parser.add_argument("--out", type=Path, default=None,
                        help="output JSON (default: profiles/<device-slug>[-<runtime>]-<UTC "
                             "time>.json: a new file, never an existing profile)")
    parser.add_argument("--check", type=Path, default=None, metavar="PROFILE.json",
                        help="instead of profiling: re-measure three widths of this machine's "
                             "profile with its own settings and print how much slower or "
                             "faster the machine runs now (the factor predictions need)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_profile)
    return parser


def config_from_args(args: argparse.Namespace) -> ProfilerConfig:
    """Build a :class:`ProfilerConfig` from parsed ``profile`` arguments; unset flags keep
    the dataclass defaults.

    Raises
    ------
    ConfigError
        A value breaks a rule of :class:`ProfilerConfig` (the message names it).
    """
    fields = {f.name for f in dataclasses.fields(ProfilerConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if isinstance(values.get("widths"), str):
        values["widths"] = parse_widths(values["widths"])
    if isinstance(values.get("extra_blocks"), str):
        values["extra_blocks"] = parse_block_counts(values["extra_blocks"])
    return ProfilerConfig(**values)


def _run_check(path: Path, progress: bool) -> int:
    profile = load_profile(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drift = check_drift(profile, progress=progress)
    print(f"{path}: {drift.summary()}")
    for note in sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)}):
        print(f"note: {note}", file=sys.stderr)
    if drift.significant:
        print(f"this machine runs {drift.change()} than when profiled: re-profile, or scale "
              f"predictions by {drift.scale:.3f} (LatencyModel(scale=...))")
    return 0


def _run_profile(args: argparse.Namespace) -> int:
    if args.check is not None:
        return _run_check(args.check, progress=not args.quiet)
    config = config_from_args(args)
    profile = profile_device(config, progress=not args.quiet, notes=args.note)
    out = args.out
    if out is None:
        suffix = "" if profile.config.runtime == "torch" else f"-{profile.config.runtime}"
        suffix += "" if profile.config.arch == "lru" else f"-{profile.config.arch}"
        stamp = profile.created_utc.replace(":", "").replace("-", "")[:15]
        out = Path("profiles") / f"{profile.device.slug}{suffix}-{stamp}.json"
    save_profile(profile, out)
    print(f"wrote {out} ({profile.device.label}, {len(profile.widths)} widths, "
          f"energy: {profile.energy_method}); fast widths {profile.fast_widths()}")
    if len(profile.widths) >= 3:
        holdout = LatencyModel.from_profile(profile).holdout_error("latency_ms")
        print(f"latency model: {holdout.interpolation} interpolation, leave-one-out error "
              f"mean {holdout.mean_abs_rel_error:.1%}, max {holdout.max_abs_rel_error:.1%}")
    for note in profile.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def add_compare_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``compare``: print a side-by-side table of profiles and plot latency vs width."""
    parser = subparsers.add_parser(
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
    parser.set_defaults(func=_run_compare)
    return parser


def _run_compare(args: argparse.Namespace) -> int:
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


def _measured(profile: Profile) -> str:
    c = profile.config
    return f"{c.runtime}, {c.arch}, H={c.hidden}, L={c.seq_len}, {c.blocks} blocks"
