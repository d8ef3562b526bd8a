"""The profile file: dataclasses, a versioned JSON schema, strict loading and atomic writing.

Also where cost steps up across widths (:func:`step_up_widths`, :func:`fast_widths`): good cut
points for hardware-aware rank rounding.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressm_tune._io import atomic_write
from compressm_tune.errors import ConfigError, ProfileError
from compressm_tune.hardware._config import DeviceFingerprint, ProfilerConfig
from compressm_tune.hardware._measure import TimingStats

__all__ = [
    "METRICS", "ModelRecord", "Profile", "SCHEMA_NAME", "SCHEMA_VERSION", "fast_widths",
    "load_profile", "save_profile", "step_up_widths",
]


SCHEMA_NAME = "compressm-tune/hardware-profile"
# 2: ``extra_records`` (other block counts at every width) replaced version 1's single
# ``overhead_record``, and records gained ``latency_cpu`` (absent: not measured); version 1
# files are migrated on load (see :func:`_migrate_v1`).
SCHEMA_VERSION = 2
_READABLE_VERSIONS = (1, 2)

METRICS = {
    "latency_ms": "sequence-mode inference per sample at batch 1 (median), ms",
    "latency_min_ms": "fastest batch-1 sequence-mode inference, ms (robust on shared machines)",
    "latency_cpu_ms": "on-core time of batch-1 sequence-mode inference (median thread CPU time), "
                      "ms; waiting for a shared core does not inflate it; CPU, 1 thread only",
    "step_ms": "streaming step per token at batch 1 (median), ms",
    "batch_ms": "sequence-mode inference of one throughput batch (median), ms",
    "train_step_ms": "one training step, fwd + bwd + AdamW (median), ms",
    "energy_mj": "energy per sequence-mode inference at batch 1, mJ",
    "peak_mem_mb": "parameters + peak growth during a training step, MiB",
    "infer_mem_mb": "parameters + peak growth during a throughput-batch inference, MiB",
}


_TIMES = ("latency_ms", "latency_min_ms", "step_ms", "batch_ms", "train_step_ms")
_MAX_MS = 1e7  # about three hours per call


@dataclass(frozen=True)
class ModelRecord:
    """Measurements of one model whose blocks have state widths ``state_dims``.

    Attributes
    ----------
    state_dims : tuple of int
        N of every block, in order; a profile's records have equal widths.
    latency : TimingStats
        Sequence-mode inference of one sample (batch 1), ms per sample.
    step : TimingStats
        Streaming :meth:`step` at batch 1, ms per token.
    batch_latency : TimingStats
        Sequence-mode inference of ``throughput_batch`` samples, ms per batch.
    train_step : TimingStats
        One training step at ``batch`` (forward, backward, AdamW), ms per step.
    throughput_samples_per_s : float
        ``throughput_batch / batch_latency.p50_ms``, in samples per second.
    energy_mj : float or None
        Energy per batch-1 sequence-mode inference, mJ; ``None`` when not measured.
    energy_method : str
        How ``energy_mj`` was obtained; estimates start with ``"estimate"``.
    param_mb : float
        Parameters and buffers, MiB.
    train_peak_mem_mb, infer_peak_mem_mb : float
        Peak memory growth above the resident model during a training step and a
        throughput-batch inference, MiB.
    latency_cpu : TimingStats or None
        CPU time of the timed thread during each call of ``latency``, ms per sample: the call's
        time on a core, which other processes holding the cores do not inflate. ``None``
        unless measured on a CPU with one thread (other threads' work would not count).
    energy_error_mj : float or None
        Bound on the error of ``energy_mj`` from the source's refresh period (one period of the
        window's mean power over its calls); ``None`` where not stated (estimates, RAPL).
    """

    state_dims: tuple[int, ...]
    latency: TimingStats
    step: TimingStats
    batch_latency: TimingStats
    train_step: TimingStats
    throughput_samples_per_s: float
    energy_mj: float | None
    energy_method: str
    param_mb: float
    train_peak_mem_mb: float
    infer_peak_mem_mb: float
    latency_cpu: TimingStats | None = None
    energy_error_mj: float | None = None

    @property
    def blocks(self) -> int:
        """Number of blocks."""
        return len(self.state_dims)

    @property
    def state_dim(self) -> int:
        """The common width of all blocks (a profile record's N).

        Raises
        ------
        ValueError
            The blocks have different widths.
        """
        if len(set(self.state_dims)) != 1:
            raise ValueError(f"blocks have different widths: {self.state_dims}")
        return self.state_dims[0]

    def metric(self, name: str) -> float | None:
        """Return one of :data:`METRICS` for this record (``None``: not measured, e.g. energy
        without a counter or estimate, ``latency_cpu_ms`` with several threads)."""
        values = {
            "latency_ms": self.latency.p50_ms,
            "latency_min_ms": self.latency.min_ms,
            "latency_cpu_ms": None if self.latency_cpu is None else self.latency_cpu.p50_ms,
            "step_ms": self.step.p50_ms,
            "batch_ms": self.batch_latency.p50_ms,
            "train_step_ms": self.train_step.p50_ms,
            "energy_mj": self.energy_mj,
            "peak_mem_mb": self.param_mb + self.train_peak_mem_mb,
            "infer_mem_mb": self.param_mb + self.infer_peak_mem_mb,
        }
        if name not in values:
            raise ValueError(f"metric must be one of {sorted(values)}, got {name!r}")
        return values[name]


@dataclass(frozen=True)
class Profile:
    """A device profile: fingerprint, settings and one record per state width.

    Attributes
    ----------
    created_utc : str
        ISO-8601 time the measurement finished.
    device : DeviceFingerprint
    config : ProfilerConfig
        The resolved settings (concrete device and thread count).
    timing_method, energy_method, energy_note, memory_method : str
        How times, energy and memory were measured; the energy method of estimates
        starts with ``"estimate"``.
    records : tuple of ModelRecord
        One per width in ``config.widths``, ascending, each with ``config.blocks`` blocks.
    extra_records : tuple of ModelRecord
        Equal-width models with other block counts (``config.extra_blocks``), sorted by block
        count, then width; at least one. Together with ``records`` they separate the
        per-block cost from the fixed cost (encoder, head, dispatch) in :class:`LatencyModel`.
        Profiles migrated from schema version 1 hold one, at the smallest width.
    load_avg_1m_start, load_avg_1m_end : float
        One-minute load average before and after; a value above the thread count means
        the machine was shared while measuring.
    notes : tuple of str
        Free-form remarks (no GPU found, shared machine, ...).
    """

    created_utc: str
    device: DeviceFingerprint
    config: ProfilerConfig
    timing_method: str
    energy_method: str
    energy_note: str
    memory_method: str
    records: tuple[ModelRecord, ...]
    extra_records: tuple[ModelRecord, ...]
    load_avg_1m_start: float
    load_avg_1m_end: float
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for r in self.all_records:
            if not r.state_dims or len(set(r.state_dims)) != 1 or r.state_dims[0] < 1:
                raise ProfileError(f"a record must have equal widths >= 1, got {r.state_dims}")
            for name in _TIMES:  # a time of 0, below 0 or of centuries was never measured
                value = r.metric(name)
                if not 0 < value < _MAX_MS:
                    raise ProfileError(f"record {list(r.state_dims)}: {name} must be > 0 and "
                                       f"< {_MAX_MS:g} ms, got {value!r}")
        widths = [r.state_dim for r in self.records]
        if widths != sorted(set(widths)) or len(widths) < 2:
            raise ProfileError(f"records must hold >= 2 distinct ascending widths, got {widths}")
        if any(r.blocks != self.config.blocks for r in self.records):
            raise ProfileError(f"every record must have config.blocks={self.config.blocks} blocks")
        if not self.extra_records:
            raise ProfileError("extra_records must hold at least one record (another block "
                               "count separates the fixed cost from the per-block cost)")
        extra = [(r.blocks, r.state_dim) for r in self.extra_records]
        for blocks, width in extra:
            if blocks == self.config.blocks or width not in widths:
                raise ProfileError(
                    f"an extra record needs a block count other than config.blocks="
                    f"{self.config.blocks} and a width in {widths}, got {blocks=}, {width=}"
                )
        if extra != sorted(set(extra)):
            raise ProfileError(
                f"extra_records must be distinct and sorted by (blocks, width), got {extra}"
            )

    @property
    def all_records(self) -> tuple[ModelRecord, ...]:
        """``records`` followed by ``extra_records``: every measured model."""
        return (*self.records, *self.extra_records)

    @property
    def widths(self) -> list[int]:
        """The measured state widths, ascending."""
        return [r.state_dim for r in self.records]

    def values(self, metric: str) -> list[float | None]:
        """One value of ``metric`` (see :data:`METRICS`) per width, in width order."""
        return [r.metric(metric) for r in self.records]

    @property
    def is_energy_estimate(self) -> bool:
        """Whether energy figures are estimates rather than counter readings."""
        return self.energy_method.startswith("estimate")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, led by the schema name and version."""
        return {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION,
                **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Any) -> Profile:
        """Validate and rebuild a profile from :meth:`to_dict` output.

        Version 1 documents are migrated (:func:`_migrate_v1`) and then validated as
        version 2.

        Raises
        ------
        ProfileError
            Foreign document, unsupported schema version, or a missing, extra or ill-typed
            field (the message names its path).
        """
        if not isinstance(data, dict) or data.get("schema") != SCHEMA_NAME:
            raise ProfileError(f"not a compressm-tune hardware profile (no schema={SCHEMA_NAME!r})")
        version = data.get("schema_version")
        if type(version) is not int or version not in _READABLE_VERSIONS:
            raise ProfileError(
                f"profile schema_version {version!r} is not supported (this version reads "
                f"{', '.join(map(str, _READABLE_VERSIONS))}); re-run `compressm-tune profile`"
            )
        body = {k: v for k, v in data.items() if k not in ("schema", "schema_version")}
        if version == 1:
            body = _migrate_v1(body)
        return _decode(cls, body, "profile")

    def fast_widths(self, metric: str = "latency_ms", tolerance: float = 0.1) -> list[int]:
        """Measured widths after which ``metric`` rises by more than ``tolerance`` (see
        :func:`~compressm_tune.hardware.fast_widths`)."""
        return fast_widths(self.widths, self.values(metric), tolerance)

    def step_up_widths(self, metric: str = "latency_ms", tolerance: float = 0.1) -> list[int]:
        """Measured widths at which ``metric`` jumps by more than ``tolerance`` over the
        previous width (see :func:`~compressm_tune.hardware.step_up_widths`)."""
        return step_up_widths(self.widths, self.values(metric), tolerance)


def _migrate_v1(body: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a version-1 profile body as version 2.

    Version 1 measured one extra model, ``overhead_record`` (another block count at the
    smallest width); version 2 keeps it as the only entry of ``extra_records`` and records its
    block count as ``config.extra_blocks``. The latency model then splits fixed and per-block
    cost exactly as version 1 did.
    """
    body = dict(body)
    if "overhead_record" not in body:
        raise ProfileError("profile.overhead_record: missing (schema_version 1)")
    extra = body.pop("overhead_record")
    body["extra_records"] = [extra]
    config = body.get("config")
    dims = extra.get("state_dims") if isinstance(extra, dict) else None
    if isinstance(config, dict) and "extra_blocks" not in config and isinstance(dims, list):
        body["config"] = {**config, "extra_blocks": [len(dims)]}
    return body


def _decode(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the type hint ``tp`` and rebuild dataclasses and tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return _decode(inner, value, path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ProfileError(f"{path}: expected an object, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        extra = sorted(set(value) - set(fields))
        if extra:
            raise ProfileError(f"{path}: unexpected field(s) {extra}")
        kwargs = {}
        for name, field in fields.items():
            if name not in value:
                if field.default is dataclasses.MISSING:
                    raise ProfileError(f"{path}.{name}: missing")
                continue
            kwargs[name] = _decode(hints[name], value[name], f"{path}.{name}")
        try:
            return tp(**kwargs)
        except ConfigError as err:
            raise ProfileError(f"{path}: {err}") from err
    if origin is tuple:
        if not isinstance(value, list):
            raise ProfileError(f"{path}: expected a list, got {type(value).__name__}")
        (inner, _) = typing.get_args(tp)
        return tuple(_decode(inner, v, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise ProfileError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp in (int, str, bool) and (type(value) is not tp):
        raise ProfileError(f"{path}: expected {tp.__name__}, got {value!r}")
    return value


def save_profile(profile: Profile, path: str | os.PathLike[str]) -> Path:
    """Write ``profile`` as JSON atomically (temporary file + :func:`os.replace`).

    Returns
    -------
    pathlib.Path
        The written path; parent directories are created.
    """
    text = json.dumps(profile.to_dict(), indent=1, allow_nan=False) + "\n"
    # mode 0644: a profile is meant to be shared
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), 0o644)


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and validate a profile written by :func:`save_profile`.

    Raises
    ------
    ProfileError
        Missing, unreadable, truncated or corrupted file, a foreign JSON document, another
        schema version, or invalid content; the one-line message names the file and cause.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ProfileError(f"cannot read profile {path}: a binary file, not JSON text") from None
    except OSError as err:
        raise ProfileError(f"cannot read profile {path}: {err.strerror or err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ProfileError(
            f"profile {path} is not valid JSON (truncated or corrupted?): {err}"
        ) from err
    try:
        return Profile.from_dict(data)
    except ProfileError as err:
        raise ProfileError(f"profile {path}: {err}") from err


def _check(widths: Sequence[int], values: Sequence[float | None], tolerance: float) -> None:
    if len(widths) != len(values) or list(widths) != sorted(set(widths)):
        raise ValueError(
            "widths must be distinct, ascending and as many as values, got "
            f"{list(widths)=} with {len(values)} values"
        )
    if any(v is None for v in values):
        raise ValueError("values must all be measured (no None)")
    if not 0 <= tolerance < math.inf:
        raise ValueError(f"tolerance must be >= 0 and finite, got {tolerance=}")


def step_up_widths(
    widths: Sequence[int], values: Sequence[float | None], tolerance: float = 0.1
) -> list[int]:
    """Widths at which the cost exceeds the previous width's by more than ``tolerance``.

    Parameters
    ----------
    widths : sequence of int
        Measured state widths, ascending.
    values : sequence of float
        The cost at each width (latency, energy, ...).
    tolerance : float
        Relative rise that counts as a step, e.g. 0.1 for 10 %.

    Returns
    -------
    list of int
        Ascending; the first width is never included.

    Examples
    --------
    >>> step_up_widths([4, 8, 16, 32], [1.0, 1.02, 1.5, 1.55])
    [16]
    """
    _check(widths, values, tolerance)
    return [w for w, prev, cur in zip(widths[1:], values, values[1:], strict=False)
            if cur > prev * (1.0 + tolerance)]  # type: ignore[operator]


def fast_widths(
    widths: Sequence[int], values: Sequence[float | None], tolerance: float = 0.1
) -> list[int]:
    """The last width of every plateau: widening past one of these costs more than
    ``tolerance``; the largest measured width is always included.

    Rounding a rank up to the next fast width keeps more state for (almost) no cost.

    Examples
    --------
    >>> fast_widths([4, 8, 16, 32], [1.0, 1.02, 1.5, 1.55])
    [8, 32]
    """
    _check(widths, values, tolerance)
    steps = set(step_up_widths(widths, values, tolerance))
    fast = [w for w, nxt in zip(widths, widths[1:], strict=False) if nxt in steps]
    return fast + [widths[-1]]
