"""Training-step time of the LRU stack: ours (C scan / torch chunked scan), a naive time loop,
and a JAX reference written from DESIGN.md the way the paper's code computes it.

One step = forward + backward + AdamW update on random data with cross-entropy, for

* ``4-block``: blocks=4, H=64, L=1024, batch=16, N in {16, 32, 64, 128, 256};
* ``smnist``:  the paper's sMNIST shape, blocks=1, H=8, L=784, batch=50, N=256.

Implementations (each lives in its own worker process, all with the same thread count):

``ours-c``        ``SSMModel`` + the package's AdamW groups, the C scan kernel (float32 CPU);
``ours-chunked``  the same with ``compressm_tune.models._scan._scan_kernel = None``, i.e. the
                  pure-PyTorch chunked scan (the fallback without a compiler, and the GPU path);
``naive-loop``    the same network whose LRU recurrence is a Python loop over time steps
                  (projections batched over time, recurrence in real arithmetic); N=256 only;
``jax``           an LRU network in JAX per DESIGN.md, computed as the paper's code does:
                  ``B_norm @ u`` in complex, ``jax.lax.associative_scan`` with
                  (a_i, b_i), (a_j, b_j) -> (a_j a_i, a_j b_i + b_j), ``Re(C x) + D u``;
                  BatchNorm (batch statistics, no affine, running averages updated), exact GELU,
                  dropout 0.1, GLU, residual, mean pool, linear head; ``jit`` of
                  ``value_and_grad`` + a hand-written AdamW with the same two groups.

Timing: per shape, every implementation is built and warmed up (JAX: compiled) first, then the
repeats are interleaved round-robin across implementations so slow drifts in machine load hit
all of them alike. Reported: median and interquartile range per configuration. The machine's
load (other processes' CPU use) is measured over the whole run and written to the report.

    python benchmarks/bench_train_throughput.py [--repeats 5] [--warmup 2] [--threads 2]
    python benchmarks/bench_train_throughput.py --quick --out /tmp/tp   # smoke test, seconds

Writes ``bench_results/train_throughput.{json,md,png}`` (or ``--out`` prefix).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent.parent / "bench_results"
IMPLS = ("ours-c", "ours-chunked", "naive-loop", "jax")
GRID_N = (16, 32, 64, 128, 256)
# The paper's JAX code on one 2-core machine (issue 2): ms per training step.
PAPER_JAX_MS = {"smnist": 885.0, "4-block": 2285.0}
D_INPUT, CLASSES, DROPOUT, LR, WD, SSM_LR_FACTOR = 1, 10, 0.1, 1e-3, 0.05, 0.5


def shapes(quick: bool) -> list[dict[str, Any]]:
    """The configurations: one dict per (shape, N)."""
    if quick:
        grid = [dict(shape="4-block", blocks=2, H=16, L=128, batch=4, N=n) for n in (16, 64)]
        return grid + [dict(shape="smnist", blocks=1, H=8, L=96, batch=8, N=64)]
    grid = [dict(shape="4-block", blocks=4, H=64, L=1024, batch=16, N=n) for n in GRID_N]
    return grid + [dict(shape="smnist", blocks=1, H=8, L=784, batch=50, N=256)]


def _naive_n(configs: list[dict[str, Any]]) -> int:
    return max(c["N"] for c in configs)


# ----------------------------------------------------------------------------- torch workers


def _torch_step_fn(impl: str, cfg: dict[str, Any], threads: int):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    import compressm_tune.models._scan as scan_module
    from compressm_tune.models import LRULayer, SSMConfig, SSMModel
    from compressm_tune.training.optim import build_optimizer

    if impl == "ours-chunked":
        scan_module._scan_kernel = None  # force the pure-PyTorch chunked scan
    elif impl == "ours-c":
        assert scan_module.kernel_available(), "the C scan kernel is not built"
    elif impl == "naive-loop":
        LRULayer.forward = _naive_lru_forward
    torch.manual_seed(0)
    model = SSMModel(SSMConfig(d_input=D_INPUT, d_output=CLASSES, d_model=cfg["H"],
                               state_dims=[cfg["N"]] * cfg["blocks"], dropout=DROPOUT))
    model.train()
    opt = build_optimizer(model, LR, WD, SSM_LR_FACTOR)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(cfg["batch"], cfg["L"], D_INPUT, generator=g)  # (B, L, 1)
    y = torch.randint(0, CLASSES, (cfg["batch"],), generator=g)

    def step() -> float:
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


# ----------------------------------------------------------------------------- JAX worker


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


# ----------------------------------------------------------------------------- workers


def _worker(impl: str, threads: int, conn) -> None:
    """Serve ("setup", cfg) / ("step",) / ("close",) requests; report step times in seconds."""
    step = None
    while True:
        msg = conn.recv()
        if msg[0] == "close":
            conn.send(("ok", None))
            return
        try:
            if msg[0] == "setup":
                t0 = time.perf_counter()
                step = None
                step = _jax_step_fn(msg[1], threads) if impl == "jax" else _torch_step_fn(
                    impl, msg[1], threads)
                conn.send(("ok", time.perf_counter() - t0))
            elif msg[0] == "step":
                t0 = time.perf_counter()
                loss = step()
                conn.send(("ok", (time.perf_counter() - t0, loss)))
        except Exception as exc:  # report, keep serving
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _thread_env(threads: int) -> dict[str, str]:
    return {
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
        "XLA_FLAGS": f"--xla_cpu_multi_thread_eigen={str(threads > 1).lower()} "
                     f"intra_op_parallelism_threads={threads}",
        "JAX_PLATFORMS": "cpu",
    }


class Worker:
    def __init__(self, impl: str, threads: int) -> None:
        self.impl = impl
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(impl, threads, child), daemon=True)
        self.proc.start()

    def call(self, *msg):
        self.conn.send(msg)
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{self.impl}: {value}")
        return value

    def close(self) -> None:
        try:
            self.call("close")
        finally:
            self.proc.join(timeout=30)


# ----------------------------------------------------------------------------- machine and load


def _cpu_busy_s() -> float:
    """CPU-seconds spent by all processes since boot (user + nice + system + irq + softirq)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = sum(int(fields[i]) for i in (0, 1, 2, 5, 6))
    return ticks / os.sysconf("SC_CLK_TCK")


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def machine(threads: int) -> dict[str, Any]:
    cpu = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    versions = {}
    for mod in ("torch", "jax", "jaxlib", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    import compressm_tune.models as models

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=RESULTS.parent).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), **versions, "threads": threads,
            "thread_env": _thread_env(threads), "c_kernel_built": models.kernel_available(),
            "git_commit": commit}


