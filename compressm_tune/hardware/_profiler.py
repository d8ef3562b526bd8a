"""Measure a device: every metric of :data:`METRICS` at every state width."""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from compressm_tune.errors import ConfigError
from compressm_tune.hardware._config import DeviceFingerprint, ProfilerConfig, fingerprint
from compressm_tune.hardware._energy import select_energy_backend
from compressm_tune.hardware._measure import (
    CPU_TIMING_METHOD,
    TIMING_METHOD,
    MeasurementMonitor,
    TimingStats,
    fixed_threads,
    synchronize,
    time_calls,
    warm_up,
)
from compressm_tune.hardware._memory import (
    keep_freed_memory,
    measure_peak_memory,
    memory_method,
    param_mb,
)
from compressm_tune.hardware._profile import ModelRecord, Profile
from compressm_tune.hardware._runtimes import prepare_runtime
from compressm_tune.models import SSMConfig, SSMModel

__all__ = ["measure_models", "profile_device"]


class _ModelBench:
    """One model with block widths ``state_dims``: its inputs, runner and timing samples.

    Construction prepares the runtime, measures peak memory (training: on the very first
    step, so the optimizer state is included) and warms every timed function up;
    :meth:`run_round` adds one round of timings; :meth:`record` summarizes them.
    """

    def __init__(self, cfg: ProfilerConfig, state_dims: Sequence[int],
                 monitor: MeasurementMonitor) -> None:
        self.cfg, self.state_dims, self.monitor = cfg, tuple(state_dims), monitor
        device = monitor.device
        torch.manual_seed(cfg.seed)
        self.model = SSMModel(SSMConfig(arch=cfg.arch, d_input=cfg.d_input,
                                        d_output=cfg.d_output, d_model=cfg.hidden,
                                        state_dims=list(state_dims)))
        self.model.to(device)
        self.x_one = torch.randn(1, cfg.seq_len, cfg.d_input, device=device)  # (1, L, d_in)
        self.x_batch = torch.randn(cfg.throughput_batch, cfg.seq_len, cfg.d_input,
                                   device=device)  # (Bt, L, d_in)
        self.x_train = torch.randn(cfg.batch, cfg.seq_len, cfg.d_input, device=device)
        self.labels = torch.randint(0, cfg.d_output, (cfg.batch,), device=device)  # (B,)
        self.x_t = torch.randn(1, cfg.d_input, device=device)  # (1, d_in)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.samples_ms: dict[str, list[np.ndarray]] = {
            "latency": [], "latency_cpu": [], "step": [], "batch": [], "train": []
        }
        # Thread CPU time is a call's time on a core only when the timed thread does all work.
        self.on_core_timing = device.type == "cpu" and cfg.threads == 1
        self.energy_mj: float | None = 0.0
        self.energy_calls = 0  # inferences in the energy windows (long_window_s sources)
        self.energy_error_mj: float | None = None
        self.window_ms = {"wall": 0.0, "cpu": 0.0}  # summed over the latency windows
        self.energy_method = monitor.energy_backend.method

        self.model.eval()
        with torch.inference_mode():
            self.state = self.model.allocate_state(1)
            self.runner = prepare_runtime(cfg.runtime, self.model, [self.x_one, self.x_batch],
                                          (self.x_t, self.state))
            self.infer_mem = measure_peak_memory(self._batch, device)
            for fn in (self._one, self._step, self._batch):
                warm_up(fn, cfg.warmup)
        self.model.train()
        self.train_mem = measure_peak_memory(self._train_step, device)
        warm_up(self._train_step, cfg.warmup)

    def _train_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x_train), self.labels).backward()
        self.optimizer.step()

    def _one(self) -> None:
        self.runner.forward(self.x_one)

    def _batch(self) -> None:
        self.runner.forward(self.x_batch)

    def _step(self) -> None:
        _, self.state = self.runner.step(self.x_t, self.state)

    def _time(self, name: str, fn: Callable[[], None], rewarm: bool = False) -> None:
        """Time this round's share of ``fn``'s calls.

        A round's first call finds caches cold after the other models (and this model's
        training step) ran: measured on a 2-core CPU it took 1.2-1.6x a warm call. A round
        holds ~17 fast calls of a small model but only 3-5 of a 4-block one, so counting the
        cold call inflates the median of slow models more (4-7 %), which bends the sum over
        blocks. ``rewarm`` makes one untimed call first, so every timed call is warm. Training
        steps and throughput batches run once per round on a CPU (each longer than a round's
        share), so all of their calls are alike without it.
        """
        cfg, device = self.cfg, self.monitor.device
        if rewarm:
            fn()
        times = time_calls(fn, min_time_s=cfg.min_time_s / cfg.rounds,
                           min_repeats=math.ceil(cfg.min_repeats / cfg.rounds),
                           sync=lambda: synchronize(device))
        self.samples_ms[name].append(times.wall_ms)
        if f"{name}_cpu" in self.samples_ms:
            self.samples_ms[f"{name}_cpu"].append(times.thread_cpu_ms)

    def run_round(self) -> None:
        """Add one round of every timing; batch-1 inference runs inside an energy window."""
        self.model.train()
        self._time("train", self._train_step)
        self.model.eval()
        with torch.inference_mode():
            key = f"latency {list(self.state_dims)}"
            self._one()  # re-warm outside the energy window (see _time)
            self.monitor.begin_window(key)
            self._time("latency", self._one)
            window = self.monitor.end_window(key)
            self.window_ms["wall"] += window.latency_ms
            self.window_ms["cpu"] += window.cpu_time_ms
            if self.monitor.energy_backend.long_window_s() is None:
                self._add_energy(window.energy_mj)
            self._time("step", self._step, rewarm=True)
            self._time("batch", self._batch)

    def _add_energy(self, energy_mj: float | None) -> None:
        if energy_mj is None or self.energy_mj is None:
            self.energy_mj = None
        else:
            self.energy_mj += energy_mj

    def measure_energy(self, window_s: float) -> None:
        """Batch-1 inferences, each synchronized as when timed, in one energy window of at
        least ``window_s``: a source that refreshes every ~0.1 s (NVML) reads a window of a
        few calls as 0 or one step. The figure's error is at most one refresh period of the
        window's mean power, spread over its calls."""
        device = self.monitor.device
        self.model.eval()
        with torch.inference_mode():
            self._one()
            key = f"energy {list(self.state_dims)}"
            self.monitor.begin_window(key)
            calls, start = 0, time.perf_counter()
            while calls == 0 or time.perf_counter() - start < window_s:
                self._one()
                synchronize(device)
                calls += 1
            window = self.monitor.end_window(key)
        self._add_energy(window.energy_mj)
        self.energy_calls += calls
        if window.energy_mj is not None:
            power_w = window.energy_mj / window.latency_ms  # mJ/ms = W
            self.energy_error_mj = power_w * self.monitor.energy_backend.refresh_s * 1e3 / calls

    def record(self) -> ModelRecord:
        """Summarize all rounds."""
        stats = {name: TimingStats.from_samples(np.concatenate(chunks))
                 for name, chunks in self.samples_ms.items()}
        latency_cpu = stats["latency_cpu"] if self.on_core_timing else None
        calls = self.energy_calls or stats["latency"].repeats
        energy = None if self.energy_mj is None else self.energy_mj / calls
        return ModelRecord(
            state_dims=self.state_dims,
            latency=stats["latency"],
            step=stats["step"],
            batch_latency=stats["batch"],
            train_step=stats["train"],
            throughput_samples_per_s=self.cfg.throughput_batch / (stats["batch"].p50_ms / 1e3),
            energy_mj=energy,
            energy_method=self.energy_method,
            energy_error_mj=self.energy_error_mj,
            param_mb=param_mb(self.model),
            train_peak_mem_mb=self.train_mem.peak_mb,
            infer_peak_mem_mb=self.infer_mem.peak_mb,
            latency_cpu=latency_cpu,
        )


