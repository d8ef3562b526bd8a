"""GPU training step: ours (Triton kernels; fp32, tf32, bf16; the pure-torch path) against the
paper's JAX LRU, side by side in one process, interleaved.

One step = forward + backward + AdamW on random data with cross-entropy (dropout 0.1), at the
paper's sMNIST and sCIFAR shapes, a 4-block one, each also at a reduced width, and the selective
layer at N=128 and N=12. ``ours-P-graph``: the package's ``TrainStep`` replaying a captured CUDA
graph in precision P (what ``train --device cuda --precision P`` runs); ``ours-P``: eager;
``ours-torch-fp32``: eager under ``models.torch_scans()``; ``jax``: the paper's own ``LRU``
(``--peer-root``, a checkout of camail-official/compressm) with ``optax.adamw`` under
``eqx.filter_jit``, skipped with the reason when it cannot run. Every implementation is built
and warmed up first, then ``--rounds`` rounds of ``--steps`` synchronized steps each, in a
shuffled order per round: median, min and max ms per step, and peak device memory.
``--profile SHAPE:IMPL`` instead writes the CUDA kernels of 3 eager steps by device time
(torch.profiler) to ``gpu_profile_SHAPE.md``.

    python benchmarks/bench_gpu_train.py --peer-root PATH [--rounds 5] [--steps 3]
    python benchmarks/bench_gpu_train.py --profile scifar:ours-bf16
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, write  # noqa: E402
from _common import parser as parser_  # noqa: E402

from compressm_tune._table import markdown_table  # noqa: E402
from compressm_tune.models import SSMConfig, SSMModel, torch_scans  # noqa: E402
from compressm_tune.training.optim import build_optimizer  # noqa: E402
from compressm_tune.training.step import TrainStep  # noqa: E402

CLASSES, DROPOUT, LR = 10, 0.1, 1e-3
# (name, arch, blocks, N, H, L, batch, d_input)
SHAPES = [
    ("smnist", "lru", 1, 256, 8, 784, 50, 1),
    ("smnist-reduced", "lru", 1, 16, 8, 784, 50, 1),
    ("scifar", "lru", 6, 384, 512, 1024, 50, 3),
    ("scifar-reduced", "lru", 6, 24, 512, 1024, 50, 3),
    ("4-block", "lru", 4, 256, 64, 1024, 16, 1),
    ("selective", "selective", 4, 128, 256, 1024, 16, 1),
    ("selective-reduced", "selective", 4, 12, 256, 1024, 16, 1),
]
# eager, or replayed from a captured CUDA graph (-graph: what `train --device cuda` does)
OURS = ("ours-fp32-graph", "ours-tf32-graph", "ours-bf16-graph", "ours-fp32", "ours-bf16",
        "ours-torch-fp32")


@contextlib.contextmanager
def matmul_precision(precision: str):
    """TF32 float32 matrix products inside the block for ``tf32``, as ``train`` sets them."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else old)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


class TorchStep:
    """One of our implementations at one shape: the package's own ``TrainStep`` (what
    ``compressm-tune train --device cuda`` runs), ``step()`` = one training step."""

    def __init__(self, impl: str, shape: tuple) -> None:
        _, arch, blocks, n, h, length, batch, d_in = shape
        torch.manual_seed(0)
        self.impl = impl
        self.precision = impl.split("-")[1] if impl != "ours-torch-fp32" else "fp32"
        device = torch.device("cuda")
        self.model = SSMModel(SSMConfig(arch=arch, d_input=d_in, d_output=CLASSES, d_model=h,
                                        state_dims=[n] * blocks, dropout=DROPOUT)).to(device)
        self.opt = build_optimizer(self.model, LR, 0.05, 0.5, fused=True)
        self.step_fn = TrainStep(F.cross_entropy, device, self.precision,
                                 graphs=impl.endswith("-graph"))
        self.x = torch.randn(batch, length, d_in, device=device)
        self.y = torch.randint(0, CLASSES, (batch,), device=device)

    def step(self) -> None:
        scans = torch_scans() if self.impl == "ours-torch-fp32" else contextlib.nullcontext()
        with scans, matmul_precision(self.precision):
            self.step_fn(self.model, self.opt, self.x, self.y)

    @staticmethod
    def sync() -> None:
        torch.cuda.synchronize()


