"""Hardware profiling: per-state-width latency, throughput, memory and energy; profiles.

Measure a device with :func:`profile_device`, store it with :func:`save_profile`, predict
any per-layer widths with :class:`LatencyModel` (rescaled by :func:`check_drift` when the
machine has changed since), and put devices side by side with :func:`compare`. Energy and
time are read in named windows (:class:`MeasurementMonitor`) from a backend chosen by
:func:`select_energy_backend`: NVML on NVIDIA GPUs, RAPL on CPUs, else an estimate from CPU
time that is labelled as one.
"""

from compressm_tune.hardware._cache import (
    REMEASURE_FACTOR,
    drift_scale,
    latency_model_for,
    measure_cached_profile,
    profile_cache_path,
    resolve_profile,
)
from compressm_tune.hardware._compare import compare, plot_comparison
from compressm_tune.hardware._config import (
    ProfilerConfig,
    fingerprint,
    parse_block_counts,
    parse_widths,
)
from compressm_tune.hardware._energy import (
    CpuTimeEstimateBackend,
    EnergyBackend,
    NullEnergyBackend,
    NvmlCounterBackend,
    NvmlPowerSamplingBackend,
    RaplBackend,
    select_energy_backend,
)
from compressm_tune.hardware._latency_model import (
    DRIFT_TOLERANCE,
    INTERPOLATIONS,
    TIME_METRICS,
    Drift,
    LatencyModel,
    check_drift,
    measured_here,
    reference_widths,
)
from compressm_tune.hardware._measure import (
    MeasurementMonitor,
    TimingStats,
    fixed_threads,
    time_calls,
    time_samples,
)
from compressm_tune.hardware._memory import measure_peak_memory, param_mb
from compressm_tune.hardware._profile import (
    METRICS,
    SCHEMA_VERSION,
    ModelRecord,
    Profile,
    fast_widths,
    load_profile,
    save_profile,
    step_up_widths,
)
from compressm_tune.hardware._profiler import measure_models, profile_device
from compressm_tune.hardware._runtimes import onnxruntime_functions, prepare_runtime

__all__ = [
    "DRIFT_TOLERANCE",
    "INTERPOLATIONS",
    "METRICS",
    "SCHEMA_VERSION",
    "TIME_METRICS",
    "CpuTimeEstimateBackend",
    "Drift",
    "EnergyBackend",
    "LatencyModel",
    "MeasurementMonitor",
    "ModelRecord",
    "NullEnergyBackend",
    "NvmlCounterBackend",
    "NvmlPowerSamplingBackend",
    "Profile",
    "ProfilerConfig",
    "RaplBackend",
    "TimingStats",
    "check_drift",
    "compare",
    "fast_widths",
    "fingerprint",
    "fixed_threads",
    "load_profile",
    "measure_models",
    "measure_peak_memory",
    "measured_here",
    "onnxruntime_functions",
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
    "time_calls",
    "time_samples",
    "REMEASURE_FACTOR",
    "drift_scale",
    "latency_model_for",
    "measure_cached_profile",
    "profile_cache_path",
    "resolve_profile",
]
