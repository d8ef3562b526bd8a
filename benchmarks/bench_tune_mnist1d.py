"""The budgeted job on MNIST-1D at three budgets, tight to loose, on this machine.

For each budget: the searched model (chosen widths, test accuracy, measured vs budget latency,
search wall time) against the full model and against the best small-from-scratch model that
meets the same budget (the largest uniform width the profile predicts to fit, trained from
scratch with the same steps, exported and measured the same way).

    python benchmarks/bench_tune_mnist1d.py [--trials 6] [--steps 300] [--results-dir DIR]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, machine_line, parser, write  # noqa: E402

from compressm_tune._table import markdown_table  # noqa: E402
from compressm_tune.data import load_dataset  # noqa: E402
from compressm_tune.exporter import export_bundle, measure_latency  # noqa: E402
from compressm_tune.hardware import LatencyModel  # noqa: E402
from compressm_tune.models import SSMConfig  # noqa: E402
from compressm_tune.search import TuneConfig, resolve_profile, run_tune  # noqa: E402
from compressm_tune.training import TrainConfig, Trainer  # noqa: E402


def _scratch(config: TuneConfig, data, latency: LatencyModel, out: Path) -> dict:
    """Largest uniform width predicted to fit, trained from scratch, exported, measured."""
    fits = [w for w in range(1, max(config.state_dims) + 1)
            if latency.predict([w] * config.blocks, config.metric) <= config.budget_ms]
    width = max(fits)
    model_config = SSMConfig(d_input=data.d_input, d_output=data.d_output,
                             d_model=config.hidden, state_dims=[width] * config.blocks)
    summary = Trainer(model_config, TrainConfig(steps=config.steps, seed=config.seed,
                                                eval_every=max(1, config.steps // 10),
                                                threads=config.threads),
                      data, out, progress=False).fit()
    export_bundle(out / "best.pt", out / "bundle")
    timing = measure_latency(out / "bundle", mode=config.latency_mode, threads=1)
    return {"state_dims": [width] * config.blocks, "test": summary["test_best"]["accuracy"],
            "measured_ms": timing["p50_ms"], "train_time_s": summary["train_time_s"]}


def main() -> None:
    ap = parser(__doc__, "tune_mnist1d", quick="2 trials of 20 steps, H=16")
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--hidden", type=int, default=128,
                    help="H; at small H the ONNX Scan's per-step overhead hides N entirely")
    ap.add_argument("--out", default="runs/bench-tune")
    args = ap.parse_args()
    if args.quick:
        args.trials, args.steps, args.hidden = 2, 20, 16
    base = TuneConfig(budget_ms=1.0, dataset="mnist1d", blocks=2, batch_size=64,
                      state_dims=(64, 128, 256), trials=args.trials, steps=args.steps,
                      out=args.out, hidden=args.hidden, threads=1)
    data = load_dataset("mnist1d")
    profile, _ = resolve_profile(base, data.d_input, data.d_output, data.seq_len)
    latency = LatencyModel.from_profile(profile)
    fastest = min(latency.predict([w] * base.blocks, base.metric) for w in profile.widths)
    full = latency.predict([max(base.state_dims)] * base.blocks, base.metric)
    budgets = [fastest + f * (full - fastest) for f in (0.15, 0.45, 0.9)]
    rows, results, load = [], [], os.getloadavg()[0]
    for i, budget in enumerate(budgets):
        config = TuneConfig(**{**base.__dict__, "budget_ms": round(budget, 4),
                               "study": f"budget-{i}"})
        t0 = time.time()
        s = run_tune(config)
        wall = time.time() - t0
        scratch = _scratch(config, data, latency, Path(args.out) / f"scratch-{i}")
        results.append({"budget_ms": config.budget_ms, "tuned": s, "scratch": scratch,
                        "search_wall_s": wall})
        metric = "test_accuracy"
        rows.append([f"{config.budget_ms:.3f}", s["final_state_dims"], s[metric],
                     f"{s['measured_ms']:.3f}", "yes" if s["meets_budget"] else "NO",
                     f"{wall / 60:.1f}", scratch["state_dims"], scratch["test"],
                     f"{scratch['measured_ms']:.3f}", s["full"]["state_dims"],
                     s["full"][metric]])
    headers = ["budget ms", "tuned dims", "tuned test acc", "tuned measured ms", "meets",
               "search min", "scratch dims", "scratch test acc", "scratch measured ms",
               "full dims", "full test acc"]
    m = machine(load)
    md = "\n".join([
        "# compressm-tune --budget-ms on MNIST-1D: three budgets", "",
        machine_line(m) + " onnxruntime "
        f"1 thread, batch 1, per 40-token sequence (p50). {args.trials} trials x "
        f"{args.steps} steps per budget, H={args.hidden}; budgets at 15/45/90% of the way "
        f"from the fastest predicted model ({fastest:.3f} ms) to the full one ({full:.3f} ms). "
        "'scratch' is the largest uniform width predicted to fit, trained from scratch with "
        "the same steps.", "",
        markdown_table(headers, rows)])
    write(args.results_dir / args.name, {"machine": m, "budgets": budgets, "results": results},
          md)


if __name__ == "__main__":
    main()
