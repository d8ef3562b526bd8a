"""The budgeted job: profile, search, then export and *measure* the winner against the budget.

    compressm-tune --budget 0.4x        (or an absolute budget: --budget-ms 2.0)

1. A latency model of this machine (:func:`compressm_tune.hardware.latency_model_for`: the
   given profile, else the cached one of this device and model shape, else a short
   measurement; drift-checked and rescaled when the machine has moved since).
2. A relative budget becomes milliseconds: that fraction of the full model's predicted
   latency. An Optuna study over in-training reduction schedules (``_study``; one trial is
   ``_objective``), each trial starting from the full width; a trial is feasible when the
   profile predicts its final widths meet the budget (trials are steered there by
   budget-aware truncation when their reduction window closes).
3. One worker finalizes (``_finalize``): the best feasible trial is exported (ONNX +
   TorchScript, parity checked) and its latency measured in onnxruntime (a relative budget
   against the full width timed in the same rounds), and if it misses, the best trial whose
   prediction fits once corrected by that measurement is tried next; the full model and the
   chosen widths from scratch are trained with the chosen trial's settings and steps,
   exported, and timed side by side with it; ``_report`` writes the record.

Several workers, on one machine or several, may share one study (``storage``) and one
artifact store (``artifacts``: trial checkpoints, then the chosen bundle), each with its own
``out``; the finalizer is elected through the storage (``_elect``) and fetches the trials it
exports from the store; every other worker says who finishes the job and exits.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from compressm_tune import hardware
from compressm_tune._device import check_precision, resolve_device
from compressm_tune._io import made_dir
from compressm_tune.data import load_dataset
from compressm_tune.errors import ArtifactStoreError, ConfigError
from compressm_tune.hardware import LatencyModel, Profile, latency_model_for
from compressm_tune.search._artifacts import default_artifacts, open_artifacts
from compressm_tune.search._config import TuneConfig
from compressm_tune.search._elect import finalizer
from compressm_tune.search._finalize import (
    calibrate_budget,
    choose_and_export,
    publish_bundle,
    train_references,
)
from compressm_tune.search._objective import Objective
from compressm_tune.search._report import write_report
from compressm_tune.search._study import (
    check_storage,
    open_storage,
    open_study,
    run_trials,
    saved_settings,
)
from compressm_tune.training import TrainConfig, check_training_memory

__all__ = ["run_tune", "resolve_profile"]


def run_tune(config: TuneConfig, progress: bool = True) -> dict[str, Any]:
    """Run the whole job; returns (and writes) ``summary.json``, or ``{"finalized": False}``
    in a worker that leaves the export to another (``progress``: Optuna's progress bar on
    stderr). See the module docstring.

    Raises
    ------
    ConfigError
        Settings that cannot run (the budget below the fastest model this machine runs...).
    BudgetMissedError
        No trial met the budget, predicted or measured.
    """
    check_precision(config.precision, resolve_device(config.device))  # fail before any work
    check_storage(config.storage)
    data = load_dataset(config.dataset, path=config.data_path, data_dir=config.data_dir,
                        val_fraction=config.val_fraction, seed=config.seed)
    check_training_memory(config.model_config(data, max(config.state_dims)), config.batch_size,
                          data.seq_len, TrainConfig().eval_batch_size,
                          resolve_device(config.device))
    latency, profile, notes = latency_model_for(
        **config.profile_shape(data.d_input, data.d_output, data.seq_len),
        drift_check=config.drift_check, metric=config.metric)
    config = _resolve_budget(config, latency)
    notes += _budget_notes(config, latency, profile)
    artifacts = open_artifacts(config.artifacts or default_artifacts(config.storage, config.out))
    with made_dir(config.out):  # after every refusal: a refused run leaves no folder
        # opened first: a storage that cannot be opened ends the run before any measuring
        storage = open_storage(config.storage, Path(config.out))
        saved = saved_settings(storage, config.study)
        if saved is None:  # a new study: a relative budget is calibrated once, here
            config, calibration = calibrate_budget(config, latency, data)
        study = open_study(config, storage)
        if saved is None and calibration is not None:
            study.set_user_attr(CALIBRATION_ATTR, calibration)
    saved_ms = study.user_attrs["settings"]["budget_ms"]
    calibration = study.user_attrs.get(CALIBRATION_ATTR)
    if calibration is not None:
        notes.append(_calibration_note(config, calibration)
                     + ("" if saved is None else " (measured when the study began, kept)"))
    elif saved_ms != config.budget_ms:  # a rerun of a relative budget keeps the study's
        notes.append(f"budget {config.budget} resolves to {config.budget_ms:.4g} ms now; the "
                     f"study's trials were run against {saved_ms:.4g} ms, which is kept")
    config = config.with_budget_ms(saved_ms)
    objective = Objective(config, data, latency.predict, profile.fast_widths(), artifacts)
    others = run_trials(study, objective, config.trials, progress=progress)
    with finalizer(study, config, others) as why_not:
        if why_not:
            print(f"compressm-tune: this worker's trials are done; {why_not}; the bundle will "
                  f"also be in the artifact store {artifacts.where} (study user attr 'bundle')",
                  file=sys.stderr)
            return {"finalized": False, "meets_budget": None}
        chosen = choose_and_export(config, study, data, artifacts)
        references = train_references(config, data, chosen)
        summary = write_report(config, study, chosen, references, data, profile, latency, notes)
        try:
            publish_bundle(config, study, chosen, artifacts)
        except ArtifactStoreError as exc:  # the job's result is in OUT all the same
            print(f"compressm-tune: warning: the bundle is in {config.out} only: {exc}",
                  file=sys.stderr)
        return summary


def _resolve_budget(config: TuneConfig, latency: LatencyModel) -> TuneConfig:
    """The config with its latency budget in ms: a relative budget is that fraction of the
    full model's latency as ``latency`` predicts it on this machine."""
    if config.budget_fraction is None:
        return config
    full = latency.predict([config.full_width] * config.blocks, config.metric)
    return config.with_budget_ms(config.budget_fraction * full)


