"""Post-training state reduction of a pretrained Mamba(-2) LM: ours vs magnitude baselines.

Per seed: a token LM (``--arch``, 2 layers, d_state 128, small d_model) is pretrained here on
the stdlib character LM (``pystdlib-chars``, nothing downloaded). Then every layer is cut from
128 to each width in ``--widths`` by

* ``ours``: input-weighted state importance on 64 calibration sequences
  (:func:`compress_pretrained`, ``score="data"``);
* ``magnitude``: LAST-style data-free per-state H-infinity magnitude
  (:func:`magnitude_importance`: resting step size, ``|B_n| |C_n|`` weight norms, ``A``; on
  Mamba-2, where each head's decay is shared by its states, ``|W_B[n]| |W_C[n]|``);
* ``slowest-A``: the states with the smallest mean ``|A|`` (longest memory; Mamba-1 only:
  Mamba-2's states share each head's ``A``);
* ``random``: a seeded random subset;
* ``scratch``: no cut at all: a model of the width itself (every layer), pretrained here the
  same way (same steps, seed and data), the same widths from scratch;

and held-out bits/char is measured right after the cut and after the same short fine-tune
(``--finetune-frac`` of the pretraining steps, the same for every method; the full model gets
the same fine-tune as a reference). Bits/char on the test split's files, which no training or
calibration sequence comes from.

    python benchmarks/bench_mamba2.py [--arch mamba2] [--seeds 3] [--workers 2]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import int_list, machine, machine_line, parser, pool_map, write  # noqa: E402,I001

from compressm_tune.search import DISTILL  # noqa: E402

METHODS = {"ours": {"score": "data"}, "magnitude": {"score": "magnitude"},
           "slowest-A": {"score": "data", "select": "magnitude"},
           "random": {"score": "data", "select": "random"}}
STATE = 128
CALIBRATION = 64
TARGET_REL = 0.01  # the target: <= +1% bits/char after the fine-tune


def methods(arch: str) -> dict[str, dict[str, str]]:
    """The cuts compared; Mamba-2's states share each head's decay, so an ``|A|`` ranking
    cannot tell them apart (``select="magnitude"`` is then the weight magnitude again)."""
    return {k: v for k, v in METHODS.items() if not (arch == "mamba2" and k == "slowest-A")}


def model_config(arch: str, hidden: int, vocab: int, head_dim: int | None,
                 state: int = STATE) -> Any:
    """The benchmark's LM: 2 layers of ``state`` states."""
    from compressm_tune.models import SSMConfig

    extra = {"head_dim": head_dim} if arch == "mamba2" else {}
    return SSMConfig(arch=arch, d_output=vocab, d_model=hidden, state_dims=[state, state],
                     pooling="none", dropout=0.0, vocab_size=vocab, **extra)


def _pretrain(model, data, steps: int, lr: float, seed: int, batch: int) -> Any:
    """Train ``model`` from scratch for ``steps``; the best-validation model."""
    from compressm_tune.training import TrainConfig, Trainer, model_from_checkpoint

    out = Path(tempfile.mkdtemp(prefix="bench-mamba2-"))
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=lr, eval_every=max(1, steps // 5),
                      seed=seed, threads=1, eval_batch_size=250)
    Trainer(model.config, cfg, data, out, model=model, progress=False).fit()
    return model_from_checkpoint(out / "best.pt").eval()