class JaxStep:
    """The paper's LRU (``--peer-root``) trained with optax AdamW under ``eqx.filter_jit``."""

    def __init__(self, shape: tuple, peer_root: str) -> None:
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import optax

        LRU = _peer_lru(peer_root)

        _, _, blocks, n, h, length, batch, d_in = shape
        key = jax.random.PRNGKey(0)
        model, state = eqx.nn.make_with_state(LRU)(
            blocks, d_in, n, h, CLASSES, classification=True, drop_rate=DROPOUT, key=key)
        opt = optax.adamw(LR, weight_decay=0.05)
        opt_state = opt.init(eqx.filter(model, eqx.is_array))
        batched = jax.vmap(model.__class__.__call__, axis_name="batch",
                           in_axes=(None, 0, None, None), out_axes=(0, None))

        @eqx.filter_jit
        def train_step(model, state, opt_state, x, y, key):
            def loss_fn(model, state):
                probs, state = batched(model, x, state, key)  # softmax outputs, as the paper's
                picked = jnp.take_along_axis(probs, y[:, None], axis=1)
                return -jnp.mean(jnp.log(picked + 1e-9)), state

            (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
                model, state)
            updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_array))
            return eqx.apply_updates(model, updates), state, opt_state, loss

        self.jax, self.train_step = jax, train_step
        self.carry = (model, state, opt_state)
        self.x = jax.random.normal(jax.random.PRNGKey(1), (batch, length, d_in))
        self.y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, CLASSES)
        self.key = jax.random.PRNGKey(3)
        self.loss = None

    def step(self) -> None:
        self.key, sub = self.jax.random.split(self.key)
        *self.carry, self.loss = self.train_step(*self.carry, self.x, self.y, sub)

    def sync(self) -> None:
        self.jax.block_until_ready(self.loss)


def _peer_lru(peer_root: str) -> type:
    """The peer's ``LRU`` class. Its package ``__init__`` imports its training code, which the
    model-only copy lacks, so the package is registered by path without running it."""
    import importlib
    import types

    if "compressm" not in sys.modules:
        package = types.ModuleType("compressm")
        package.__path__ = [os.path.join(peer_root, "compressm")]
        sys.modules["compressm"] = package
    return importlib.import_module("compressm.models.lru").LRU


def jax_status(peer_root: str | None, platform: str = "gpu") -> str | None:
    """None when the JAX peer can run on ``platform``, else why not."""
    if not peer_root:
        return "no --peer-root (a checkout of camail-official/compressm)"
    if not os.path.isfile(os.path.join(peer_root, "compressm", "models", "lru.py")):
        return f"{peer_root}/compressm/models/lru.py not found"
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch
    try:
        import equinox  # noqa: F401
        import jax
        import optax  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} does not import"
    if not any(d.platform == platform for d in jax.devices()):
        return f"jax sees no {platform}"
    return None


def _peak_mib(impl: str, runner: Any) -> float | None:
    if impl == "jax":
        stats = runner.jax.devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return None if peak is None else peak / 2**20
    return torch.cuda.max_memory_allocated() / 2**20


def _time(runner: Any, steps: int) -> float:
    runner.sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.step()
    runner.sync()
    return (time.perf_counter() - t0) / steps * 1e3


def measure_shape(shape: tuple, impls: list[str], args) -> dict[str, Any]:
    row: dict[str, Any] = {"shape": shape[0], "arch": shape[1], "blocks": shape[2], "N": shape[3],
                           "H": shape[4], "L": shape[5], "batch": shape[6]}
    runners, peaks = {}, {}
    gc.collect()
    torch.cuda.empty_cache()
    for impl in impls:
        if impl == "jax" and shape[1] != "lru":
            continue
        if impl == "ours-torch-fp32" and shape[1] == "selective" and shape[3] > 32:
            row[impl] = {"skipped": "the torch path stores (B, L, H, N) tensors (tens of GiB)"}
            continue
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            runners[impl] = JaxStep(shape, args.peer_root) if impl == "jax" else TorchStep(
                impl, shape)
            for _ in range(args.warmup):
                runners[impl].step()
            runners[impl].sync()
        except Exception as exc:  # a variant that cannot run here is reported, not fatal
            row[impl] = {"failed": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            runners.pop(impl, None)
            continue
        row[impl] = {"setup_and_warmup_s": round(time.perf_counter() - t0, 2)}
        peaks[impl] = 0.0
    times: dict[str, list[float]] = {impl: [] for impl in runners}
    order = list(runners)
    for _ in range(args.rounds):
        random.shuffle(order)
        for impl in order:
            torch.cuda.reset_peak_memory_stats()
            times[impl].append(_time(runners[impl], args.steps))
            peaks[impl] = max(peaks[impl], _peak_mib(impl, runners[impl]) or 0.0)
    for impl, ms in times.items():
        row[impl].update({"median_ms": float(np.median(ms)), "min_ms": float(min(ms)),
                          "max_ms": float(max(ms)), "rounds_ms": [round(t, 3) for t in ms],
                          "peak_mib": round(peaks[impl], 1)})
    del runners
    line = ", ".join(f"{i} {row[i]['median_ms']:.2f} ms" for i in impls
                     if "median_ms" in row.get(i, {}))
    print(f"{shape[0]}: {line}", flush=True)
    return row


def profile(spec: str, results_dir) -> None:
    """Profile 3 eager steps of ``SHAPE:IMPL`` and write the kernel table."""
    name, impl = spec.split(":")
    shape = next(s for s in SHAPES if s[0] == name)
    runner = TorchStep(impl, shape)
    for _ in range(3):
        runner.step()
    runner.sync()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            runner.step()
        runner.sync()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30,
                                      max_name_column_width=60)
    text = (f"# Where a training step's time goes: {name}, {impl} (3 steps, eager)\n\n"
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}. torch.profiler's "
            "table, by total CUDA time.\n\n```\n" + table + "\n```\n")
    (results_dir / f"gpu_profile_{name}.md").write_text(text)
    print(table)