# ----------------------------------------------------------------------------- the run


def _summary(times_s: list[float]) -> dict[str, Any]:
    ms = [t * 1e3 for t in times_s]
    q25, q50, q75 = np.percentile(ms, [25, 50, 75])
    return {"median_ms": float(q50), "iqr_ms": float(q75 - q25), "min_ms": float(min(ms)),
            "repeats": len(ms),
            "times_ms": [round(t, 2) for t in ms]}


def _measure(cfg: dict[str, Any], workers: dict[str, Worker], active: list[str],
             args: argparse.Namespace) -> dict[str, Any]:
    """Set up and warm up every implementation, then interleave the timed repeats."""
    row: dict[str, Any] = {**cfg}
    setup_s, losses = {}, {}
    for impl in active:
        setup_s[impl] = workers[impl].call("setup", cfg)
        t0 = time.perf_counter()
        warm = 1 if impl == "naive-loop" else args.warmup  # JAX: includes compilation
        for w in range(warm):
            loss = workers[impl].call("step")[1]
            if w == 0:  # the first step's loss: equal for the torch variants (same init, data)
                losses[impl] = loss
        setup_s[impl] += time.perf_counter() - t0
    times: dict[str, list[float]] = {impl: [] for impl in active}
    for r in range(args.repeats):
        for impl in active:
            if impl == "naive-loop" and r >= args.naive_repeats:
                continue
            times[impl].append(workers[impl].call("step")[0])
    for impl in active:
        row[impl] = _summary(times[impl])
        row[impl]["setup_and_warmup_s"] = round(setup_s[impl], 2)
        row[impl]["first_loss"] = losses[impl]
    line = ", ".join(f"{i} {row[i]['median_ms']:.0f} ms" for i in active)
    print(f"{cfg['shape']} N={cfg['N']} threads={cfg['threads']}: {line}", flush=True)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    configs = [c for c in shapes(args.quick)
               if (not args.n or c["N"] in args.n) and (not args.shape or c["shape"] in args.shape)]
    impls = [i for i in IMPLS if i in args.impls]
    naive_n = _naive_n(configs)
    # the main pass at --threads over every config; extra passes (other thread counts) at the
    # largest N only and without the naive loop
    passes = [(args.threads, configs, impls)] + [
        (t, [c for c in configs if c["N"] == naive_n], [i for i in impls if i != "naive-loop"])
        for t in args.extra_threads if t != args.threads]
    load_before, uptime_before = list(os.getloadavg()), _uptime()
    busy0, own0, wall0 = _cpu_busy_s(), sum(os.times()[:4]), time.perf_counter()
    results = []
    for threads, pass_configs, pass_impls in passes:
        os.environ.update(_thread_env(threads))  # inherited by the spawned workers
        workers = {impl: Worker(impl, threads) for impl in pass_impls}
        try:
            for cfg in pass_configs:
                active = [i for i in pass_impls if i != "naive-loop" or cfg["N"] == naive_n]
                results.append(_measure({**cfg, "threads": threads}, workers, active, args))
        finally:
            for w in workers.values():
                w.close()  # joined, so its CPU time shows in os.times()' children fields
    wall = time.perf_counter() - wall0
    own = sum(os.times()[:4]) - own0
    busy = _cpu_busy_s() - busy0
    load_after, uptime_after = list(os.getloadavg()), _uptime()
    return {
        "benchmark": "train_throughput", "quick": args.quick, "repeats": args.repeats,
        "warmup": args.warmup, "naive_repeats": args.naive_repeats,
        "machine": machine(args.threads),
        "load": {"before": uptime_before, "after": uptime_after,
                 "load_avg_before_1_5_15": load_before, "load_avg_after_1_5_15": load_after,
                 "wall_s": round(wall, 1), "this_benchmark_cpu_s": round(own, 1),
                 "other_processes_cpu_s": round(max(0.0, busy - own), 1),
                 "other_processes_mean_cores_busy": round(max(0.0, busy - own) / wall, 2)},
        "paper_jax_ms_reference": PAPER_JAX_MS,
        "settings": {"d_input": D_INPUT, "classes": CLASSES, "dropout": DROPOUT, "lr": LR,
                     "weight_decay": WD, "ssm_lr_factor": SSM_LR_FACTOR, "dtype": "float32"},
        "results": results,
    }


