"""After the search: pick the best feasible trial whose *measured* latency meets the budget
(a relative budget against the full model measured in the same rounds), train the references
the report compares it with (the full width, and the chosen widths from scratch), and measure
all three side by side."""

from __future__ import annotations

import math
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

import optuna
import torch

from compressm_tune._io import read_json
from compressm_tune.data import Dataset
from compressm_tune.errors import BudgetMissedError
from compressm_tune.exporter import export_bundle, measure_latency
from compressm_tune.models import SSMModel
from compressm_tune.search._artifacts import Artifacts
from compressm_tune.search._config import TuneConfig
from compressm_tune.search._objective import constraints_of
from compressm_tune.training import Trainer, dataset_record, save_checkpoint

__all__ = ["choose_and_export", "corrected_ms", "feasible_trials", "infeasible_message",
           "measure_against_budget", "measure_side_by_side", "next_candidate", "passed_over",
           "publish_bundle", "timing_reference", "train_reference", "train_references",
           "trial_files"]

COMPARISON_ROUNDS = 3  # interleaved timing rounds per model: load drifts between rounds


def feasible_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed trials predicted to meet every budget, best validation score first."""
    done = [t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
            if all(c <= 0 for c in constraints_of(t))]
    # equal validation scores (common: a few hundred validation samples) go to the faster model
    return sorted(done, key=lambda t: (-t.user_attrs["val"], t.user_attrs["predicted_ms"]))


def infeasible_message(config: TuneConfig, study: optuna.Study) -> str:
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


def trial_files(config: TuneConfig, artifacts: Artifacts,
                trial: optuna.trial.FrozenTrial) -> Path | None:
    """A local folder with the trial's ``best.pt`` and ``metrics.jsonl``: downloaded from the
    artifact store into ``OUT/fetched/``, whichever worker trained it. A trial of a study run
    before trials uploaded their files recorded a local path instead: that folder, or None
    when it is not on this machine."""
    ids = trial.user_attrs.get("artifacts")
    if ids:
        return artifacts.fetch(ids, Path(config.out) / "fetched" /
                               f"{config.study}-{trial.number:04d}", f"trial {trial.number}")
    local = trial.user_attrs.get("checkpoint")
    return Path(local).parent if local and Path(local).is_file() else None


def choose_and_export(config: TuneConfig, study: optuna.Study, data: Dataset,
                      artifacts: Artifacts) -> dict[str, Any]:
    """Export feasible trials until one's *measured* latency meets the budget.

    The first tried is the best by validation score; after a miss, the next is the best
    whose prediction still fits once corrected by what was measured (:func:`next_candidate`),
    so a near-budget trial is tried before a far smaller one, and one the measurements say
    will miss is passed over unmeasured. Every candidate is timed by
    :func:`measure_against_budget`: a relative budget against the full width timed in the
    same rounds. The trials' files come from ``artifacts`` (:func:`trial_files`). The bundle
    of the chosen trial is copied into the run directory (``model.onnx``, ``model.ts``,
    ``manifest.json``, ``checkpoint.pt``). Returns the trial, its measurement (``measured``),
    its bundle folder, its manifest, the local folder of its files (``files``) and the better
    trials passed over, each with why (``fallbacks``).

    Raises
    ------
    BudgetMissedError
        No trial is predicted to meet the budgets, or every feasible one missed when measured.
    ArtifactStoreError
        A feasible trial's files are not in the artifact store (another store than its
        worker's), or the store cannot be read.
    """
    feasible = feasible_trials(study)
    if not feasible:
        raise BudgetMissedError(infeasible_message(config, study))
    out = Path(config.out)
    reference = timing_reference(config, data)
    misses: list[dict[str, Any]] = []
    absent: list[int] = []
    remaining = list(feasible)
    while remaining:
        trial = next_candidate(remaining, misses, config.budget_ms)
        remaining.remove(trial)
        files = trial_files(config, artifacts, trial)
        if files is None:
            absent.append(trial.number)  # an old study's trial, trained on another machine
            continue
        # in this worker's own run directory: workers sharing a study may pick the same trial
        bundle = out / "bundles" / f"{config.study}-{trial.number:04d}"
        manifest = export_bundle(files / "best.pt", bundle)
        measured = measure_against_budget(config, bundle, reference)
        if measured["meets"]:
            for f in bundle.iterdir():
                if f.is_file():
                    shutil.copy2(f, out / f.name)
            shutil.copy2(files / "best.pt", out / "checkpoint.pt")
            return {"trial": trial, "measured": measured, "bundle": bundle,
                    "manifest": manifest, "files": files,
                    "fallbacks": passed_over(feasible, trial, misses, absent, config.budget_ms)}
        predicted = trial.user_attrs["predicted_ms"]
        misses.append({"trial": trial.number, "predicted_ms": predicted,
                       "measured_ms": measured["p50_ms"], "limit_ms": measured["limit_ms"],
                       "full_ms": measured["full_ms"],
                       # measured over predicted, each as a share of its budget
                       "correction": (measured["p50_ms"] / measured["limit_ms"])
                       / (predicted / config.budget_ms)})
    if not misses:
        raise BudgetMissedError("no feasible trial's checkpoint is on this machine (the study's "
                                "trials recorded local paths, from before artifact stores); "
                                "run the job where the best trials were trained")
    raise BudgetMissedError(
        f"every feasible trial missed {_budget_words(config)} when measured: "
        + ", ".join(f"trial {m['trial']} {m['measured_ms']:.3g} ms (limit {m['limit_ms']:.3g})"
                    for m in misses))


def _budget_words(config: TuneConfig) -> str:
    return (f"{config.budget} of the full model" if config.budget_fraction is not None
            else f"{config.budget_ms:g} ms")


def corrected_ms(trial: optuna.trial.FrozenTrial, misses: list[dict[str, Any]]) -> float:
    """The trial's predicted latency corrected by what was measured: times the
    measured/predicted ratio of the measured trial nearest to it in predicted latency (the
    profile's error depends on the width, so the nearest measurement says most). Without
    measurements, the prediction."""
    predicted = trial.user_attrs["predicted_ms"]
    if not misses:
        return predicted
    nearest = min(misses, key=lambda m: abs(math.log(m["predicted_ms"] / predicted)))
    return predicted * nearest["correction"]


def next_candidate(remaining: list[optuna.trial.FrozenTrial], misses: list[dict[str, Any]],
                   budget_ms: float) -> optuna.trial.FrozenTrial:
    """Which trial of ``remaining`` (best validation score first) to measure next: the best
    whose :func:`corrected_ms` meets ``budget_ms``, else the one corrected fastest (the
    measurement decides; the correction only ranks)."""
    fits = [t for t in remaining if corrected_ms(t, misses) <= budget_ms]
    return fits[0] if fits else min(remaining, key=lambda t: corrected_ms(t, misses))


def passed_over(feasible: list[optuna.trial.FrozenTrial], chosen: optuna.trial.FrozenTrial,
                misses: list[dict[str, Any]], absent: list[int],
                budget_ms: float) -> list[dict[str, Any]]:
    """The trials ranked above ``chosen`` by validation score, and any other measured, each
    with why it was not chosen (``reason``): measured over the budget, files not on this
    machine, or predicted to miss once corrected by the measurements (then not measured)."""
    measured = {m["trial"]: m for m in misses}
    rows = []
    above = {t.number for t in feasible[:feasible.index(chosen)]}
    for trial in feasible:
        if trial.number not in above and trial.number not in measured:
            continue
        if trial.number in measured:
            m = measured[trial.number]
            against = (f"{m['measured_ms'] / m['full_ms']:.3g}x of the full model's "
                       f"{m['full_ms']:.3g} ms in the same rounds" if m["full_ms"] else "")
            rows.append({**m, "reason": f"measured {m['measured_ms']:.3g} ms"
                         + (f" ({against})" if against else "")
                         + f" > {m['limit_ms']:.3g} ms"})
        elif trial.number in absent:
            rows.append({"trial": trial.number, "measured_ms": None,
                         "reason": "its checkpoint is not on this machine"})
        else:
            fix = corrected_ms(trial, misses)
            rows.append({"trial": trial.number, "measured_ms": None, "corrected_ms": fix,
                         "predicted_ms": trial.user_attrs["predicted_ms"],
                         "reason": f"not measured: predicted {trial.user_attrs['predicted_ms']:.3g}"
                                   f" ms, {fix:.3g} ms corrected by the measured trials' error"
                                   f" > {budget_ms:.3g} ms"})
    return rows


def timing_reference(config: TuneConfig, data: Dataset) -> Path | None:
    """For a relative budget, the bundle every candidate is timed against: the full width,
    untrained (latency depends on the widths, not the weights; the trained full model comes
    only after the choice, with the chosen trial's settings). ``None`` for an absolute
    budget."""
    if config.budget_fraction is None:
        return None
    return _untrained_bundle(config, data, config.full_width, "full-untrained")


def _untrained_bundle(config: TuneConfig, data: Dataset, width: int, name: str) -> Path:
    """An untrained model of ``width`` states per block, exported once for timing."""
    name = f"{config.study}-{name}"
    checkpoint = Path(config.out) / "references" / name / "init.pt"
    if not checkpoint.is_file():
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            model = SSMModel(config.model_config(data, width))
        save_checkpoint(checkpoint, model, dataset=dataset_record(data))
    return _export_for_timing(config, checkpoint, name)


CALIBRATION_ROUNDS = 5  # interleaved rounds of each probe of the relative budget's calibration
CALIBRATION_PROBES = 3  # widths the calibration may time before it caps the budget
MIN_MARGIN, MAX_MARGIN = 0.05, 0.2  # the share the search aims inside a calibrated budget


def calibrate_budget(config: TuneConfig, latency: Any, data: Dataset
                     ) -> tuple[TuneConfig, dict[str, Any] | None]:
    """A relative budget's target for the search, in the profile's milliseconds, calibrated
    on this machine's measured ratio and its noise.

    The finalizer judges a candidate by its measured latency against the full model's in the
    same rounds; the search reads the profile. When the profile's ratio at the budget's edge
    is off (its widths were timed apart, at other loads), every trial it steers to the edge
    misses when measured. So before the search the full width and the widest uniform width
    the profile puts within the budget (the edge) are exported untrained (latency depends on
    the widths, not the weights) and timed side by side, round by round; the search's budget
    is scaled by the profile's over the measured ratio (median of the rounds) at that width,
    and aims inside it by the rounds' relative standard deviation (``MIN_MARGIN`` to
    ``MAX_MARGIN``): trials end at the edge the budget sets, and the finalizer's measurement
    there is about as noisy as these.

    A correction measured at one width holds near it only. When it raises the budget, the
    new edge lies at widths nobody timed (on this machine the profile's error changes sign
    across the range), so the new edge is probed in turn, up to ``CALIBRATION_PROBES``
    widths; if the last probe still raises the budget, it is capped at the widest width
    measured to fit. A budget that a probe lowers stops there (the edge then lies below a
    measured width, and narrower is faster), but not below a width an earlier probe measured
    to fit, inside the margin.
    Returns the config and the calibration's record: the last probe's figures, every probe
    (``probes``) and the width measured to fit whose predicted latency became the budget
    (``held_at``: capped or kept from falling below it; else None). None for an
    absolute budget, or when no width is predicted within the budget."""
    if config.budget_fraction is None:
        return config, None

    def predict(w: int) -> float:
        return latency.predict([w] * config.blocks, config.metric)

    def edge(budget_ms: float) -> int | None:
        inside = [w for w in range(1, config.full_width) if predict(w) <= budget_ms]
        return max(inside, default=None)

    probe = edge(config.budget_ms)
    if probe is None:
        return config, None
    full = timing_reference(config, data)
    probes: list[dict[str, Any]] = []
    while True:
        probes.append(_probe(config, data, full, probe,
                             predict(probe) / predict(config.full_width)))
        budget_ms, raised = probes[-1]["budget_ms"], False
        nxt = edge(budget_ms)
        if nxt is None or nxt <= probe:
            break
        if len(probes) == CALIBRATION_PROBES:  # raised past every width measured
            raised = True
            break
        probe = nxt
    fit = max((p["width"] for p in probes
               if p["measured_ratio"] <= config.budget_fraction * (1 - p["margin"])),
              default=None)
    held_at = None  # the measured width whose predicted latency becomes the budget
    if fit is not None and (raised or budget_ms < predict(fit)):
        held_at, budget_ms = fit, predict(fit)
    loads = [x for p in probes for x in p.pop("loadavg_1min")]
    record = {**probes[-1], "budget_ms": budget_ms, "budget_ms_profile": config.budget_ms,
              "probes": probes, "held_at": held_at,
              "loadavg_1min": [min(loads), max(loads)]}
    return config.with_budget_ms(budget_ms), record


def _probe(config: TuneConfig, data: Dataset, full: Path, width: int,
           predicted: float) -> dict[str, Any]:
    """One width of the calibration, timed against the full model in ``CALIBRATION_ROUNDS``
    interleaved rounds: its measured ratio (median), the rounds' ratios, the margin their
    spread sets and the search's budget this width's correction gives."""
    bundles = {"full": full,
               "probe": _untrained_bundle(config, data, width, f"probe-{width}")}
    rounds = [measure_side_by_side(config, bundles, rounds=1)
              for _ in range(CALIBRATION_ROUNDS)]
    ratios = [r["probe"]["p50_ms"] / r["full"]["p50_ms"] for r in rounds]
    measured = statistics.median(ratios)
    margin = min(MAX_MARGIN, max(MIN_MARGIN, statistics.stdev(ratios) / measured))
    return {"width": width, "predicted_ratio": predicted, "measured_ratio": measured,
            "ratios": ratios, "margin": margin,
            "budget_ms": config.budget_ms * predicted / measured * (1 - margin),
            "loadavg_1min": [x for r in rounds for x in r["full"]["loadavg_1min"]]}


def measure_against_budget(config: TuneConfig, bundle: Path,
                           reference: Path | None) -> dict[str, Any]:
    """Time a candidate bundle and judge it against the budget (p50).

    A relative budget is judged as the user reads it: the candidate against the full model
    (``reference``) measured in the same interleaved rounds, so load that drifts between
    rounds moves both; the limit is the fraction of the full model's median. An absolute
    budget is the candidate alone, its repeats in the same rounds. Returns
    :func:`measure_side_by_side`'s entry of the candidate plus ``limit_ms``, ``full_ms``
    (None without a reference) and ``meets``.
    """
    timing = measure_side_by_side(config, {"candidate": bundle} | (
        {"full": reference} if reference is not None else {}))
    candidate = timing["candidate"]
    full_ms = timing["full"]["p50_ms"] if reference is not None else None
    limit = config.budget_ms if full_ms is None else config.budget_fraction * full_ms
    return {**candidate, "limit_ms": limit, "full_ms": full_ms,
            "meets": candidate["p50_ms"] <= limit}


def publish_bundle(config: TuneConfig, study: optuna.Study, chosen: dict[str, Any],
                   artifacts: Artifacts) -> dict[str, str]:
    """Upload the chosen bundle (its files, ``checkpoint.pt``, ``summary.json``, ``report.md``)
    to the artifact store as artifacts of the study, and record their ids in the study's user
    attr ``bundle`` (with the trial's number), where a worker on any machine finds them;
    returns name -> artifact id."""
    out = Path(config.out)
    names = [f.name for f in sorted(chosen["bundle"].iterdir()) if f.is_file()]
    ids = artifacts.upload(study, {name: out / name for name in
                                   [*names, "checkpoint.pt", "summary.json", "report.md"]})
    study.set_user_attr("bundle", {"trial": chosen["trial"].number, "files": ids})
    return ids


def train_reference(config: TuneConfig, data: Dataset, name: str, widths: list[int],
                    settings: dict[str, Any]) -> dict[str, Any]:
    """Train (once; kept in ``OUT/name``) a model of ``widths`` without reduction, with the
    config's training settings plus ``settings`` (the chosen trial's); returns its training
    summary. The full reference (the full width) and the scratch baseline (the chosen widths
    from the start) are such models: with the same steps and settings as the chosen trial,
    they show what cutting changed.

    A run killed while training one resumes from its last checkpoint; a summary that is not a
    complete one (cut short, edited) is treated as absent."""
    out = Path(config.out) / name
    summary = read_json(out / "summary.json")
    if isinstance(summary, dict) and {"final_state_dims", "test_best", "train_time_s"} <= set(
            summary):
        return summary
    return Trainer(config.model_config(data, widths), config.train_config(**settings), data,
                   out, progress=False, resume=True).fit()


def train_references(config: TuneConfig, data: Dataset, chosen: dict[str, Any]
                     ) -> dict[str, Any]:
    """The full reference and (unless ``config.baseline`` is off) the scratch baseline of the
    chosen trial, trained with its settings and steps, exported and timed side by side with it.

    Returns ``full`` and ``scratch`` (training summaries; ``scratch`` None without a baseline)
    and ``timing`` (:func:`measure_side_by_side` of ``full``, ``chosen``, ``scratch``).
    """
    trial = chosen["trial"]
    settings = trial.user_attrs.get("train_settings") or {
        "lr": trial.params["lr"], "warmup_frac": trial.params["window"]}
    tag = f"{config.study}-{trial.number:04d}"
    models = {"full": [config.full_width] * config.blocks}
    if config.baseline:
        models["scratch"] = list(trial.user_attrs["state_dims"])
    summaries: dict[str, Any] = {"scratch": None}
    bundles = {}
    for name, widths in models.items():
        folder = f"references/{tag}-{name}"
        summaries[name] = train_reference(config, data, folder, widths, settings)
        bundles[name] = _export_for_timing(config, Path(config.out) / folder / "best.pt",
                                           f"{tag}-{name}")
    bundles["chosen"] = chosen["bundle"]
    order = [n for n in ("full", "chosen", "scratch") if n in bundles]
    return {**summaries, "timing": measure_side_by_side(config, {n: bundles[n] for n in order})}


def _export_for_timing(config: TuneConfig, checkpoint: Path, name: str) -> Path:
    """An ONNX bundle (the budget's mode only) of a reference model, exported once."""
    bundle = Path(config.out) / "bundles" / name
    if not (bundle / "manifest.json").is_file():
        export_bundle(checkpoint, bundle, formats=("onnx",), modes=(config.latency_mode,))
    return bundle


def measure_side_by_side(config: TuneConfig, bundles: dict[str, Path],
                         rounds: int = COMPARISON_ROUNDS) -> dict[str, dict[str, Any]]:
    """Time exported bundles in interleaved rounds (onnxruntime, batch 1, the config's threads).

    On a shared machine the load moves between measurements, so the models take turns: every
    round times each once. Returns per name ``p50_ms``, ``p90_ms`` and ``p99_ms`` (medians
    over the rounds), ``n_samples`` (calls timed, all rounds), ``loadavg_1min`` (the rounds'
    lowest and highest), ``rounds``, ``threads`` and ``cpu_count``.
    """
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in bundles}
    for _ in range(rounds):
        for name, bundle in bundles.items():
            samples[name].append(measure_latency(bundle, mode=config.latency_mode,
                                                 threads=config.ort_threads, min_time_s=0.3))
    result = {}
    for name, runs in samples.items():
        loads = [r.get("machine", {}).get("loadavg_1min") for r in runs]
        loads = [x for x in loads if x is not None] or [os.getloadavg()[0]]
        result[name] = {
            **{key: statistics.median(r[key] for r in runs)
               for key in ("p50_ms", "p90_ms", "p99_ms")},
            "n_samples": sum(r["n_samples"] for r in runs),
            "loadavg_1min": [min(loads), max(loads)], "rounds": rounds,
            "threads": runs[0].get("threads"), "cpu_count": os.cpu_count()}
    return result
