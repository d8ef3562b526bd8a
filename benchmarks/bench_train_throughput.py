"""Training-step time per implementation, interleaved round-robin in one process.

``--arch lru`` (-> train_throughput.*): one step = forward + backward + AdamW on random data
with cross-entropy, dropout 0.1, for ``4-block`` (4 blocks, H=64, L=1024, batch 16, N in 16..256)
and ``smnist`` (1 block, H=8, L=784, batch 50, N=256). Implementations: ``ours-c`` (``SSMModel``
on the C scan kernel), ``ours-chunked`` (the same under ``models.torch_scans()``: the pure-PyTorch
chunked scan, the fallback without a compiler), ``naive-loop`` (the LRU recurrence as a Python
loop over time; largest N only) and ``jax`` (an LRU network written from DESIGN.md the way the
paper's code computes it, ``jax.lax.associative_scan`` under ``jit``; when jax imports).

``--arch selective`` (-> selective_throughput.*): forward + backward of one selective (S6)
layer (``layer``) or a 2-block selective network with cross-entropy (``model``), batch 64,
L=40, H=64, N in 128..8: ``kernel`` (the fused C kernel) against ``torch``
(``models.torch_scans()``), wall and CPU time, and the outputs' agreement.

Every candidate is built and warmed up first (JAX: compiled); the repeats then go round-robin,
so a change of machine load hits all alike. Cells: median ± half-IQR and the fastest repeat.

    python benchmarks/bench_train_throughput.py [--arch lru|selective] [--repeats 5]
        [--threads 2] [--quick] [--results-dir /tmp]
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


def _jax_step_fn(cfg: dict[str, Any], threads: int):
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_platforms", "cpu")
    h, n, blocks = cfg["H"], cfg["N"], cfg["blocks"]
    key = jax.random.PRNGKey(0)

    def dense(k, d_in, d_out):
        bound = 1 / np.sqrt(d_in)
        kw, kb = jax.random.split(k)
        return {"w": jax.random.uniform(kw, (d_in, d_out), minval=-bound, maxval=bound),
                "b": jax.random.uniform(kb, (d_out,), minval=-bound, maxval=bound)}

    def lru_init(k):
        ks = jax.random.split(k, 7)
        u1, u2 = jax.random.uniform(ks[0], (n,)), jax.random.uniform(ks[1], (n,))
        r_min, r_max = 0.9, 0.999
        nu_log = jnp.log(-0.5 * jnp.log(u1 * (r_max**2 - r_min**2) + r_min**2))
        theta_log = jnp.log(2 * np.pi * u2)
        ssm = {"nu_log": nu_log, "theta_log": theta_log,
               "gamma_log": 0.5 * jnp.log1p(-jnp.exp(-2 * jnp.exp(nu_log))),
               "B_re": jax.random.normal(ks[2], (n, h)) / np.sqrt(2 * h),
               "B_im": jax.random.normal(ks[3], (n, h)) / np.sqrt(2 * h)}
        rest = {"C_re": jax.random.normal(ks[4], (h, n)) / np.sqrt(n),
                "C_im": jax.random.normal(ks[5], (h, n)) / np.sqrt(n),
                "D": jax.random.normal(ks[6], (h,))}
        return ssm, rest

    keys = jax.random.split(key, 2 * blocks + 2)
    ssm_params, rest_params = [], {"encoder": dense(keys[0], D_INPUT, h),
                                   "head": dense(keys[1], h, CLASSES), "blocks": []}
    for i in range(blocks):
        ssm, rest = lru_init(keys[2 + 2 * i])
        ssm_params.append(ssm)
        rest_params["blocks"].append({**rest, "glu": dense(keys[3 + 2 * i], h, 2 * h)})
    params = {"ssm": ssm_params, "rest": rest_params}
    bn_state = [{"mean": jnp.zeros(h), "var": jnp.ones(h)} for _ in range(blocks)]

    def binary_operator(e_i, e_j):
        a_i, b_i = e_i
        a_j, b_j = e_j
        return a_j * a_i, a_j * b_i + b_j

    def lru(ssm, rest, u):  # u (B, L, H) -> (B, L, H), as the paper's code computes it
        lam = jnp.exp(-jnp.exp(ssm["nu_log"]) + 1j * jnp.exp(ssm["theta_log"]))  # (N,)
        b_norm = (ssm["B_re"] + 1j * ssm["B_im"]) * jnp.exp(ssm["gamma_log"])[:, None]  # (N, H)
        c = rest["C_re"] + 1j * rest["C_im"]  # (H, N)
        bu = u @ b_norm.T  # (B, L, N) complex
        lam_el = jnp.broadcast_to(lam, bu.shape)  # (B, L, N)
        _, x = jax.lax.associative_scan(binary_operator, (lam_el, bu), axis=1)
        return (x @ c.T).real + rest["D"] * u

    def dropout(k, z):
        keep = jax.random.bernoulli(k, 1 - DROPOUT, z.shape)
        return jnp.where(keep, z / (1 - DROPOUT), 0.0)

    def forward(params, bn_state, x, k):
        hdn = x @ params["rest"]["encoder"]["w"] + params["rest"]["encoder"]["b"]  # (B, L, H)
        new_bn = []
        for i in range(blocks):
            ssm, rest = params["ssm"][i], params["rest"]["blocks"][i]
            mean = hdn.mean((0, 1))
            var = hdn.var((0, 1))
            cnt = hdn.shape[0] * hdn.shape[1]
            new_bn.append({"mean": 0.9 * bn_state[i]["mean"] + 0.1 * mean,
                           "var": 0.9 * bn_state[i]["var"] + 0.1 * var * cnt / (cnt - 1)})
            z = (hdn - mean) / jnp.sqrt(var + 1e-5)  # BatchNorm, no affine
            k, k1, k2 = jax.random.split(k, 3)
            z = dropout(k1, jax.nn.gelu(lru(ssm, rest, z), approximate=False))
            ab = z @ rest["glu"]["w"] + rest["glu"]["b"]
            z = ab[..., :h] * jax.nn.sigmoid(ab[..., h:])  # GLU
            hdn = hdn + dropout(k2, z)
        logits = hdn.mean(1) @ params["rest"]["head"]["w"] + params["rest"]["head"]["b"]
        return logits, new_bn

    def loss_fn(params, bn_state, x, y, k):
        logits, new_bn = forward(params, bn_state, x, k)
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, y[:, None], axis=1).mean(), new_bn

    def adamw(p, g, m, v, t, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        return p - lr * m_hat / (jnp.sqrt(v_hat) + eps), m, v

    tree_map = jax.tree_util.tree_map

    @jax.jit
    def train_step(params, opt_state, bn_state, x, y, k):
        (loss, new_bn), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, bn_state, x, y, k)
        t = opt_state["t"] + 1
        new_params, new_m, new_v = {}, {}, {}
        for group, lr, wd in (("ssm", LR * SSM_LR_FACTOR, 0.0), ("rest", LR, WD)):
            out = tree_map(lambda p, g, m, v, lr=lr, wd=wd: adamw(p, g, m, v, t, lr, wd),
                           params[group], grads[group], opt_state["m"][group],
                           opt_state["v"][group])
            is_leaf = lambda z: isinstance(z, tuple)  # noqa: E731
            new_params[group] = tree_map(lambda z: z[0], out, is_leaf=is_leaf)
            new_m[group] = tree_map(lambda z: z[1], out, is_leaf=is_leaf)
            new_v[group] = tree_map(lambda z: z[2], out, is_leaf=is_leaf)
        return new_params, {"m": new_m, "v": new_v, "t": t}, new_bn, loss

    zeros = tree_map(jnp.zeros_like, params)
    opt_state = {"m": zeros, "v": tree_map(jnp.zeros_like, params), "t": jnp.zeros((), jnp.int32)}
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(cfg["batch"], cfg["L"], D_INPUT)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, CLASSES, cfg["batch"]))
    state = {"params": params, "opt": opt_state, "bn": bn_state, "key": jax.random.PRNGKey(2)}

    def step() -> float:
        k, sub = jax.random.split(state["key"])
        state["params"], state["opt"], state["bn"], loss = train_step(
            state["params"], state["opt"], state["bn"], x, y, sub)
        state["key"] = k
        return float(loss.block_until_ready())

    return step


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


def measure_lru(args) -> list[dict]:
    impls = ["ours-c", "ours-chunked", "naive-loop", "jax"]
    if not kernel_available():
        impls.remove("ours-c")
    try:
        import jax  # noqa: F401
    except ImportError:
        impls.remove("jax")
    configs = lru_shapes(args.quick)
    naive_n, rows = max(c["N"] for c in configs), []
    for cfg in configs:
        active = [i for i in impls if i != "naive-loop" or cfg["N"] == naive_n]
        t0, steps = time.perf_counter(), {}
        for impl in active:
            steps[impl] = _jax_step_fn(cfg, args.threads) if impl == "jax" \
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
    args = ap.parse_args()
    lru = args.arch == "lru"
    args.name = args.name or ("train_throughput" if lru else "selective_throughput")
    args.thread_list = args.threads or ([2] if lru else [1, 2])
    args.threads = args.thread_list[0]
    if args.quick:
        args.repeats, args.warmup, args.widths, args.length = 2, 1, [16, 8], 16
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true "
                          f"intra_op_parallelism_threads={args.threads}")
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
