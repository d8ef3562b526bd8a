"""The budgeted job: profile, search, then export and *measure* the winner against the budget.

    compressm-tune --budget-ms 2.0

1. A latency model of this machine from a profile (``--profile``, else the cached profile of
   this device and model shape, else a short measurement that is then cached). A profile
   measured before this run is first drift-checked (three of its models re-timed; off with
   ``--no-drift-check``): a machine that now runs more than 5 % slower or faster gets its
   predictions scaled by the ratio; a cached profile off by more than ``REMEASURE_FACTOR``
   (measured under other load) is re-measured and replaced instead.
2. An Optuna study over in-training reduction schedules; a trial is feasible when the profile
   predicts its final widths meet the budget (trials are steered there by budget-aware
   truncation when their reduction window closes).
3. The best feasible trial is exported (ONNX + TorchScript, parity checked) and its latency is
   measured in onnxruntime; if the measurement misses the budget, the next best is tried.

Several workers may share one study (``--storage``) and one ``--out``. Step 3, the full
reference model and the report are done once, by the last worker to finish while no trial is
still running elsewhere, under an exclusive lock on ``OUT/.finalize.lock`` (released by the
kernel if that worker dies); every other worker says who finishes the job and exits 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import sys
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna

from compressm_tune._device import check_precision, resolve_device
from compressm_tune._io import ensure_dir
from compressm_tune.data import load_dataset
from compressm_tune.errors import BudgetMissedError, ConfigError
from compressm_tune.hardware import (
    LatencyModel,
    Profile,
    ProfilerConfig,
    check_drift,
    fingerprint,
    load_profile,
    measured_here,
    profile_device,
    save_profile,
)
from compressm_tune.models import SSMConfig
from compressm_tune.search._config import TuneConfig
from compressm_tune.search._objective import Objective, constraints_of
from compressm_tune.search._storage import (
    GRACE_S,
    check_storage,
    fail_dead_trials,
    keep_alive,
    open_storage,
)
from compressm_tune.training import TrainConfig, check_training_memory

__all__ = ["run_tune", "resolve_profile", "BudgetMissedError"]

_FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
# A cached profile whose re-timed models moved more than this factor is re-measured.
REMEASURE_FACTOR = 1.25
_SEARCH_PASSES = 3  # a search pass, then retries of trials found dead after it



class _Surplus(Exception):
    """Raised inside a trial started after the study already had its trials (other workers)."""


def _profile_cache() -> Path:
    root = os.environ.get("COMPRESSM_CACHE") or Path.home() / ".cache" / "compressm-tune"
    return Path(root) / "profiles"


def resolve_profile(config: TuneConfig, d_input: int, d_output: int,
                    seq_len: int) -> tuple[Profile, list[str]]:
    """The profile to predict with, and notes for the report (another device, a fallback)."""
    notes: list[str] = []
    here = fingerprint("cpu")
    if config.profile:
        profile = load_profile(config.profile)
        if profile.config.arch != config.arch:
            raise ConfigError(f"profile {config.profile} times {profile.config.arch} models, "
                              f"but the search trains {config.arch} models (--arch); profile "
                              f"them with: compressm-tune profile --arch {config.arch}")
        if profile.device.slug != here.slug:
            note = (f"profile {config.profile} was measured on {profile.device.label}, not on "
                    f"this machine ({here.label}); predictions may be off")
            warnings.warn(note, stacklevel=2)
            notes.append(note)
    else:
        cache = _cache_path(config, seq_len)
        if cache.exists():
            return load_profile(cache), notes
        profile = measure_cached_profile(config, d_input, d_output, seq_len)
        notes.append(f"measured an onnxruntime profile of this machine, cached in {cache}")
    cfg = profile.config
    if (cfg.hidden, cfg.seq_len) != (config.hidden, seq_len):
        notes.append(f"profile measured at H={cfg.hidden}, L={cfg.seq_len}; the model has "
                     f"H={config.hidden}, L={seq_len}: predictions are extrapolated")
    return profile, notes


def _cache_path(config: TuneConfig, seq_len: int) -> Path:
    arch = "" if config.arch == "lru" else f"-{config.arch}"
    # "-chunked": profiles that time the sequence graph an export chooses (issue 12);
    # a cache from before timed the per-token Scan graph only and is not reused
    return _profile_cache() / (f"{fingerprint('cpu').slug}-H{config.hidden}-K{config.blocks}"
                               f"-L{seq_len}-onnxruntime-chunked{arch}.json")


def measure_cached_profile(config: TuneConfig, d_input: int, d_output: int,
                           seq_len: int) -> Profile:
    """Measure this machine at the job's model shape and (re)place the cached profile."""
    widths = tuple(w for w in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
                   if w <= 2 * max(config.state_dims))
    # The budget is onnxruntime latency, so the profile times the same engine.
    profile = profile_device(ProfilerConfig(
        device="cpu", runtime="onnxruntime", arch=config.arch, widths=widths,
        hidden=config.hidden, blocks=config.blocks, seq_len=seq_len, d_input=d_input,
        d_output=d_output, threads=config.ort_threads, min_time_s=0.1, rounds=3))
    save_profile(profile, _cache_path(config, seq_len))
    return profile