def _run(job: dict[str, Any]) -> dict[str, Any]:
    """One seed: pretrain, then every method x width, cut and fine-tuned."""
    import copy

    import torch

    from compressm_tune.models import SSMModel
    from compressm_tune.reduction import compress_pretrained
    from compressm_tune.search import finetune_compressed, load_token_data
    from compressm_tune.training import evaluate

    torch.set_num_threads(1)
    torch.manual_seed(job["seed"])
    data = load_token_data("pystdlib-chars", 10**6, job["seed"])
    n_test = job["test_sequences"]

    def bits(model) -> float:
        return evaluate(model, data.x_test[:n_test], data.y_test[:n_test], "classification",
                        250, bits_name="bits")["bits"]

    model = SSMModel(model_config(job["arch"], job["hidden"], data.d_output, job["head_dim"]))
    t0 = time.perf_counter()
    full = _pretrain(model, data, job["steps"], job["lr"], job["seed"], job["batch"])
    pre_s = time.perf_counter() - t0
    ft_steps = max(1, round(job["finetune_frac"] * job["steps"]))
    rows = [{"method": "full", "width": STATE, "cut": bits(full)}]
    calib = data.x_train[:CALIBRATION]
    teacher = copy.deepcopy(full)  # the fine-tunes distill from the uncut pretrained model
    cuts = []
    for width in job["widths"]:
        for method, how in methods(job["arch"]).items():
            cut = copy.deepcopy(full)
            compress_pretrained(cut, calib, keep=width, seed=job["seed"], **how)
            rows.append({"method": method, "width": width, "cut": bits(cut)})
            cuts.append(cut)
    for width in job["widths"]:
        torch.manual_seed(job["seed"])
        small = SSMModel(model_config(job["arch"], job["hidden"], data.d_output,
                                      job["head_dim"], width))
        cuts.append(_pretrain(small, data, job["steps"], job["lr"], job["seed"], job["batch"]))
        rows.append({"method": "scratch", "width": width, "cut": bits(cuts[-1])})
    for row, model in zip(rows, [full, *cuts], strict=True):
        tuned = finetune_compressed(  # what compress --finetune-steps runs
            model, data, ft_steps, teacher=teacher if job["distill"] else None,
            distill=job["distill"], lr=job["finetune_lr"], batch_size=job["batch"],
            seed=job["seed"], threads=1, calibration=CALIBRATION)
        row["finetuned"] = bits(tuned)
        row["state_dims"] = tuned.state_dims
    return {"seed": job["seed"], "vocab": data.d_output, "rows": rows, "pretrain_s": pre_s,
            "finetune_steps": ft_steps, "wall_s": time.perf_counter() - t0}


def _median(values: list[float]) -> float:
    import numpy as np

    return float(np.median(values))


