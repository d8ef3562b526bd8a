"""After the search: export and measure the winner, train the full reference, write the report."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import optuna

from compressm_tune._io import atomic_write_text, read_json
from compressm_tune._table import markdown_table
from compressm_tune.hardware import LatencyModel, Profile
from compressm_tune.models import SSMConfig
from compressm_tune.search._config import TuneConfig
from compressm_tune.search._job import BudgetMissedError
from compressm_tune.training import Dataset, Trainer, model_from_checkpoint

__all__ = ["choose_and_export", "write_report"]


def _export_and_measure(config: TuneConfig, checkpoint: str, out: Path) -> dict[str, Any]:
    from compressm_tune.exporter import export_bundle, measure_latency

    manifest = export_bundle(checkpoint, out)
    timing = measure_latency(out, mode=config.latency_mode, threads=config.ort_threads,
                             record=True)
    return {"manifest": manifest, "latency": timing}


def choose_and_export(config: TuneConfig, feasible: list[optuna.trial.FrozenTrial],
                      data: Dataset) -> dict[str, Any]:
    """Export feasible trials best-first until one's *measured* latency meets the budget.

    The bundle of the chosen trial is copied into the run directory (``model.onnx``,
    ``model.ts``, ``manifest.json``, ``checkpoint.pt``).
    """
    out = Path(config.out)
    misses = []
    for trial in feasible:
        if not Path(trial.user_attrs["checkpoint"]).exists():
            continue  # trained by a worker on another machine; its checkpoint lives there
        # in this worker's own run directory: workers sharing a study may pick the same trial
        bundle = out / "bundles" / f"{config.study}-{trial.number:04d}"
        result = _export_and_measure(config, trial.user_attrs["checkpoint"], bundle)
        measured = result["latency"]["p50_ms"]
        if measured <= config.budget_ms:
            for f in bundle.iterdir():
                if f.is_file():
                    shutil.copy2(f, out / f.name)
            shutil.copy2(trial.user_attrs["checkpoint"], out / "checkpoint.pt")
            return {"trial": trial, "measured": result["latency"],
                    "manifest": result["manifest"], "fallbacks": misses}
        misses.append({"trial": trial.number, "predicted_ms": trial.user_attrs["predicted_ms"],
                       "measured_ms": measured})
    if not misses:
        raise BudgetMissedError("no feasible trial's checkpoint is on this machine; run the "
                                "job where the best trials were trained")
    raise BudgetMissedError(
        f"every feasible trial missed {config.budget_ms:g} ms when measured: "
        + ", ".join(f"trial {m['trial']} {m['measured_ms']:.3g} ms" for m in misses))


def _full_reference(config: TuneConfig, data: Dataset) -> dict[str, Any]:
    """Train (once; cached in OUT/full) the uncompressed model the report compares with.

    A run killed while training it resumes from its last checkpoint; a summary that is not a
    complete one (cut short, edited) is treated as absent."""
    out = Path(config.out) / "full"
    summary = read_json(out / "summary.json")
    if isinstance(summary, dict) and {"final_state_dims", "test_best", "train_time_s"} <= set(
            summary):
        return summary
    width = max(config.state_dims)
    model_config = SSMConfig(arch=config.arch, d_input=data.d_input, d_output=data.d_output,
                             d_model=config.hidden, state_dims=[width] * config.blocks,
                             pooling=data.pooling)
    return Trainer(model_config, config.train_config(), data, out, progress=False,
                   resume=True).fit()


def write_report(config: TuneConfig, study: optuna.Study, chosen: dict[str, Any], data: Dataset,
                 profile: Profile, latency: LatencyModel, notes: list[str]) -> dict[str, Any]:
    """``summary.json`` + ``report.md`` + plots in the run directory; returns the summary."""
    out = Path(config.out)
    trial = chosen["trial"]
    full = _full_reference(config, data)
    metric = "accuracy" if data.task == "classification" else "loss"
    full_dims = full["final_state_dims"]
    measured = chosen["measured"]
    summary = {
        "budget_ms": config.budget_ms, "budget_mj": config.budget_mj,
        "latency_mode": config.latency_mode, "arch": config.arch, "dataset": config.dataset,
        "chosen_trial": trial.number, "params": trial.params,
        "initial_state_dims": [trial.params["state_dim"]] * config.blocks,
        "final_state_dims": trial.user_attrs["state_dims"],
        "predicted_ms": trial.user_attrs["predicted_ms"], "measured_ms": measured["p50_ms"],
        "latency_measurement": measured,
        "meets_budget": measured["p50_ms"] <= config.budget_ms,
        "val": trial.user_attrs["val"], f"test_{metric}": trial.user_attrs["test"],
        "train_time_s": trial.user_attrs["train_time_s"],
        "full": {"state_dims": full_dims, f"test_{metric}": full["test_best"][metric],
                 "predicted_ms": latency.predict(full_dims, config.metric),
                 "train_time_s": full["train_time_s"]},
        "fallbacks": chosen["fallbacks"],
        "trials": {s.name.lower(): len(study.get_trials(states=(s,)))
                   for s in optuna.trial.TrialState},
        "profile": {"device": profile.device.label, "runtime": profile.config.runtime,
                    "created_utc": profile.created_utc},
        "notes": notes, "parity": chosen["manifest"].get("parity"),
        "training": {"device": full.get("device", "cpu"),
                     "precision": full.get("precision", "fp32")},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _plots(study, config, out, data)
    (out / "report.md").write_text(_markdown(summary, metric) + "\n")
    return summary


def _markdown(s: dict[str, Any], metric: str) -> str:
    full = s["full"]
    rows = [
        ["full", full["state_dims"], full[f"test_{metric}"], full["predicted_ms"], "-",
         full["train_time_s"]],
        [f"chosen (trial {s['chosen_trial']})", s["final_state_dims"], s[f"test_{metric}"],
         s["predicted_ms"], s["measured_ms"], s["train_time_s"]],
    ]
    lines = [
        f"# compressm-tune: budget {s['budget_ms']:g} ms per "
        f"{'sequence' if s['latency_mode'] == 'sequence' else 'token'}",
        "",
        f"Chosen model **{'meets' if s['meets_budget'] else 'MISSES'}** the budget: measured "
        f"{s['measured_ms']:.4g} ms (onnxruntime, batch 1, "
        f"{s['latency_measurement'].get('threads', '?')} thread(s), p50) vs predicted "
        f"{s['predicted_ms']:.4g} ms.",
        "",
        markdown_table(["model", "state dims", f"test {metric}", "predicted ms", "measured ms",
                        "train time s"], rows),
        "",
        f"Training time saved vs the full model: "
        f"{1 - s['train_time_s'] / max(full['train_time_s'], 1e-9):.0%}. Trials: "
        + ", ".join(f"{k} {v}" for k, v in s["trials"].items() if v),
        "",
        f"Search parameters: `{json.dumps(s['params'])}`. Trials trained on "
        f"{s['training']['device']} ({s['training']['precision']}); latency is onnxruntime's on "
        "the profiled machine.",
        "",
        "![optimization history](history.png)",
        "",
        "![HSV spectra of the chosen model](hsv.png)",
    ]
    if s["fallbacks"]:
        lines += ["", "Fell back past trials whose measured latency missed the budget: "
                  + ", ".join(f"trial {f['trial']} ({f['measured_ms']:.3g} ms)"
                              for f in s["fallbacks"])]
    if s["notes"]:
        lines += ["", "Notes:", *[f"- {n}" for n in s["notes"]]]
    return "\n".join(lines)


def _plots(study: optuna.Study, config: TuneConfig, out: Path, data: Dataset) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from compressm_tune.training.reducer import CALIBRATION, spectrum_record

    with warnings.catch_warnings():  # optuna's matplotlib plots are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if config.pareto:
            ax = optuna.visualization.matplotlib.plot_pareto_front(
                study, target_names=["val score", "predicted ms"])
            ax.figure.savefig(out / "pareto.png", dpi=110, bbox_inches="tight")
        else:
            ax = optuna.visualization.matplotlib.plot_optimization_history(study)
            ax.figure.savefig(out / "history.png", dpi=110, bbox_inches="tight")
        plt.close("all")
    model = model_from_checkpoint(out / "checkpoint.pt")
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for record in spectrum_record(model, data.x_train[:CALIBRATION]):
        g = np.asarray(record["hsv"])  # LRU: HSVs; selective: data importance, descending
        ax.semilogy(np.arange(1, len(g) + 1), g / g[0], marker=".",
                    label=f"layer {record['layer']}")
    kind = "HSV" if config.arch == "lru" else "state importance"
    ax.set(xlabel="state (by rank)", ylabel=f"{kind} / largest",
           title=f"chosen model: {kind} spectra")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "hsv.png", dpi=110)
    plt.close(fig)
