"""Training-step time per implementation, interleaved round-robin in one process.

``--arch lru`` (-> train_throughput.*): forward + backward + AdamW on random data, dropout 0.1,
at ``4-block`` (4 blocks, H=64, L=1024, batch 16, N 16..256) and ``smnist`` (1 block, H=8,
L=784, batch 50, N=256): ``ours-c`` (the C scan kernel), ``ours-chunked`` (under
``models.torch_scans()``), ``naive-loop`` (the recurrence as a Python loop; largest N only) and
``jax`` (the paper's own LRU from ``--peer-root``, as ``bench_gpu_train.py`` runs it).
``--arch selective`` (-> selective_throughput.*): forward + backward of one selective layer or
a 2-block selective network, batch 64, L=40, H=64: ``kernel`` (fused C) against ``torch``, wall
and CPU time. Candidates are warmed up (JAX: compiled) first, then timed round-robin.

    python benchmarks/bench_train_throughput.py [--arch lru|selective] [--repeats 5] [--quick]
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import int_list, interleave, machine, machine_line, parser, spread, write  # noqa: E402
from bench_gpu_train import JaxStep, jax_status  # noqa: E402

from compressm_tune._table import markdown_table  # noqa: E402
from compressm_tune.models import (  # noqa: E402
    LRULayer,
    SelectiveLayer,
    SSMConfig,
    SSMModel,
    kernel_available,
    torch_scans,
)
from compressm_tune.training.optim import build_optimizer  # noqa: E402

D_INPUT, CLASSES, DROPOUT, LR, WD, SSM_LR_FACTOR = 1, 10, 0.1, 1e-3, 0.05, 0.5
PAPER_JAX_MS = {"smnist": 885.0, "4-block": 2285.0}  # the paper's JAX code, 2-core machine


def lru_shapes(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [dict(shape="4-block", blocks=2, H=16, L=128, batch=4, N=n) for n in (16, 64)] + \
            [dict(shape="smnist", blocks=1, H=8, L=96, batch=8, N=64)]
    return [dict(shape="4-block", blocks=4, H=64, L=1024, batch=16, N=n)
            for n in (16, 32, 64, 128, 256)] + \
        [dict(shape="smnist", blocks=1, H=8, L=784, batch=50, N=256)]


def torch_step(cfg: dict[str, Any], impl: str):
    """One training step of our network; ``ours-chunked`` under torch_scans(), ``naive-loop``
    with each LRU layer's forward replaced by the Python time loop."""
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(d_input=D_INPUT, d_output=CLASSES, d_model=cfg["H"],
                               state_dims=[cfg["N"]] * cfg["blocks"], dropout=DROPOUT)).train()
    if impl == "naive-loop":
        for layer in model.modules():
            if isinstance(layer, LRULayer):
                layer.forward = types.MethodType(_naive_lru_forward, layer)
    opt = build_optimizer(model, LR, WD, SSM_LR_FACTOR)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(cfg["batch"], cfg["L"], D_INPUT, generator=g)  # (B, L, 1)
    y = torch.randint(0, CLASSES, (cfg["batch"],), generator=g)

    def step() -> float:
        with torch_scans() if impl == "ours-chunked" else contextlib.nullcontext():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss.detach().item()
    return step


def _naive_lru_forward(self, u):
    """The LRU recurrence as a Python loop over t (DESIGN.md equations, real arithmetic)."""
    import torch

    batch = u.shape[0]
    lam_abs = torch.exp(-torch.exp(self.nu_log))  # (N,)
    phase = torch.exp(self.theta_log)  # (N,)
    lam_re, lam_im = lam_abs * torch.cos(phase), lam_abs * torch.sin(phase)  # (N,)
    gamma = torch.exp(self.gamma_log)[:, None]  # (N, 1)
    v_re = u @ (self.B_re * gamma).T  # (B, L, N)
    v_im = u @ (self.B_im * gamma).T  # (B, L, N)
    x_re = torch.zeros(batch, self.nu_log.shape[0], dtype=u.dtype)  # (B, N)
    x_im = torch.zeros_like(x_re)
    states_re, states_im = [], []
    # unbind, not v_re[:, t]: indexing would make autograd add a full (B, L, N) zero-padded
    # gradient per step (O(L^2) memory traffic), a pitfall rather than the cost of the loop
    for vr_t, vi_t in zip(v_re.unbind(1), v_im.unbind(1), strict=True):
        x_re, x_im = (lam_re * x_re - lam_im * x_im + vr_t,
                      lam_re * x_im + lam_im * x_re + vi_t)
        states_re.append(x_re)
        states_im.append(x_im)
    s_re, s_im = torch.stack(states_re, 1), torch.stack(states_im, 1)  # (B, L, N)
    return s_re @ self.C_re.T - s_im @ self.C_im.T + self.D * u  # Re(C x) + D u


