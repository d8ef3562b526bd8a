"""Hardware profiling: per-state-width latency, throughput, memory and energy; profiles.

Measure a device with :func:`profile_device`, store it with :func:`save_profile`, predict
any per-layer widths with :class:`LatencyModel` (rescaled by :func:`check_drift` when the
machine has changed since), and put devices side by side with :func:`compare`. Energy and
time are read in named windows (:class:`MeasurementMonitor`) from a backend chosen by
:func:`select_energy_backend`: NVML on NVIDIA GPUs, RAPL on CPUs, else an estimate from CPU
time that is labelled as one.
"""

from compressm_tune.hardware._compare import ComparisonTable, compare, plot_comparison
from compressm_tune.hardware._config import (
    RUNTIMES,
    ProfilerConfig,
    parse_block_counts,
    parse_widths,
)
from compressm_tune.hardware._drift import (
    DRIFT_TOLERANCE,
    Drift,
    check_drift,
    measured_here,
    reference_widths,
)
from compressm_tune.hardware._energy import ENERGY_CHOICES, select_energy_backend
from compressm_tune.hardware._energy_base import (
    DEFAULT_WATTS_PER_CORE,
    CpuTimeEstimateBackend,
    EnergyBackend,
    EnergyBackendError,
    NullEnergyBackend,
)
from compressm_tune.hardware._fingerprint import DeviceFingerprint, fingerprint
from compressm_tune.hardware._latency_model import (
    INTERPOLATIONS,
    TIME_METRICS,
    HoldoutResult,
    LatencyModel,
)
from compressm_tune.hardware._memory import MemoryUsage, measure_peak_memory, param_mb
from compressm_tune.hardware._monitor import Measurement, MeasurementMonitor, synchronize
from compressm_tune.hardware._nvml import NvmlCounterBackend, NvmlPowerSamplingBackend
from compressm_tune.hardware._profiler import measure_models, profile_device
from compressm_tune.hardware._rapl import RaplBackend
from compressm_tune.hardware._runtimes import (
    InferenceRunner,
    prepare_runtime,
)
from compressm_tune.hardware._schema import (
    METRICS,
    SCHEMA_VERSION,
    ModelRecord,
    Profile,
    load_profile,
    save_profile,
)
from compressm_tune.hardware._steps import fast_widths, step_up_widths
from compressm_tune.hardware._timing import (
    CallTimes,
    TimingStats,
    fixed_threads,
    time_calls,
    time_repeats,
    time_samples,
    warm_up,
)

__all__ = [
    "DEFAULT_WATTS_PER_CORE",
    "DRIFT_TOLERANCE",
    "ENERGY_CHOICES",
    "INTERPOLATIONS",
    "METRICS",
    "RUNTIMES",
    "SCHEMA_VERSION",
    "TIME_METRICS",
    "CallTimes",
    "ComparisonTable",
    "CpuTimeEstimateBackend",
    "DeviceFingerprint",
    "Drift",
    "EnergyBackend",
    "EnergyBackendError",
    "HoldoutResult",
    "InferenceRunner",
    "LatencyModel",
    "Measurement",
    "MeasurementMonitor",
    "MemoryUsage",
    "NullEnergyBackend",
    "NvmlCounterBackend",
    "NvmlPowerSamplingBackend",
    "Profile",
    "ProfilerConfig",
    "RaplBackend",
    "TimingStats",
    "ModelRecord",
    "check_drift",
    "compare",
    "fast_widths",
    "fingerprint",
    "fixed_threads",
    "load_profile",
    "measure_models",
    "measure_peak_memory",
    "measured_here",
    "param_mb",
    "parse_block_counts",
    "parse_widths",
    "plot_comparison",
    "prepare_runtime",
    "profile_device",
    "reference_widths",
    "save_profile",
    "select_energy_backend",
    "step_up_widths",
    "synchronize",
    "time_calls",
    "time_repeats",
    "time_samples",
    "warm_up",
]