@contextlib.contextmanager
def _session(config: ProfilerConfig | None, notes: list[str]) -> Iterator[_Session]:
    """Resolve the config, open the energy monitor and fix the threads for one measurement."""
    requested = config or ProfilerConfig()
    cfg = requested.resolved()
    device = torch.device(cfg.device)
    if requested.device == "auto" and device.type == "cpu":
        notes.append("no CUDA device found: profiled the CPU (device='auto')")
    backend = select_energy_backend(device, cfg.energy, watts_per_core=cfg.watts_per_core)
    if backend.is_estimate:
        notes.append(f"energy figures are estimates, not measurements: {backend.note}")
    allocator = keep_freed_memory()  # see _malloc: the same buffers reused in every process
    load_start = os.getloadavg()[0]
    with fixed_threads(cfg.threads) as threads, MeasurementMonitor(device, backend) as monitor:
        session = _Session(cfg, monitor, fingerprint(device), load_start, notes, allocator)
        yield session
    session.load_end = os.getloadavg()[0]
    if max(load_start, session.load_end - threads) >= 0.5:
        notes.append(
            f"machine shared while measuring: 1-min load average {load_start:.2f} before, "
            f"{session.load_end:.2f} after (this run uses {threads} thread(s)); expect extra noise"
        )


@dataclass
class _Session:
    cfg: ProfilerConfig
    monitor: MeasurementMonitor
    device: DeviceFingerprint
    load_start: float
    notes: list[str]
    allocator: str | None  # how the allocator was set for the measurement, if it was
    load_end: float = 0.0

    def measure(self, models: Sequence[Sequence[int]], progress: bool, desc: str
                ) -> list[ModelRecord]:
        """Set every model up, then time them in interleaved rounds."""
        energy_window_s = self.monitor.energy_backend.long_window_s()
        passes = self.cfg.rounds + 1 + (energy_window_s is not None)
        bar = tqdm(total=len(models) * passes, desc=desc, unit="model", disable=not progress)
        with bar:
            # A throwaway model absorbs one-time costs (thread pools, allocator growth, lazy
            # init), so they do not inflate the first model's memory and times.
            _ModelBench(self.cfg, models[0], self.monitor)
            benches = []
            for dims in models:
                bar.set_postfix(setup=str(list(dims)))
                benches.append(_ModelBench(self.cfg, dims, self.monitor))
                bar.update()
            # Each round visits the models in a fresh random order, so no model always runs
            # right after the same neighbour (cold caches, a large model's allocator state).
            rng = np.random.default_rng(self.cfg.seed)
            for r in range(self.cfg.rounds):
                for i in rng.permutation(len(benches)):
                    bench = benches[i]
                    bar.set_postfix(round=r + 1, dims=str(list(bench.state_dims)))
                    bench.run_round()
                    bar.update()
            if energy_window_s is not None:  # after the timings, so they are not slowed
                for i in rng.permutation(len(benches)):
                    bar.set_postfix(energy=str(list(benches[i].state_dims)))
                    benches[i].measure_energy(energy_window_s)
                    bar.update()
        self._check_starvation(benches)
        return [bench.record() for bench in benches]

    def _check_starvation(self, benches: list[_ModelBench]) -> None:
        """Note when a single-threaded CPU run got less than 90 % of a core while timed."""
        if self.monitor.device.type != "cpu" or self.cfg.threads != 1:
            return  # several threads or a GPU: CPU time says nothing about waiting
        busy = sum(b.window_ms["cpu"] for b in benches) / sum(b.window_ms["wall"] for b in benches)
        if busy < 0.9:
            self.notes.append(
                f"CPU-starved: the timed thread ran only {busy:.0%} of the wall time of its "
                "latency windows; other processes competed for the cores, so wall-clock "
                "latencies are inflated (worst for long calls)"
            )