def selective_work(kind: str, n: int, length: int):
    """Forward + backward of one selective layer or a 2-block selective network at width n;
    returns a callable giving the output."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "layer":
        layer = SelectiveLayer(d_model=64, state_dim=n)
        u = torch.randn(64, length, 64, generator=g).requires_grad_()  # (B, L, H)
        grad_y = torch.randn(64, length, 64, generator=g)  # (B, L, H)

        def run() -> torch.Tensor:
            layer.zero_grad(set_to_none=True)
            u.grad = None
            y = layer(u)  # (B, L, H)
            (y * grad_y).sum().backward()
            return y.detach()
        return run
    model = SSMModel(SSMConfig(arch="selective", d_input=1, d_output=CLASSES, d_model=64,
                               state_dims=[n] * 2)).train()
    x = torch.randn(64, length, 1, generator=g)  # (B, L, 1)
    labels = torch.randint(0, CLASSES, (64,), generator=g)

    def run() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)  # the same dropout masks for both implementations
        logits = model(x)  # (B, classes)
        F.cross_entropy(logits, labels).backward()
        return logits.detach()
    return run


def jax_step(cfg: dict[str, Any], peer_root: str):
    runner = JaxStep(("", "lru", cfg["blocks"], cfg["N"], cfg["H"], cfg["L"], cfg["batch"],
                      D_INPUT), peer_root)

    def step() -> float:
        runner.step()
        runner.sync()
        return float(runner.loss)
    return step


def measure_lru(args) -> list[dict]:
    impls = ["ours-c", "ours-chunked", "naive-loop", "jax"]
    if not kernel_available():
        impls.remove("ours-c")
    if skipped := jax_status(args.peer_root, "cpu"):
        impls.remove("jax")
        print(f"jax not run: {skipped}", flush=True)
    configs = lru_shapes(args.quick)
    naive_n, rows = max(c["N"] for c in configs), []
    for cfg in configs:
        active = [i for i in impls if i != "naive-loop" or cfg["N"] == naive_n]
        t0, steps = time.perf_counter(), {}
        for impl in active:
            steps[impl] = jax_step(cfg, args.peer_root) if impl == "jax" \
                else torch_step(cfg, impl)
        losses = {impl: fn() for impl, fn in steps.items()}  # first step: equal for torch ones
        times = interleave(steps, args.repeats, warmup=args.warmup)
        row = {**cfg, "threads": args.threads, "setup_and_warmup_s": time.perf_counter() - t0}
        for impl in active:
            row[impl] = spread(times[impl][0], "times_ms") | {"first_loss": losses[impl]}
        rows.append(row)
        print(f"{cfg['shape']} N={cfg['N']}: " + ", ".join(
            f"{i} {row[i]['median_ms']:.0f} ms" for i in active), flush=True)
    return rows


def measure_selective(args) -> list[dict]:
    rows = []
    for threads in args.thread_list:
        torch.set_num_threads(threads)
        for kind in ("layer", "model"):
            for n in args.widths:
                run = selective_work(kind, n, args.length)
                cands = {"kernel": run} if kernel_available() else {}
                cands["torch"] = lambda run=run: _under_torch_scans(run)
                outs = {k: fn() for k, fn in cands.items()}
                times = interleave(cands, args.repeats, args.warmup,
                                   clocks=(time.perf_counter, time.process_time))
                row = {"kind": kind, "N": n, "threads": threads}
                for k in cands:
                    row[k] = spread(times[k][0], "all_ms") | {
                        "cpu_median_ms": float(np.median(times[k][1]))}
                if "kernel" in row:
                    row["torch_over_kernel"] = (row["torch"]["median_ms"]
                                                / row["kernel"]["median_ms"])
                    row["torch_over_kernel_cpu"] = (row["torch"]["cpu_median_ms"]
                                                    / row["kernel"]["cpu_median_ms"])
                    ref = outs["torch"]
                    row["max_rel_diff"] = float((outs["kernel"] - ref).abs().max()
                                                / ref.abs().max())
                rows.append(row)
                print(f"{kind} N={n} threads={threads}: " + ", ".join(
                    f"{k} {row[k]['median_ms']:.1f} ms" for k in cands), flush=True)
    return rows


def _under_torch_scans(run):
    with torch_scans():
        return run()


def cell(d: dict) -> str:
    return f"{d['median_ms']:.1f} ± {d['iqr_ms'] / 2:.1f} ({d['min_ms']:.1f})"


def markdown(p: dict) -> str:
    head = machine_line(p["machine"]) + f" Threads: {p['threads']}; {p['repeats']} interleaved " \
        f"repeats after {p['warmup']} warm-up(s). Cells: median ± half-IQR (fastest), ms."
    if p["benchmark"] == "selective_throughput":
        rows = [[r["kind"], r["N"], r["threads"], *(cell(r[k]) if k in r else "-"
                                                    for k in ("kernel", "torch")),
                 f"{r.get('torch_over_kernel', 0):.1f}x",
                 f"{r.get('torch_over_kernel_cpu', 0):.1f}x", f"{r.get('max_rel_diff', 0):.1e}"]
                for r in p["results"]]
        return "\n".join(["# Selective (S6) layer: fused C kernel vs torch path", "",
                          f"Batch 64, L={p['length']}, H=64. " + head, "", markdown_table(
                              ["kind", "N", "threads", "kernel", "torch", "torch / kernel",
                               "torch / kernel (CPU)", "max rel diff"], rows)])
    impls = ("ours-c", "ours-chunked", "naive-loop", "jax")

    def rel(r, a, b):
        return f"{r[a]['median_ms'] / r[b]['median_ms']:.2f}x" if a in r and b in r else "-"

    rows = [[r["shape"], r["N"], *(cell(r[i]) if i in r else "-" for i in impls),
             rel(r, "jax", "ours-c"), rel(r, "ours-chunked", "ours-c"),
             rel(r, "naive-loop", "ours-c")] for r in p["results"]]
    return "\n".join([
        "# Training-step throughput of the LRU stack", "",
        "One step = forward + backward + AdamW (float32, random data, cross-entropy, dropout "
        f"0.1). The paper's JAX code on a 2-core machine: {PAPER_JAX_MS} ms. " + head, "",
        markdown_table(["shape", "N", "ours (C kernel)", "ours (torch chunked)",
                        "naive time loop", "JAX (associative_scan)", "JAX / ours",
                        "chunked / C", "naive / C"], rows)])


def plot(p: dict):
    def draw(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        if p["benchmark"] == "selective_throughput":
            series = [(f"{kind} {k}", [r for r in p["results"] if r["kind"] == kind and k in r], k)
                      for kind in ("layer", "model") for k in ("kernel", "torch")]
        else:
            series = [(i, [r for r in p["results"] if r["shape"] == "4-block" and i in r], i)
                      for i in ("ours-c", "ours-chunked", "naive-loop", "jax")]
        for label, rows, k in series:
            if rows:
                ax.plot([r["N"] for r in rows], [r[k]["median_ms"] for r in rows], "o-",
                        label=label)
        ax.set(xscale="log", yscale="log", xlabel="state width N", ylabel="ms per step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return draw


def main() -> None:
    ap = parser(__doc__, "", quick="small shapes, 2 repeats: a smoke test")
    ap.add_argument("--arch", choices=("lru", "selective"), default="lru")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int_list, default=None,
                    help="lru: one count (default 2); selective: a list (default 1,2)")
    ap.add_argument("--widths", type=int_list, default=[128, 64, 32, 16, 8], help="selective")
    ap.add_argument("--length", type=int, default=40, help="selective: sequence length")
    ap.add_argument("--peer-root", default=None,
                    help="lru: a checkout of camail-official/compressm, for the jax candidate")
    args = ap.parse_args()
    lru = args.arch == "lru"
    args.name = args.name or ("train_throughput" if lru else "selective_throughput")
    args.thread_list = args.threads or ([2] if lru else [1, 2])
    args.threads = args.thread_list[0]
    if args.quick:
        args.repeats, args.warmup, args.widths, args.length = 2, 1, [16, 8], 16
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true "
                          f"intra_op_parallelism_threads={args.threads}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    torch.set_num_threads(args.threads)
    t0, load = time.time(), os.getloadavg()[0]
    results = measure_lru(args) if lru else measure_selective(args)
    payload = {"benchmark": args.name, "quick": args.quick, "repeats": args.repeats,
               "warmup": args.warmup, "threads": args.thread_list, "length": args.length,
               "machine": machine(load) | {"c_kernel_built": kernel_available()},
               "wall_s": round(time.time() - t0, 1), "paper_jax_ms_reference": PAPER_JAX_MS,
               "results": results}
    payload["benchmark"] = "train_throughput" if lru else "selective_throughput"
    write(args.results_dir / args.name, payload, markdown(payload), plot(payload))


if __name__ == "__main__":
    main()