# ----------------------------------------------------------------------------- reporting


def _min(row: dict[str, Any], impl: str) -> float:
    return min(row[impl]["times_ms"])


def _cell(row: dict[str, Any], impl: str) -> str:
    if impl not in row:
        return "-"
    r = row[impl]
    return f"{r['median_ms']:.0f} ± {r['iqr_ms'] / 2:.0f} ({_min(row, impl):.0f})"


def _ratio(row: dict[str, Any], num: str, den: str, stat: str = "median") -> str:
    if num not in row or den not in row:
        return "-"
    if stat == "min":
        return f"{_min(row, num) / _min(row, den):.2f}x"
    return f"{row[num]['median_ms'] / row[den]['median_ms']:.2f}x"


def _main_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in report["results"] if r["threads"] == report["machine"]["threads"]]


def _table_row(row: dict[str, Any], with_threads: bool = False) -> str:
    threads = f" {row['threads']} |" if with_threads else ""
    return (f"| {row['shape']} (blocks={row['blocks']}, H={row['H']}, L={row['L']}, "
            f"batch={row['batch']}) | {row['N']} |{threads} {_cell(row, 'ours-c')} | "
            f"{_cell(row, 'ours-chunked')} | {_cell(row, 'naive-loop')} | {_cell(row, 'jax')} | "
            f"{_ratio(row, 'jax', 'ours-c')} ({_ratio(row, 'jax', 'ours-c', 'min')}) | "
            f"{_ratio(row, 'ours-chunked', 'ours-c')} | {_ratio(row, 'naive-loop', 'ours-c')} |")