def measure_models(
    models: Sequence[Sequence[int]], config: ProfilerConfig | None = None, *,
    progress: bool = True,
) -> list[ModelRecord]:
    """Measure models with arbitrary per-block widths exactly as :func:`profile_device` does.

    Used to check :class:`LatencyModel` predictions against measurements.

    Parameters
    ----------
    models : sequence of sequence of int
        One list of per-block state widths per model, e.g. ``[[47, 31, 12], [8]]``.
    config : ProfilerConfig, optional
        Settings (hidden width, sequence length, batches, runtime, threads, timing);
        ``widths`` and ``blocks`` are ignored.
    progress : bool
        Show a tqdm progress bar (on stderr).

    Returns
    -------
    list of ModelRecord
        One per model, in order.

    Warns
    -----
    UserWarning
        The machine was shared or the timed thread was CPU-starved (the profile's notes).

    Notes
    -----
    Sets glibc's allocator to reuse freed buffers, process-wide, as :func:`profile_device`
    does, so that both measure the same steady state.
    """
    if not models or any(not dims or min(dims) < 1 for dims in models):
        raise ConfigError(f"models must be non-empty lists of widths >= 1, got {models!r}")
    notes: list[str] = []
    with _session(config, notes) as session:
        setup_notes = len(notes)  # device and energy remarks: not warnings
        records = session.measure(models, progress, f"measure {session.device.slug}")
    for note in notes[setup_notes:]:
        warnings.warn(note, stacklevel=2)
    return records