def _fmt(cell: dict[str, Any]) -> str:
    if "median_ms" in cell:
        return f"{cell['median_ms']:.2f} ({cell['min_ms']:.2f}-{cell['max_ms']:.2f})"
    return "skipped" if "skipped" in cell else "failed" if cell else "-"


def _ratio(rows: dict[str, dict], a: tuple[str, str], b: tuple[str, str]) -> str:
    x, y = rows.get(a[0], {}).get(a[1], {}), rows.get(b[0], {}).get(b[1], {})
    return f"{x['median_ms'] / y['median_ms']:.2f}" if "median_ms" in x and "median_ms" in y \
        else "n/a"


def markdown(payload: dict[str, Any]) -> str:
    m, impls, res = payload["machine"], payload["impls"], payload["results"]
    rows = {row["shape"]: row for row in res}
    ratios = [f"- {shape}: {impl} / jax = {_ratio(rows, (shape, impl), (shape, 'jax'))}"
              for shape in ("smnist", "scifar", "4-block")
              for impl in ("ours-fp32-graph", "ours-tf32-graph", "ours-bf16-graph", "ours-fp32")]
    ratios += [f"- compression, {what} ({impl}): {_ratio(rows, (small, impl), (big, impl))}"
               for what, small, big, group in (
                   ("LRU sCIFAR N=24 / N=384", "scifar-reduced", "scifar",
                    ("ours-fp32-graph", "ours-bf16-graph", "jax")),
                   ("selective N=12 / N=128", "selective-reduced", "selective",
                    ("ours-fp32-graph", "ours-bf16-graph"))) for impl in group]
    return "\n".join([
        "# GPU training step: ours (Triton) vs the paper's JAX LRU", "",
        f"GPU: {m.get('gpu')}; torch {m['torch']}, triton {m.get('triton')}, jax {m.get('jax')} "
        f"(default matmul precision: {m.get('jax_matmul_precision')}); CPU load "
        f"{m['load_avg_1m']:.2f}. One step = forward + backward + AdamW, dropout {DROPOUT}. "
        f"Median of {payload['rounds']} interleaved rounds of {payload['steps']} steps (min-max),"
        " ms per step.", "",
        markdown_table(["shape", "blocks x (N, H), L, batch", *impls], [
            [r["shape"], f"{r['blocks']} x ({r['N']}, {r['H']}), {r['L']}, {r['batch']}",
             *(_fmt(r.get(i, {})) for i in impls)] for r in res]), "",
        "Peak device memory (MiB) during the timed steps (-graph variants: without the graph's "
        "own pool, allocated at capture):", "",
        markdown_table(["shape", *impls], [[r["shape"], *(r.get(i, {}).get("peak_mib", "-")
                                                          for i in impls)] for r in res]),
        "", "Ratios (medians):", "", *ratios,
        *([f"\nJAX peer not run: {payload['jax_skipped']}."] if payload.get("jax_skipped")
          else [])])


def main() -> None:
    parser = parser_(__doc__, "gpu_train", quick="the two sMNIST shapes, 2 rounds of 1 step")
    parser.add_argument("--peer-root", default=None,
                        help="checkout of camail-official/compressm (its compressm/ package)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    parser.add_argument("--impls", default=",".join((*OURS, "jax")))
    parser.add_argument("--profile", metavar="SHAPE:IMPL", default=None)
    parser.add_argument("--report-only", metavar="JSON", default=None,
                        help="rewrite the Markdown from an earlier run's JSON")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.rounds, args.steps, args.warmup = "smnist,smnist-reduced", 2, 1, 1
    if args.report_only:
        payload = json.loads(open(args.report_only).read())
        write(args.results_dir / args.name, payload, markdown(payload))
        return
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_train: no CUDA device; nothing to measure")
    if args.profile:
        profile(args.profile, args.results_dir)
        return
    jax_skipped = jax_status(args.peer_root) if "jax" in args.impls else "not requested"
    wanted = args.impls.split(",")
    impls = [i for i in (*OURS, "jax") if i in wanted and not (i == "jax" and jax_skipped)]
    mach = machine()
    import triton

    mach.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__,
                cuda=torch.version.cuda)
    if "jax" in impls:
        import jax

        mach.update(jax=jax.__version__,
                    jax_matmul_precision=str(jax.config.jax_default_matmul_precision))
    names = args.shapes.split(",")
    results = [measure_shape(s, impls, args) for s in SHAPES if s[0] in names]
    payload = {"benchmark": "gpu_train", "machine": mach, "rounds": args.rounds,
               "steps": args.steps, "warmup": args.warmup, "impls": impls,
               "jax_skipped": jax_skipped if "jax" in args.impls else None, "results": results}
    write(args.results_dir / args.name, payload, markdown(payload))


if __name__ == "__main__":
    main()