CALIBRATION_ATTR = "calibration"  # study user attr: the relative budget's calibration record


def _calibration_note(config: TuneConfig, c: dict[str, Any]) -> str:
    loads = "-".join(f"{x:.2f}" for x in c["loadavg_1min"])
    probes = c.get("probes") or [c]  # a study begun before probes were recorded
    timed = ", then ".join(f"{p['width']} states per block {p['measured_ratio']:.3f}x (the "
                           f"profile: {p['predicted_ratio']:.3f}x)" for p in probes)
    aim = (f"held at {c['held_at']} states per block, the widest width measured to fit"
           if c.get("held_at") else
           f"{100 * c['margin']:.0f}% inside the budget, the rounds' relative standard "
           "deviation (5-20%), the measured check's noise")
    return (f"budget {config.budget} calibrated here, each width timed against the full model "
            f"side by side (median of {len(c['ratios'])} interleaved rounds, 1-minute load "
            f"{loads}): {timed}; so the search aims at {c['budget_ms']:.4g} ms of the "
            f"profile's, not {c['budget_ms_profile']:.4g}: {aim}")


def _budget_notes(config: TuneConfig, latency: LatencyModel, profile: Profile) -> list[str]:
    """Refuse a budget below the fastest model; note one that does not bind, or a latency
    that barely depends on the state width."""
    fastest, width = min((latency.predict([w] * config.blocks, config.metric), w)
                         for w in {1, *profile.widths})
    if config.budget_ms < fastest:
        given = (f"budget {config.budget} ({config.budget_ms:.4g} ms)" if config.budget
                 else f"--budget-ms {config.budget_ms:g}")
        raise ConfigError(
            f"{given} is below the fastest model this machine runs: "
            f"{fastest:.4g} ms per {'sequence' if config.latency_mode == 'sequence' else 'token'}"
            f" ({config.blocks} blocks of {width} states, H={config.hidden}); raise the budget")
    notes = []
    full = latency.predict([config.full_width] * config.blocks, config.metric)
    if full <= config.budget_ms:
        notes.append(f"the full model is predicted at {full:.4g} ms, within the budget: the "
                     "search maximizes accuracy and training speed, latency does not bind")
    if full < 1.1 * fastest:
        notes.append(f"latency is nearly flat in state width at this shape ({fastest:.4g} to "
                     f"{full:.4g} ms): a fixed per-token cost dominates, so narrower states buy "
                     "training time and memory here, not latency (a larger --hidden shows more)")
    return notes


def resolve_profile(config: TuneConfig, d_input: int, d_output: int,
                    seq_len: int) -> tuple[Profile, list[str]]:
    """The profile the job predicts with, and notes for the report
    (:func:`compressm_tune.hardware.resolve_profile` at the job's model shape)."""
    shape = config.profile_shape(d_input, d_output, seq_len)
    return hardware.resolve_profile(**shape)