def profile_device(
    config: ProfilerConfig | None = None, *, progress: bool = True, notes: Sequence[str] = ()
) -> Profile:
    """Profile this machine: every metric of :data:`METRICS` at every width of ``config``.

    For each width N, models of ``config.blocks`` blocks of width N and of every extra block
    count (``config.extra_blocks``, by default 1 and 2K) are measured, so that
    :class:`LatencyModel` can fit the fixed cost and the per-block cost across block counts
    rather than from one noisy difference. Timings are taken in
    ``config.rounds`` interleaved passes over all models, so that a change in background
    load hits every width alike. Torch's thread count is fixed for the run and restored;
    glibc's allocator is set to reuse freed buffers, process-wide (see ``_malloc``).

    Parameters
    ----------
    config : ProfilerConfig, optional
        Settings; the defaults take a few minutes on 2 CPU cores.
    progress : bool
        Show a tqdm progress bar (on stderr).
    notes : sequence of str
        Remarks stored in the profile (e.g. "machine shared with other jobs").

    Returns
    -------
    Profile
        Ready for :func:`save_profile`; ``notes`` also says when no GPU was found, when
        energy is estimated, and when the load average shows the machine was shared.

    Raises
    ------
    ConfigError
        A requested CUDA device does not exist.
    """
    notes = list(notes)
    with _session(config, notes) as session:
        cfg = session.cfg
        # config.blocks at every width first (the profile's records), then every extra block
        # count at every width, sorted by (blocks, width) as Profile.extra_records must be
        shapes = [(w,) * k for k in (cfg.blocks, *sorted(cfg.block_counts[1:]))
                  for w in cfg.widths]
        records = session.measure(shapes, progress, f"profile {session.device.slug}")
    threads = session.device.torch_threads
    timing = TIMING_METHOD.format(warmup=cfg.warmup, rounds=cfg.rounds, min_time_s=cfg.min_time_s,
                                  min_repeats=cfg.min_repeats, threads=threads)
    if cfg.runtime != "torch":
        timing += f"; inference in {cfg.runtime}, training steps in eager torch"
    if cfg.runtime == "onnxruntime":
        timing += ("; sequence graph per model chosen as export_bundle(chunk='auto') chooses "
                   "it (per-token Scan or chunked, timed at seq_len)")
    if session.monitor.device.type == "cpu" and cfg.threads == 1:
        timing += CPU_TIMING_METHOD
    if session.allocator is not None:
        timing += f"; {session.allocator}"
    return Profile(
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        device=session.device,
        config=cfg,
        timing_method=timing,
        energy_method=session.monitor.energy_backend.method,
        energy_note=session.monitor.energy_backend.note,
        memory_method=memory_method(session.monitor.device),
        records=tuple(records[: len(cfg.widths)]),
        extra_records=tuple(records[len(cfg.widths):]),
        load_avg_1m_start=session.load_start,
        load_avg_1m_end=session.load_end,
        notes=tuple(notes),
    )