def markdown(report: dict[str, Any]) -> str:
    m, load = report["machine"], report["load"]
    shared = load["other_processes_mean_cores_busy"]
    verdict = ("**shared**: other processes kept on average "
               f"{shared:.2f} of the {m['cores']} cores busy during the run, so absolute times are "
               "inflated and noisier than on an idle machine; the implementations were "
               "interleaved round-robin, so ratios are fairer than absolute numbers"
               if shared > 0.1 else f"effectively idle (other processes: {shared:.2f} cores)")
    lines = [
        "# Training-step throughput of the LRU stack",
        "",
        "One step = forward + backward + AdamW update (float32, random data, cross-entropy, "
        "dropout 0.1). Cells: median over repeats ± half the interquartile range (fastest "
        "repeat), in ms per step; ratios of medians (of fastest repeats in parentheses). "
        "Reproduce: `python benchmarks/bench_train_throughput.py`.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; {m['threads']} threads for every "
        f"implementation (torch.set_num_threads, OMP/MKL_NUM_THREADS, XLA "
        f"intra_op_parallelism_threads). torch {m['torch']}, jax {m['jax']}, "
        f"jaxlib {m['jaxlib']}, numpy {m['numpy']}; commit {m['git_commit']}.",
        "",
        f"Load: {verdict}. `uptime` before: `{load['before']}`; after: `{load['after']}`.",
        "",
        "| shape | N | ours (C kernel) | ours (torch chunked) | naive time loop | JAX "
        "(associative_scan) | JAX / ours (fastest) | chunked / C | naive / C |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    main_rows = _main_rows(report)
    extra_rows = [r for r in report["results"] if r not in main_rows]
    lines += [_table_row(row) for row in main_rows]
    if extra_rows:
        lines += [
            "",
            "The same at other thread counts (largest N only). On a machine shared with other "
            "jobs, a parallel region must wait for every one of its threads to be scheduled, so "
            "fewer threads can be faster; this shows how much of the main table is contention:",
            "",
            "| shape | N | threads | ours (C kernel) | ours (torch chunked) | naive time loop | "
            "JAX (associative_scan) | JAX / ours (fastest) | chunked / C | naive / C |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [_table_row(row, with_threads=True) for row in extra_rows]
    grid = [r for r in main_rows if r["shape"] == "4-block" and "ours-c" in r]
    lines += ["", "## Reading it", ""]
    if len(grid) > 1:
        lo, hi = grid[0], grid[-1]
        lines.append(
            f"- Step time falls with N: ours (C) {hi['ours-c']['median_ms']:.0f} ms at "
            f"N={hi['N']} -> {lo['ours-c']['median_ms']:.0f} ms at N={lo['N']} "
            f"({hi['ours-c']['median_ms'] / lo['ours-c']['median_ms']:.1f}x): what in-training "
            "compression cashes in.")
    for row in main_rows:
        if row["N"] != _naive_n(report["results"]) or "jax" not in row or "ours-c" not in row:
            continue
        ref = PAPER_JAX_MS.get(row["shape"])
        speedup = row["jax"]["median_ms"] / row["ours-c"]["median_ms"]
        best = _min(row, "jax") / _min(row, "ours-c")
        target = "meets" if speedup >= 2 else "misses"
        lines.append(
            f"- {row['shape']} at N={row['N']}, {row['threads']} threads: ours (C) "
            f"{row['ours-c']['median_ms']:.0f} ms vs JAX {row['jax']['median_ms']:.0f} ms per "
            f"step (medians) on this CPU, JAX / ours = {speedup:.2f}, {target} the >= 2x target; "
            f"fastest repeats: {_min(row, 'ours-c'):.0f} vs {_min(row, 'jax'):.0f} ms "
            f"({best:.2f}x). The paper's JAX code measured {ref:.0f} ms/step at this shape on "
            "its own 2-core machine.")
    lines += [
        "",
        "Notes: the JAX reference is written in the benchmark from DESIGN.md following the "
        "paper's formulation (complex `B_norm @ u`, `associative_scan`, complex `C @ x`); it is "
        "batched instead of vmapped per example and uses a hand-written AdamW (no optax), "
        "timed only after compilation. The naive loop runs only at N="
        f"{_naive_n(report['results'])} with {report['naive_repeats']} repeats (it is slow). "
        "Per-step times and setup/compile times are in `train_throughput.json`.",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"ours-c": "ours (C kernel)", "ours-chunked": "ours (torch chunked)",
              "naive-loop": "naive time loop", "jax": "JAX associative_scan"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    grid = [r for r in _main_rows(report) if r["shape"] == "4-block"]
    for impl in IMPLS:
        pts = [(r["N"], r[impl]["median_ms"], r[impl]["iqr_ms"]) for r in grid if impl in r]
        if not pts:
            continue
        n, med, iqr = map(np.asarray, zip(*pts, strict=True))
        ax.errorbar(n, med, yerr=iqr / 2, marker="o", capsize=3, label=labels[impl])
    if grid and not report["quick"]:
        ax.scatter([256], [PAPER_JAX_MS["4-block"]], marker="*", s=120, color="k", zorder=5,
                   label="paper's JAX code (its machine)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if grid:
        g = grid[0]
        ax.set_title(f"blocks={g['blocks']}, H={g['H']}, L={g['L']}, batch={g['batch']}")
    ax.set_xlabel("state width N")
    ax.set_ylabel("ms per training step")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    other = [r for r in _main_rows(report) if r["shape"] == "smnist"]
    if other:
        r = other[0]
        names = [i for i in IMPLS if i in r]
        bx.bar([labels[i].replace(" (", "\n(") for i in names],
               [r[i]["median_ms"] for i in names],
               yerr=[r[i]["iqr_ms"] / 2 for i in names], capsize=3,
               color=[f"C{IMPLS.index(i)}" for i in names])
        if not report["quick"]:
            bx.axhline(PAPER_JAX_MS["smnist"], color="k", ls="--", lw=1,
                       label="paper's JAX code (its machine)")
            bx.legend(fontsize=8)
        bx.set_yscale("log")
        bx.set_title(f"sMNIST shape: blocks={r['blocks']}, N={r['N']}, H={r['H']}, "
                     f"L={r['L']}, batch={r['batch']}", fontsize=9)
        bx.tick_params(axis="x", labelsize=7)
        bx.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(f"Training step time, {report['machine']['threads']} threads, "
                 f"{report['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per config (5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (2; JAX compiles)")
    ap.add_argument("--naive-repeats", type=int, default=2, help="timed naive-loop steps (2)")
    ap.add_argument("--threads", type=int, default=2, help="threads for every implementation")
    ap.add_argument("--extra-threads", type=int, nargs="*", default=[1],
                    help="also time the largest N at these thread counts (default: 1)")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    ap.add_argument("--n", type=int, nargs="+", help="only these state widths")
    ap.add_argument("--shape", nargs="+", choices=("4-block", "smnist"), help="only these shapes")
    ap.add_argument("--out", type=Path, default=RESULTS / "train_throughput",
                    help="output prefix for .json, .md and .png")
    ap.add_argument("--report-only", type=Path, metavar="JSON",
                    help="no measuring: rewrite the .md and .png from a saved .json")
    args = ap.parse_args()
    if args.report_only:
        report = json.loads(args.report_only.read_text())
        args.out = args.report_only.with_suffix("")
    else:
        report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    plot(report, args.out.with_suffix(".png"))
    print(markdown(report))
    print(f"wrote {args.out}.{{json,md,png}}", file=sys.stderr)


if __name__ == "__main__":
    main()
