"""The latency model a job predicts with: a given profile, else this machine's cached one.

A profile measured before the job started is drift-checked first (three of its models
re-timed): a machine that now runs more than ``DRIFT_TOLERANCE`` slower or faster gets its
predictions scaled by the ratio; a cached profile off by more than ``REMEASURE_FACTOR`` was
measured under other load, so it is measured again and replaced. A profile the caller names is
never replaced, only rescaled.

Cached profiles live in ``$COMPRESSM_CACHE/profiles`` (default ``~/.cache/compressm-tune``),
one per device and model shape.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from compressm_tune.errors import ConfigError
from compressm_tune.hardware._config import ProfilerConfig, fingerprint
from compressm_tune.hardware._latency_model import LatencyModel, check_drift, measured_here
from compressm_tune.hardware._profile import Profile, load_profile, save_profile
from compressm_tune.hardware._profiler import profile_device

__all__ = [
    "REMEASURE_FACTOR",
    "drift_scale",
    "latency_model_for",
    "measure_cached_profile",
    "profile_cache_path",
    "resolve_profile",
]

# A cached profile whose re-timed models moved more than this factor is re-measured.
REMEASURE_FACTOR = 1.25
# The revision of each architecture's sequence graph that cached profiles time (1 if absent).
GRAPH_REVISIONS = {"selective": 2, "mamba": 2}


def _profile_cache() -> Path:
    root = os.environ.get("COMPRESSM_CACHE") or Path.home() / ".cache" / "compressm-tune"
    return Path(root) / "profiles"


def profile_cache_path(arch: str, hidden: int, blocks: int, seq_len: int) -> Path:
    """Where this machine's onnxruntime profile of that model shape is cached.

    "-chunked" marks profiles that time the sequence graph an export chooses; older caches
    timed the per-token Scan graph only and are not reused. Likewise "-r2" after the selective
    and Mamba names: their Scan now holds the state channels last (up to 3x faster), so a
    profile of the old graph would mislead.
    """
    revision = GRAPH_REVISIONS.get(arch, 1)
    suffix = ("" if arch == "lru" else f"-{arch}") + (f"-r{revision}" if revision > 1 else "")
    return _profile_cache() / (f"{fingerprint('cpu').slug}-H{hidden}-K{blocks}"
                               f"-L{seq_len}-onnxruntime-chunked{suffix}.json")


def measure_cached_profile(*, arch: str, hidden: int, blocks: int, seq_len: int, d_input: int,
                           d_output: int, widths: Sequence[int], threads: int) -> Profile:
    """Measure this machine at that model shape and (re)place the cached profile.

    ``widths`` are the state widths the caller may use; the profile covers powers of two up
    to twice the largest. ``threads``: onnxruntime intra-op threads, as the budget is timed.
    """
    grid = tuple(w for w in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if w <= 2 * max(widths))
    # The budget is onnxruntime latency, so the profile times the same engine.
    profile = profile_device(ProfilerConfig(
        device="cpu", runtime="onnxruntime", arch=arch, widths=grid, hidden=hidden,
        blocks=blocks, seq_len=seq_len, d_input=d_input, d_output=d_output, threads=threads,
        min_time_s=0.1, rounds=3))
    save_profile(profile, profile_cache_path(arch, hidden, blocks, seq_len))
    return profile


def resolve_profile(*, arch: str, hidden: int, blocks: int, seq_len: int, d_input: int,
                    d_output: int, widths: Sequence[int], threads: int,
                    profile: str | None = None) -> tuple[Profile, list[str]]:
    """The profile to predict with (``profile``, else the cached one, else a measurement that
    is then cached), and notes for the report (another device, extrapolation, a measurement)."""
    notes: list[str] = []
    here = fingerprint("cpu")
    if profile:
        found = load_profile(profile)
        if found.config.arch != arch:
            raise ConfigError(f"profile {profile} times {found.config.arch} models, "
                              f"but the search trains {arch} models (--arch); profile "
                              f"them with: compressm-tune profile --arch {arch}")
        if found.device.slug != here.slug:
            note = (f"profile {profile} was measured on {found.device.label}, not on "
                    f"this machine ({here.label}); predictions may be off")
            warnings.warn(note, stacklevel=2)
            notes.append(note)
    else:
        cache = profile_cache_path(arch, hidden, blocks, seq_len)
        if cache.exists():
            return load_profile(cache), notes
        found = measure_cached_profile(arch=arch, hidden=hidden, blocks=blocks, seq_len=seq_len,
                                       d_input=d_input, d_output=d_output, widths=widths,
                                       threads=threads)
        notes.append(f"measured an onnxruntime profile of this machine, cached in {cache}")
    cfg = found.config
    if (cfg.hidden, cfg.seq_len) != (hidden, seq_len):
        notes.append(f"profile measured at H={cfg.hidden}, L={cfg.seq_len}; the model has "
                     f"H={hidden}, L={seq_len}: predictions are extrapolated")
    return found, notes


def drift_scale(profile: Profile, metric: str, notes: list[str]) -> float:
    """The factor on the profile's time predictions for this machine as it runs now.

    A profile of this machine is re-checked (:func:`check_drift`, a few seconds): if its
    reference models now run more than ``DRIFT_TOLERANCE`` slower or faster, the measured
    ratio (and a note appended to ``notes``), else 1. A profile of another machine cannot be
    checked against itself: 1.
    """
    if not measured_here(profile):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shared-machine notes: the check's ratio absorbs them
        drift = check_drift(profile, metric=metric)
    if not drift.significant:
        return 1.0
    notes.append(f"this machine runs {drift.change()} than when its profile was measured "
                 f"({drift.summary()}); predictions are scaled by {drift.scale:.3f}")
    return drift.scale


def latency_model_for(*, arch: str, hidden: int, blocks: int, seq_len: int, d_input: int,
                      d_output: int, widths: Sequence[int], threads: int,
                      profile: str | None = None, drift_check: bool = True,
                      metric: str = "latency_ms") -> tuple[LatencyModel, Profile, list[str]]:
    """The latency model of this machine for a job, the profile behind it, and report notes.

    Resolves the profile (:func:`resolve_profile`), drift-checks one measured before this
    call (unless ``drift_check`` is off) on ``metric``, re-measures a cached profile that
    moved more than ``REMEASURE_FACTOR``, and fits the model, scaled by the drift.
    """
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    shape = {"arch": arch, "hidden": hidden, "blocks": blocks, "seq_len": seq_len,
             "d_input": d_input, "d_output": d_output, "widths": widths, "threads": threads}
    found, notes = resolve_profile(**shape, profile=profile)
    moved: list[str] = []
    scale = drift_scale(found, metric, moved) if (
        drift_check and found.created_utc < started) else 1.0
    if profile is None and abs(math.log(scale)) > math.log(REMEASURE_FACTOR):
        # A cached profile this far off was measured under other load (or another machine
        # state): its shape over widths is off too, not only its scale.
        found = measure_cached_profile(**shape)
        notes.append(f"the cached profile's models ran {scale:.2f}x their stored times when "
                     f"re-timed: it no longer describes this machine, so it was re-measured "
                     f"and replaced ({profile_cache_path(arch, hidden, blocks, seq_len)})")
        scale = 1.0
    else:
        notes += moved
    notes += [f"profile measurement: {n}" for n in found.notes]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        latency = LatencyModel.from_profile(found, scale=scale)
    notes += [f"profile fit: {str(w.message).split('. Re-profile')[0]}; re-measure with "
              "`compressm-tune profile --min-time-s 0.5 --out FILE` and pass --profile FILE"
              for w in caught]
    return latency, found, notes
