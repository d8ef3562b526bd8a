"""``compressm-tune profile``: measure this machine at every state width, or check drift.

Flags are :class:`~compressm_tune.hardware.ProfilerConfig`'s fields; a flag left out keeps
the dataclass's default. ``--widths`` and ``--extra-blocks`` also take ranges (``a,b,...,c``),
so they are parsed by the hardware package rather than as plain integer lists.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

from compressm_tune.cli._flags import add_fields

__all__ = ["add_parser", "config_from_args", "run"]

PROFILER = "compressm_tune.hardware:ProfilerConfig"
_FLAGS = ("device", "hidden", "blocks", "seq_len", "batch", "throughput_batch", "threads",
          "min_time_s", "warmup", "min_repeats", "rounds", "watts_per_core", "seed", "arch",
          "runtime", "energy")
_RANGES = ("widths", "extra_blocks")  # text, parsed by parse_widths / parse_block_counts


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``profile``: measure this machine and write ``profiles/<device>.json``."""
    parser = sub.add_parser(
        "profile",
        help="measure latency, throughput, memory and energy per state width",
        description="Profile this machine at every state width and write a profile JSON.",
    )
    add_fields(parser, PROFILER, _FLAGS + _RANGES, unset=True,
               types=dict.fromkeys(_RANGES, str))
    parser.add_argument("--note", action="append", default=[],
                        help="remark stored in the profile (repeatable), e.g. 'machine shared'")
    parser.add_argument("--out", type=Path, default=None,
                        help="output JSON (default: profiles/<device-slug>[-<runtime>]-<UTC "
                             "time>.json: a new file, never an existing profile)")
    parser.add_argument("--check", type=Path, default=None, metavar="PROFILE.json",
                        help="instead of profiling: re-measure three widths of this machine's "
                             "profile with its own settings and print how much slower or "
                             "faster the machine runs now (the factor predictions need)")
    parser.set_defaults(func=run)
    return parser


def config_from_args(args: argparse.Namespace):
    """A :class:`ProfilerConfig` from parsed ``profile`` arguments; unset flags keep the
    dataclass defaults.

    Raises
    ------
    ConfigError
        A value breaks a rule of :class:`ProfilerConfig` (the message names it).
    """
    from compressm_tune.hardware import ProfilerConfig, parse_block_counts, parse_widths

    fields = {f.name for f in dataclasses.fields(ProfilerConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if isinstance(values.get("widths"), str):
        values["widths"] = parse_widths(values["widths"])
    if isinstance(values.get("extra_blocks"), str):
        values["extra_blocks"] = parse_block_counts(values["extra_blocks"])
    return ProfilerConfig(**values)


def _run_check(path: Path, progress: bool) -> int:
    from compressm_tune.hardware import check_drift, load_profile

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


def run(args: argparse.Namespace) -> int:
    """Profile (or, with ``--check``, re-time) and write the profile JSON."""
    from compressm_tune import hardware

    if args.check is not None:
        return _run_check(args.check, progress=not args.quiet)
    config = config_from_args(args)
    if args.out is not None and Path(args.out).exists():  # checked before minutes of timing
        from compressm_tune.errors import OutputError

        raise OutputError(f"--out {args.out} exists: a profile is never overwritten; remove it "
                          "or choose another name")
    started = time.perf_counter()
    profile = hardware.profile_device(config, progress=not args.quiet, notes=args.note)
    took = time.perf_counter() - started
    out = args.out
    if out is None:
        suffix = "" if profile.config.runtime == "torch" else f"-{profile.config.runtime}"
        suffix += "" if profile.config.arch == "lru" else f"-{profile.config.arch}"
        stamp = profile.created_utc.replace(":", "").replace("-", "")[:15]
        out = Path("profiles") / f"{profile.device.slug}{suffix}-{stamp}.json"
    hardware.save_profile(profile, out)
    print(f"wrote {out} ({profile.device.label}, {len(profile.widths)} widths, "
          f"{profile.config.threads} thread(s), measured in {took:.0f} s, energy: "
          f"{profile.energy_method}); fast widths {profile.fast_widths()}")
    if len(profile.widths) >= 3:
        holdout = hardware.LatencyModel.from_profile(profile).holdout_error("latency_ms")
        print(f"latency model: {holdout.interpolation} interpolation, leave-one-out error "
              f"mean {holdout.mean_abs_rel_error:.1%}, max {holdout.max_abs_rel_error:.1%}")
    for note in profile.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0