def _markdown(results: list[dict], args, m: dict[str, Any], wall: float) -> str:
    seeds = sorted(r["seed"] for r in results)
    by_seed = {r["seed"]: {(row["method"], row["width"]): row for row in r["rows"]}
               for r in results}
    ft = results[0]["finetune_steps"]
    lines = [
        f"# Post-training state reduction of a pretrained {args.arch} LM (d_state {STATE})",
        "",
        machine_line(m) + f" Wall time {wall / 60:.1f} min; {args.workers} runs in parallel, "
        "one torch thread each.",
        "",
        f"Settings: `--arch {args.arch}`, 2 layers, d_model {args.hidden}"
        + (f" (heads of {args.head_dim} channels, 1 group)" if args.arch == "mamba2" else "")
        + f", d_state {STATE}, "
        f"vocabulary {results[0].get('vocab', '')} character ids; pretrained {args.steps} "
        f"steps of batch {args.batch} (lr {args.lr:g}) on `pystdlib-chars`; every layer cut "
        f"{STATE} -> width, states scored on {CALIBRATION} training sequences; fine-tune "
        f"{ft} steps ({args.finetune_frac:.0%} of pretraining, lr {args.finetune_lr:g}, "
        + (f"loss {1 - args.distill:g} x next-token cross-entropy + {args.distill:g} x KL to "
           "the uncut pretrained model's next-token distribution" if args.distill
           else "next-token cross-entropy only")
        + "), the same for every method (the full model's included); bits/char on "
        f"{args.test_sequences} held-out test sequences (files no training sequence comes "
        f"from); seeds {seeds}. Median [min, max] over seeds; rel.: after the cut against "
        "the same seed's full pretrained model, after the fine-tune against the full model "
        "after the same fine-tune (the stricter reference: it keeps improving too). "
        "`scratch` is never cut: its first column is the model of that width after the same "
        "pretraining, its second after the same fine-tune (distilled from the same full "
        "model).",
        "",
        "| method | width | bits/char after cut | rel. | after fine-tune | rel. |",
        "|---|---|---|---|---|---|",
    ]
    keys = [("full", STATE)] + [(meth, w) for w in args.widths
                                for meth in [*methods(args.arch), "scratch"]]
    for key in keys:
        cut = [by_seed[s][key]["cut"] for s in seeds]
        tuned = [by_seed[s][key]["finetuned"] for s in seeds]
        base = [by_seed[s][("full", STATE)]["cut"] for s in seeds]
        base_ft = [by_seed[s][("full", STATE)]["finetuned"] for s in seeds]
        rel_cut = [c / b - 1 for c, b in zip(cut, base, strict=True)]
        rel_ft = [t / b - 1 for t, b in zip(tuned, base_ft, strict=True)]

        def cell(v: list[float], pct: bool = False) -> str:
            f = (lambda x: f"{x:+.1%}") if pct else (lambda x: f"{x:.3f}")
            return f"{f(_median(v))} [{f(min(v))}, {f(max(v))}]"

        lines.append(f"| {key[0]} | {key[1]} | {cell(cut)} | {cell(rel_cut, True)} | "
                     f"{cell(tuned)} | {cell(rel_ft, True)} |")
    lines += ["", "## Targets", ""]
    for w in args.widths:
        ours = [by_seed[s][("ours", w)]["finetuned"] / by_seed[s][("full", STATE)]["finetuned"]
                - 1 for s in seeds]
        vs_pre = [by_seed[s][("ours", w)]["finetuned"] / by_seed[s][("full", STATE)]["cut"] - 1
                  for s in seeds]
        met = all(v <= TARGET_REL for v in ours)
        lines.append(f"- width {w}: ours after the fine-tune {max(ours):+.2%} at worst over "
                     f"seeds against the full model after the same fine-tune "
                     f"({max(vs_pre):+.2%} against the full pretrained model; target <= "
                     f"+{TARGET_REL:.0%}): **{'met' if met else 'not met'}**.")
        for base in [*(k for k in methods(args.arch) if k != "ours"), "scratch"]:
            for stage in ("cut", "finetuned"):
                wins = sum(by_seed[s][("ours", w)][stage] < by_seed[s][(base, w)][stage]
                           for s in seeds)
                when = "after the cut" if stage == "cut" else "after the fine-tune"
                lines.append(f"  - vs {base} {when}: ours lower bits/char in {wins} of "
                             f"{len(seeds)} seeds")
    return "\n".join(lines)


def main() -> None:
    ap = parser(__doc__, "mamba2", seeds=3, workers=True)
    ap.add_argument("--arch", default="mamba2")
    ap.add_argument("--hidden", type=int, default=48)
    ap.add_argument("--head-dim", type=int, default=24, help="mamba2: channels per head")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--finetune-frac", type=float, default=0.1)
    ap.add_argument("--finetune-lr", type=float, default=3e-3,
                    help="fine-tune peak LR (default: the pretraining LR, compress --lr)")
    ap.add_argument("--distill", type=float, default=DISTILL,
                    help="fine-tune loss: share of KL to the uncut model (compress --distill)")
    ap.add_argument("--widths", type=int_list, default=[32, 16])
    ap.add_argument("--test-sequences", type=int, default=1000)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seeds, args.test_sequences, args.widths = 20, 1, 50, [32]
    import os

    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    jobs = [{"seed": s, "arch": args.arch, "hidden": args.hidden, "head_dim": args.head_dim,
             "steps": args.steps,
             "batch": args.batch, "lr": args.lr, "finetune_frac": args.finetune_frac,
             "finetune_lr": args.finetune_lr, "distill": args.distill, "widths": args.widths,
             "test_sequences": args.test_sequences} for s in range(args.seeds)]
    results = pool_map(_run, jobs, args.workers,
                       line=lambda r: f"seed {r['seed']} done in {r['wall_s']:.0f} s")
    results.sort(key=lambda r: r["seed"])
    wall = time.perf_counter() - t0
    m = machine(load)
    md = _markdown(results, args, m, wall)
    write(args.results_dir / args.name, {"machine": m, "settings": vars(args) | {
        "results_dir": str(args.results_dir)}, "results": results}, md)


if __name__ == "__main__":
    main()
