"""Character-level language modelling on the Python standard library's own sources.

Per architecture and seed, interleaved (so a change of machine load hits every variant alike):
``full`` (the starting width throughout), ``compressed`` (tau cuts attempted every few steps
in the first 10% of the steps, with the safety net), ``settle`` (the same window and tau with
the settle schedule; LRU: input-weighted HSVs) and ``scratch`` (the compressed run's final
widths from scratch). Dataset ``pystdlib-chars`` (next character, split by file; no download).
Metric: test bits per character at the best validation checkpoint of the final widths; train
time excludes evaluation. One torch thread. Median [min, max] over seeds; ratios per seed
against that seed's full run.

    python benchmarks/bench_mamba_lm.py [--arch lru,mamba] [--seeds 3] [--steps N]
        [--state mamba=64] [--tau 0.04] [--name mamba_lm] [--quick]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, machine_line, parser, write  # noqa: E402

from compressm_tune._table import markdown_table  # noqa: E402

# Small on purpose: 12 runs per architecture on a shared 2-core CPU in about 15 minutes.
BASE = {"blocks": 2, "hidden": 64, "steps": 1000, "batch": 32, "lr": 3e-3, "eval_every": 100,
        "reduce_every": 10, "tau": 0.04, "window": 0.1}
STATE = {"lru": 64, "selective": 16, "mamba": 16}  # starting width per layer (Mamba: d_state)
VARIANTS = ("full", "compressed", "settle", "scratch")


def _run(arch: str, variant: str, seed: int, s: dict[str, Any], data, dims: list[int]) -> dict:
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
    return {"median": float(np.median(values)), "min": float(min(values)),
            "max": float(max(values))}


def _summary(results: list[dict], arch: str) -> dict[str, Any]:
    full = {r["seed"]: r for r in results if r["arch"] == arch and r["variant"] == "full"}
    out = {}
    for v in VARIANTS:
        rs = [r for r in results if r["arch"] == arch and r["variant"] == v]
        f = [full[r["seed"]] for r in rs]
        out[v] = {"bits_per_char": _stats([r["test_bits_per_char"] for r in rs]),
                  "train_time_s": _stats([r["train_time_s"] for r in rs]),
                  "relative_bpc_vs_full": _stats([r["test_bits_per_char"] / b["test_bits_per_char"]
                                                  - 1 for r, b in zip(rs, f, strict=True)]),
                  "speedup_vs_full": _stats([b["train_time_s"] / r["train_time_s"]
                                             for r, b in zip(rs, f, strict=True)]),
                  "state_share": _stats([sum(r["final_dims"]) / sum(b["initial_dims"])
                                         for r, b in zip(rs, f, strict=True)]),
                  "final_dims": [r["final_dims"] for r in rs]}
    return out


def _markdown(p: dict[str, Any]) -> str:
    s = p["settings"]

    def fmt(st, spec="{:.3f}"):
        return f"{spec.format(st['median'])} [{spec.format(st['min'])}, {spec.format(st['max'])}]"

    lines = [f"# Character-level LM on the Python stdlib sources ({len(p['seeds'])} seeds)", "",
             machine_line(p["machine"]) + f" Wall time {p['wall_s'] / 60:.1f} min.", "",
             f"Settings: `pystdlib-chars` (sequences of {p['seq_len']} characters, vocabulary "
             f"{p['vocab']}, {p['files']} files per split), {s['blocks']} blocks, "
             f"H={s['hidden']}, {s['steps']} steps of batch {s['batch']}, lr {s['lr']}, eval "
             f"every {s['eval_every']}; compressed: tau={s['tau']} every {s['reduce_every']} "
             f"steps in the first {s['window']:.0%}, max_drop 0.02; settle: the same tau and "
             "window, schedule settle.", ""]
    for arch, summ in p["summary"].items():
        rows = [[v, "; ".join(map(str, summ[v]["final_dims"])),
                 fmt(summ[v]["state_share"], "{:.2f}"), fmt(summ[v]["bits_per_char"]),
                 fmt(summ[v]["relative_bpc_vs_full"], "{:+.1%}"),
                 fmt(summ[v]["train_time_s"], "{:.1f}"),
                 fmt(summ[v]["speedup_vs_full"], "{:.2f}x")] for v in VARIANTS]
        lines += [f"## --arch {arch} (start: {s['state'][arch]} states per layer)", "",
                  markdown_table(["variant", "final widths", "state share", "test bits/char",
                                  "rel. vs full", "train time (s)", "speed-up vs full"], rows),
                  ""]
    return "\n".join(lines)


def _plot(p: dict[str, Any]):
    def draw(path: Path) -> None:
        import matplotlib.pyplot as plt

        archs = list(p["summary"])
        fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4), squeeze=False)
        for ax, arch in zip(axes[0], archs, strict=True):
            for v, marker in zip(VARIANTS, "o^Ds", strict=True):
                rs = [r for r in p["results"] if r["arch"] == arch and r["variant"] == v]
                ax.scatter([r["train_time_s"] for r in rs],
                           [r["test_bits_per_char"] for r in rs], marker=marker, label=v)
            ax.set(xlabel="training time (s, 1 thread)", ylabel="test bits / character",
                   title=f"pystdlib-chars, --arch {arch}")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return draw


def main() -> None:
    ap = parser(__doc__, "mamba_lm", seeds=3, quick="30 steps, 1 seed: a smoke test")
    ap.add_argument("--arch", default="lru", help="comma-separated, e.g. lru,mamba")
    ap.add_argument("--steps", type=int, default=None, help="override the steps per run")
    ap.add_argument("--state", default="", help=f"starting widths, e.g. mamba=64 ({STATE})")
    ap.add_argument("--tau", type=float, default=BASE["tau"], help="reduction tolerance")
    args = ap.parse_args()
    from compressm_tune.data import load_dataset
    from compressm_tune.models import ARCHS

    archs = args.arch.split(",")
    if unknown := [a for a in archs if a not in ARCHS]:
        ap.error(f"--arch {','.join(unknown)} does not exist (choose from {', '.join(ARCHS)})")
    if args.seeds < 1 or (args.steps is not None and args.steps < 1):
        ap.error("--seeds and --steps must be >= 1")
    settings = dict(BASE, tau=args.tau)
    try:
        settings["state"] = {**STATE, **{a: int(n) for a, n in (
            item.split("=") for item in args.state.split(",") if item)}}
    except ValueError:
        ap.error(f"--state takes ARCH=N,..., got {args.state!r}")
    if args.steps:
        settings["steps"] = args.steps
    if args.quick:
        settings.update(steps=30, eval_every=10, reduce_every=1, window=0.2)
    seeds = list(range(1 if args.quick else args.seeds))
    data = load_dataset("pystdlib-chars")
    t0, results = time.time(), []
    for arch in archs:
        start = [settings["state"][arch]] * settings["blocks"]
        for seed in seeds:
            runs = {v: _run(arch, v, seed, settings, data, start)
                    for v in ("compressed", "full", "settle")}
            runs["scratch"] = _run(arch, "scratch", seed, settings, data,
                                   runs["compressed"]["final_dims"])
            for r in runs.values():
                print(f"{arch} seed={seed} {r['variant']}: bits/char "
                      f"{r['test_bits_per_char']:.3f} dims {r['final_dims']} "
                      f"{r['train_time_s']:.1f}s", flush=True)
            results += [runs[v] for v in VARIANTS]
    payload = {"machine": machine(), "settings": settings, "seeds": seeds,
               "seq_len": data.seq_len, "vocab": data.d_input, "files": data.info["files"],
               "wall_s": time.time() - t0, "results": results,
               "summary": {arch: _summary(results, arch) for arch in archs}}
    write(args.results_dir / args.name, payload, _markdown(payload), _plot(payload))


if __name__ == "__main__":
    main()