def drift_scale(profile: Profile, metric: str, notes: list[str]) -> float:
    """The factor on the profile's time predictions for this machine as it runs now.

    A profile of this machine is re-checked (:func:`check_drift`, a few seconds): if its
    reference models now run more than ``DRIFT_TOLERANCE`` slower or faster, the measured
    ratio, else 1. A profile of another machine cannot be checked against itself: 1.
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


def _reseed(sampler: Any, seed: int) -> None:
    """Seed a sampler's random streams (its own and its startup sampler's) to ``seed``."""
    for depth, obj in enumerate((sampler, getattr(sampler, "_random_sampler", None))):
        rng = getattr(obj, "_rng", None)
        if rng is not None and hasattr(rng, "rng"):
            rng.rng.seed((seed + 7919 * depth) % 2**32)


class _TrialSeeded:
    """Reseed the sampler from (study seed, trial number) before every trial.

    Why: a sampler seeded once per process proposes the same first points in every process,
    so each worker sharing a study, and each rerun after a kill, replayed the same trials.
    Trial numbers are unique across workers and continue after a resume, so every trial gets
    its own stream, and a single uninterrupted run still proposes exactly the same trials.
    """

    def __init__(self, *args: Any, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, seed=seed, **kwargs)
        self._study_seed = seed

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        super().before_trial(study, trial)
        _reseed(self, self._study_seed * 1_000_003 + trial.number)


class _TPESampler(_TrialSeeded, optuna.samplers.TPESampler):
    pass


class _NSGAIISampler(_TrialSeeded, optuna.samplers.NSGAIISampler):
    pass


def _open_study(config: TuneConfig) -> optuna.Study:
    storage = open_storage(config.storage, Path(config.out))
    # Optuna 5 samplers read constraints recorded with trial.set_constraint; Optuna 4 needs them
    # passed as constraints_func (deprecated in 5).
    legacy = {} if hasattr(optuna.Trial, "set_constraint") else {
        "constraints_func": constraints_of}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if config.pareto:
            sampler = _NSGAIISampler(seed=config.seed, **legacy)
            kw: dict[str, Any] = {"directions": ["maximize", "minimize"]}
        else:
            sampler = _TPESampler(seed=config.seed, n_startup_trials=min(4, config.trials),
                                  **legacy)
            kw = {"direction": "maximize"}
    study = optuna.create_study(
        storage=storage, study_name=config.study, load_if_exists=True, sampler=sampler,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3), **kw)
    if len(study.directions) != (2 if config.pareto else 1):
        raise ConfigError(f"study {config.study!r} exists with {len(study.directions)} "
                          "objective(s); use another --study name to switch --pareto")
    settings = _settings(config)
    saved = study.user_attrs.get("settings")
    if saved is None:
        study.set_user_attr("settings", settings)
    elif saved != settings:
        diff = ", ".join(f"{k} {saved.get(k)} (now {v})" for k, v in settings.items()
                         if saved.get(k) != v)
        raise ConfigError(f"study {config.study!r} in this storage was run with {diff}: its "
                          "trials answer another question; use another --out or --study")
    return study


def _settings(config: TuneConfig) -> dict[str, Any]:
    """What a study's trials depend on: rerunning with other values is another study (a rerun
    with another --budget-ms used to reuse trials that were cut to fit the old budget). The
    seed is not among them: workers of one study may use their own."""
    return {"budget_ms": config.budget_ms, "budget_mj": config.budget_mj,
            "latency_mode": config.latency_mode, "arch": config.arch, "dataset": config.dataset,
            "steps": config.steps, "blocks": config.blocks, "hidden": config.hidden,
            "state_dims": sorted(config.state_dims), "batch_size": config.batch_size,
            "val_fraction": config.val_fraction}


def _slot_guard(objective: Objective, trials: int):
    """Wrap the objective so the study ends with exactly ``trials`` finished trials even
    when several workers share it: a trial numbered past the quota stops its worker."""

    def run(trial: optuna.Trial):
        earlier = [t for t in trial.study.get_trials(deepcopy=False)
                   if t.number < trial.number and t.state != optuna.trial.TrialState.FAIL]
        if len(earlier) >= trials:
            trial.study.stop()
            raise _Surplus(f"the study already has {trials} trials")
        with keep_alive(trial):
            return objective(trial)

    return run


def _feasible(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    done = [t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
            if all(c <= 0 for c in constraints_of(t))]
    # equal validation scores (common: a few hundred validation samples) go to the faster model
    return sorted(done, key=lambda t: (-t.user_attrs["val"], t.user_attrs["predicted_ms"]))


def run_tune(config: TuneConfig) -> dict[str, Any]:
    """Run the whole job; returns (and writes) ``summary.json``, or ``{"finalized": False}``
    in a worker that leaves the export to another. See the module docstring."""
    check_precision(config.precision, resolve_device(config.device))  # fail before any work
    check_storage(config.storage)
    out = ensure_dir(config.out)
    data = load_dataset(config.dataset, path=config.data_path, data_dir=config.data_dir,
                        val_fraction=config.val_fraction, seed=config.seed)
    widest = SSMConfig(arch=config.arch, d_input=data.d_input, d_output=data.d_output,
                       d_model=config.hidden, state_dims=[max(config.state_dims)] * config.blocks)
    check_training_memory(widest, config.batch_size, data.seq_len,
                          TrainConfig().eval_batch_size, resolve_device(config.device))
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    profile, notes = resolve_profile(config, data.d_input, data.d_output, data.seq_len)
    stale = config.drift_check and profile.created_utc < started
    moved: list[str] = []
    scale = drift_scale(profile, config.metric, moved) if stale else 1.0
    if config.profile is None and abs(math.log(scale)) > math.log(REMEASURE_FACTOR):
        # A cached profile this far off was measured under other load (or another machine
        # state): its shape over widths is off too, not only its scale. Users' own --profile
        # files are never replaced, only rescaled.
        profile = measure_cached_profile(config, data.d_input, data.d_output, data.seq_len)
        notes.append(f"the cached profile's models ran {scale:.2f}x their stored times when "
                     f"re-timed: it no longer describes this machine, so it was re-measured "
                     f"and replaced ({_cache_path(config, data.seq_len)})")
        scale = 1.0
    else:
        notes += moved
    notes += [f"profile measurement: {n}" for n in profile.notes]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        latency = LatencyModel.from_profile(profile, scale=scale)
    notes += [f"profile fit: {str(w.message).split('. Re-profile')[0]}; re-measure with "
              "`compressm-tune profile --min-time-s 0.5 --out FILE` and pass --profile FILE"
              for w in caught]
    fastest, width = min((latency.predict([w] * config.blocks, config.metric), w)
                         for w in {1, *profile.widths})
    if config.budget_ms < fastest:
        raise ConfigError(
            f"--budget-ms {config.budget_ms:g} is below the fastest model this machine runs: "
            f"{fastest:.4g} ms per {'sequence' if config.latency_mode == 'sequence' else 'token'}"
            f" ({config.blocks} blocks of {width} states, H={config.hidden}); raise the budget")
    full = latency.predict([max(config.state_dims)] * config.blocks, config.metric)
    if full <= config.budget_ms:
        notes.append(f"the full model is predicted at {full:.4g} ms, within the budget: the "
                     "search maximizes accuracy and training speed, latency does not bind")
    if full < 1.1 * fastest:
        notes.append(f"latency is nearly flat in state width at this shape ({fastest:.4g} to "
                     f"{full:.4g} ms): a fixed per-token cost dominates, so narrower states buy "
                     "training time and memory here, not latency (a larger --hidden shows more)")
    objective = Objective(config, data, lambda dims, m: latency.predict(dims, m),
                          profile.fast_widths())
    study = _open_study(config)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for _ in range(_SEARCH_PASSES):
        fail_dead_trials(study)  # before the slot guard counts a dead worker's trial as live
        finished = len(study.get_trials(states=_FINISHED))
        if finished < config.trials:
            study.optimize(_slot_guard(objective, config.trials),
                           n_trials=config.trials - finished, catch=(_Surplus,),
                           show_progress_bar=True, gc_after_trial=True)
        others = _still_running(study)
        # a dead worker's trial found stale only now is queued for a retry (WAITING):
        # this worker runs it, unless live workers still hold trials of their own
        if others or not _waiting(study):
            break
    if others:
        return _left_to_others(config, f"trial(s) {others} still run in other workers; the "
                                       "last of them to finish exports and reports (if a worker "
                                       f"died, rerun this command after {GRACE_S} s)")
    with _finalize_lock(out) as mine:
        if not mine:
            return _left_to_others(config, "another worker is exporting and reporting")
        return _finalize(config, study, data, profile, latency, notes)


def _finalize(config: TuneConfig, study: optuna.Study, data: Any, profile: Profile,
              latency: LatencyModel, notes: list[str]) -> dict[str, Any]:
    from compressm_tune.search._report import choose_and_export, write_report

    feasible = _feasible(study)
    if not feasible:
        raise BudgetMissedError(_infeasible_message(config, study))
    chosen = choose_and_export(config, feasible, data)
    return write_report(config, study, chosen, data, profile, latency, notes)


def _infeasible_message(config: TuneConfig, study: optuna.Study) -> str:
    """Which budget no trial met, with the closest predictions: an energy budget that binds
    must not be reported as a latency problem."""
    done = [t for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.COMPLETE]
    closest = []
    for key, flag, unit, budget in (("latency_ms", "--budget-ms", "ms", config.budget_ms),
                                    ("energy_mj", "--budget-mj", "mJ", config.budget_mj)):
        excess = [t.user_attrs.get("constraints", {}).get(key) for t in done]
        excess = [e for e in excess if e is not None]
        if budget is None or not excess:
            continue
        best = budget + min(excess)
        state = "met by some" if min(excess) <= 0 else "missed by all"
        closest.append(f"{budget:g} {unit} ({flag}) {state}, closest {best:.4g} {unit}")
    detail = "; ".join(closest) if closest else "no trial completed"
    return (f"none of {len(study.trials)} trials is predicted to meet every budget: {detail}; "
            "raise the budget that binds, or --trials")


def _still_running(study: optuna.Study) -> list[int]:
    """Trials other workers are still running (those of dead workers are failed first,
    which queues their retry as a WAITING trial)."""
    fail_dead_trials(study)
    running = (optuna.trial.TrialState.RUNNING,)
    return [t.number for t in study.get_trials(deepcopy=False, states=running)]


def _waiting(study: optuna.Study) -> list[int]:
    waiting = (optuna.trial.TrialState.WAITING,)
    return [t.number for t in study.get_trials(deepcopy=False, states=waiting)]


def _left_to_others(config: TuneConfig, why: str) -> dict[str, Any]:
    print(f"compressm-tune: this worker's trials are done; {why}; results will be in "
          f"{config.out}", file=sys.stderr)
    return {"finalized": False, "meets_budget": None}


@contextlib.contextmanager
def _finalize_lock(out: Path) -> Iterator[bool]:
    """Yield True for the one process that holds ``OUT/.finalize.lock``, False for others."""
    with open(out / ".finalize.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
