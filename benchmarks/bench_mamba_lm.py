"""Character-level language modelling on the Python standard library's own sources.

Per architecture and seed, three runs, interleaved (compressed, full, scratch per seed, so a
change of machine load hits every variant alike):
  full        the starting state width throughout
  compressed  in-training reduction (Hankel / importance tau rule) inside the first 10% of
              the steps, with the safety net
  settle      the same window and tau with ``--schedule settle`` (cut toward each layer's
              settled target width; LRU: input-weighted HSVs), issue 17's schedule
  scratch     a model of the compressed run's final widths trained from scratch
Dataset ``pystdlib-chars`` (next character, split by file; no download). Metric: test bits
per character (cross-entropy / ln 2) at the best validation checkpoint of the final widths;
training time excludes evaluation and includes reduction. One torch thread per run.
Output: bench_results/mamba_lm.{json,md,png}. Issue 15's target (for --arch mamba): the state
cut to <= 1/4 with <= 2% relative bits/char loss against full.

    python benchmarks/bench_mamba_lm.py [--arch lru,mamba] [--seeds 3] [--steps N]
        [--state mamba=64] [--tau 0.04] [--name mamba_lm] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, write  # noqa: E402

# Small on purpose: 9 runs per architecture on a shared 2-core CPU in about 10 minutes.
BASE = {"blocks": 2, "hidden": 64, "steps": 1000, "batch": 32, "lr": 3e-3, "eval_every": 100,
        "reduce_every": 10, "tau": 0.04, "window": 0.1}
STATE = {"lru": 64, "selective": 16, "mamba": 16}  # starting width per layer (Mamba: d_state)
VARIANTS = ("full", "compressed", "settle", "scratch")


def _run(arch: str, variant: str, seed: int, s: dict[str, Any], data,
         dims: list[int]) -> dict[str, Any]:
    from compressm_tune.models import SSMConfig
    from compressm_tune.reduction import ReduceConfig, Reducer, ReductionPolicy
    from compressm_tune.training import TrainConfig, Trainer

    mcfg = SSMConfig(arch=arch, d_input=data.d_input, d_output=data.d_output,
                     d_model=s["hidden"], state_dims=dims, pooling=data.pooling)
    tcfg = TrainConfig(steps=s["steps"], batch_size=s["batch"], lr=s["lr"],
                       eval_every=s["eval_every"], seed=seed, threads=1)
    reducer = None
    if variant == "compressed":
        reducer = Reducer(ReduceConfig(policy=ReductionPolicy("tau", s["tau"]),
                                       window=s["window"], every=s["reduce_every"]))
    elif variant == "settle":
        reducer = Reducer(ReduceConfig(policy=ReductionPolicy("tau", s["tau"], weighting="input"),
                                       window=s["window"], schedule="settle"))
    with tempfile.TemporaryDirectory(prefix="bench-lm-") as out:
        summary = Trainer(mcfg, tcfg, data, out, reducer=reducer, progress=False).fit()
    return {"arch": arch, "variant": variant, "seed": seed,
            "initial_dims": dims, "final_dims": summary["final_state_dims"],
            "test_bits_per_char": summary["test_best"]["bits_per_char"],
            "test_accuracy": summary["test_best"]["accuracy"],
            "train_time_s": summary["train_time_s"], "parameters": summary["parameters"]}


def _stats(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"median": float(np.median(arr)), "min": float(arr.min()), "max": float(arr.max())}


def _summary(results: list[dict[str, Any]], arch: str) -> dict[str, Any]:
    rows = {v: [r for r in results if r["arch"] == arch and r["variant"] == v]
            for v in VARIANTS}
    full = {r["seed"]: r for r in rows["full"]}
    out = {}
    for v, rs in rows.items():
        rel = [(r["test_bits_per_char"] - full[r["seed"]]["test_bits_per_char"])
               / full[r["seed"]]["test_bits_per_char"] for r in rs]
        speed = [full[r["seed"]]["train_time_s"] / r["train_time_s"] for r in rs]
        width = [sum(r["final_dims"]) / sum(full[r["seed"]]["initial_dims"]) for r in rs]
        out[v] = {"bits_per_char": _stats([r["test_bits_per_char"] for r in rs]),
                  "train_time_s": _stats([r["train_time_s"] for r in rs]),
                  "relative_bpc_vs_full": _stats(rel), "speedup_vs_full": _stats(speed),
                  "state_share": _stats(width), "final_dims": [r["final_dims"] for r in rs]}
    return out


def _markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    m = payload["machine"]
    lines = [f"# Character-level LM on the Python stdlib sources ({len(payload['seeds'])} seeds)",
             "", f"Machine: {m['cpu']}, {m['cores']} cores (shared), one torch thread per run, "
             f"runs interleaved per seed; wall time {payload['wall_s'] / 60:.1f} min; 1-min "
             f"load {m['load_avg_1m']:.2f} at the end; commit {m['git_commit']}.", "",
             f"Settings: dataset `pystdlib-chars` (sequences of {payload['seq_len']} "
             f"characters, vocabulary {payload['vocab']} ids, {payload['files']} files per "
             f"split), {s['blocks']} blocks, H={s['hidden']}, {s['steps']} steps of batch "
             f"{s['batch']}, lr {s['lr']}, evaluation every {s['eval_every']} steps; "
             f"compressed: tau={s['tau']} attempted every {s['reduce_every']} steps in the "
             f"first {s['window']:.0%} of the steps, safety net max_drop 0.02 (relative "
             "loss); settle: the same tau and window, schedule settle (12 checks; LRU "
             "input-weighted HSVs). Test bits/char at the best validation checkpoint of the "
             "final widths; train time excludes evaluation, includes reduction. Median "
             "[min, max] over seeds; ratios are per seed against that seed's full run.", ""]
    for arch, summ in payload["summary"].items():
        lines += [f"## --arch {arch} (start: {s['state'][arch]} states per layer)", "",
                  "| variant | final widths | state share | test bits/char | rel. vs full "
                  "| train time (s) | speed-up vs full |", "|---|---|---|---|---|---|---|"]
        for v in VARIANTS:
            r = summ[v]

            def fmt(st, spec="{:.3f}"):
                return (f"{spec.format(st['median'])} [{spec.format(st['min'])}, "
                        f"{spec.format(st['max'])}]")

            lines.append(f"| {v} | {'; '.join(map(str, r['final_dims']))} | "
                         f"{fmt(r['state_share'], '{:.2f}')} | {fmt(r['bits_per_char'])} | "
                         f"{fmt(r['relative_bpc_vs_full'], '{:+.1%}')} | "
                         f"{fmt(r['train_time_s'], '{:.1f}')} | "
                         f"{fmt(r['speedup_vs_full'], '{:.2f}x')} |")
        met = {v: (summ[v]["state_share"]["max"] <= 0.25
                   and summ[v]["relative_bpc_vs_full"]["max"] <= 0.02)
               for v in ("compressed", "settle")}
        lines += ["", f"Issue 15 target (state <= 1/4, <= 2% relative bits/char loss, every "
                  f"seed) for --arch {arch}: compressed "
                  f"{'met' if met['compressed'] else 'not met'}, settle "
                  f"{'met' if met['settle'] else 'not met'}.", ""]
    return "\n".join(lines)


def _plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(payload["summary"])
    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        for v, marker in zip(VARIANTS, "o^Ds", strict=True):
            rs = [r for r in payload["results"] if r["arch"] == arch and r["variant"] == v]
            ax.scatter([r["train_time_s"] for r in rs], [r["test_bits_per_char"] for r in rs],
                       marker=marker, label=v)
        ax.set_xlabel("training time (s, 1 thread)")
        ax.set_ylabel("test bits / character")
        ax.set_title(f"pystdlib-chars, --arch {arch}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="lru", help="comma-separated, e.g. lru,mamba")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="override the steps per run")
    ap.add_argument("--state", default="", help="starting widths, e.g. mamba=64 "
                    f"(default {STATE})")
    ap.add_argument("--tau", type=float, default=BASE["tau"], help="reduction tolerance")
    ap.add_argument("--name", default="mamba_lm", help="bench_results/NAME.{json,md,png}")
    ap.add_argument("--quick", action="store_true",
                    help="30 steps, 1 seed, nothing written: a smoke test")
    args = ap.parse_args()
    from compressm_tune.data import load_dataset
    from compressm_tune.models import ARCHS

    archs = args.arch.split(",")
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        print(f"bench_mamba_lm: error: --arch {','.join(unknown)} does not exist in this "
              f"build (choose from {', '.join(ARCHS)})", file=sys.stderr)
        sys.exit(2)
    if args.seeds < 1 or (args.steps is not None and args.steps < 1):
        print("bench_mamba_lm: error: --seeds and --steps must be >= 1", file=sys.stderr)
        sys.exit(2)
    settings = dict(BASE, tau=args.tau)
    try:
        settings["state"] = {**STATE, **{a: int(n) for a, n in (
            item.split("=") for item in args.state.split(",") if item)}}
    except ValueError:
        print(f"bench_mamba_lm: error: --state takes ARCH=N,..., got {args.state!r}",
              file=sys.stderr)
        sys.exit(2)
    if args.steps:
        settings["steps"] = args.steps
    if args.quick:
        settings.update(steps=30, eval_every=10, reduce_every=1, window=0.2)
    seeds = list(range(1 if args.quick else args.seeds))
    data = load_dataset("pystdlib-chars")
    t0 = time.time()
    results = []
    for arch in archs:
        for seed in seeds:
            compressed = _run(arch, "compressed", seed, settings, data,
                              [settings["state"][arch]] * settings["blocks"])
            full = _run(arch, "full", seed, settings, data,
                        [settings["state"][arch]] * settings["blocks"])
            settle = _run(arch, "settle", seed, settings, data,
                          [settings["state"][arch]] * settings["blocks"])
            scratch = _run(arch, "scratch", seed, settings, data, compressed["final_dims"])
            for r in (compressed, full, settle, scratch):
                print(f"{arch} seed={seed} {r['variant']}: bits/char "
                      f"{r['test_bits_per_char']:.3f} dims {r['final_dims']} "
                      f"{r['train_time_s']:.1f}s", flush=True)
            results += [full, compressed, settle, scratch]
    payload = {"machine": machine(), "settings": settings, "seeds": seeds,
               "seq_len": data.seq_len, "vocab": data.d_input, "files": data.info["files"],
               "wall_s": time.time() - t0, "results": results,
               "summary": {arch: _summary(results, arch) for arch in archs}}
    text = _markdown(payload)
    if not args.quick:  # a smoke test leaves bench_results alone
        write(args.name, payload, text)
        _plot(payload, RESULTS / f"{args.name}.png")
    print(text)


if __name__ == "__main__":
    main()
