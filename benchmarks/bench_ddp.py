"""Training throughput at world size 1 and 2 on the CPU (gloo): step time and samples/s.

Each run is the command a user types: ``compressm-tune train`` in one process (world size 1,
the single-process path, no process group) or under ``torchrun --nproc-per-node 2`` (world
size 2: each rank trains half of the same global batch through DistributedDataParallel),
one thread per rank (``--threads 1``), at train's default shape (mnist1d, 4 blocks, H=64,
N=256, global batch 64). The step time is that of the second half of a run's steps (from
``metrics.jsonl``'s cumulative ``train_time_s``: training steps only, no evaluation, no start-up),
so warm-up is left out. Runs alternate between the world sizes, ``--repeats`` times each.

    python benchmarks/bench_ddp.py [--steps 30] [--repeats 3] [--quick]
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, machine_line, parser, spread, write  # noqa: E402

from compressm_tune._table import markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHAPE = {"blocks": 4, "hidden": 64, "state_dim": 256, "batch_size": 64}  # train's defaults
QUICK = {"blocks": 2, "hidden": 16, "state_dim": 16, "batch_size": 16}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(world: int, shape: dict[str, int], steps: int, out: Path) -> dict[str, Any]:
    """One training run at ``world`` ranks; its steady step time (ms) and wall time (s)."""
    flags = ["train", "--dataset", "mnist1d", "--blocks", str(shape["blocks"]),
             "--hidden", str(shape["hidden"]), "--state-dim", str(shape["state_dim"]),
             "--batch-size", str(shape["batch_size"]), "--steps", str(steps),
             "--eval-every", str(steps // 2), "--threads", "1", "--device", "cpu",
             "--no-progress", "--out", str(out)]
    cli = ["-m", "compressm_tune.cli", *flags]
    if world > 1:
        cli = ["-m", "torch.distributed.run", "--nproc-per-node", str(world),
               "--master-port", str(_free_port()), *cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, *cli], env=env, cwd=ROOT, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"world size {world} failed ({done.returncode}):\n{done.stderr}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    half, end = records[0], records[-1]
    ms = (end["train_time_s"] - half["train_time_s"]) * 1e3 / (end["step"] - half["step"])
    return {"step_ms": ms, "wall_s": wall}


def main() -> None:
    ap = parser(__doc__, "ddp_cpu", quick="a small shape, a few steps: a smoke test")
    ap.add_argument("--steps", type=int, default=30, help="steps per run (timed: the second half)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per world size, alternating")
    args = ap.parse_args()
    shape = QUICK if args.quick else SHAPE
    steps = 10 if args.quick else args.steps
    repeats = 1 if args.quick else args.repeats
    load_before = os.getloadavg()[0]
    from compressm_tune.data import load_dataset

    load_dataset("mnist1d")  # generated once into the cache, before any timing
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for world in runs:
                runs[world].append(run_once(world, shape, steps, Path(tmp) / f"w{world}-{r}"))
                print(f"world size {world}, run {r + 1}: {runs[world][-1]['step_ms']:.1f} "
                      f"ms/step", flush=True)
    rows, results = [], {}
    for world, done in runs.items():
        s = spread([d["step_ms"] for d in done])
        s["samples_per_s"] = shape["batch_size"] / s["median_ms"] * 1e3
        s["wall_s"] = [d["wall_s"] for d in done]
        results[str(world)] = s
    base = results["1"]["samples_per_s"]
    for world, s in results.items():
        rows.append([world, f"{s['median_ms']:.1f}", f"{s['iqr_ms']:.1f}",
                     f"{s['samples_per_s']:.0f}", f"{s['samples_per_s'] / base:.2f}x"])
    m = machine(load_before)
    md = "\n".join([
        "# Training throughput at world size 1 and 2 (CPU, gloo, one thread per rank)", "",
        f"`compressm-tune train` on mnist1d, {shape['blocks']} blocks, H={shape['hidden']}, "
        f"N={shape['state_dim']}, global batch {shape['batch_size']}, {steps} steps per run "
        f"(timed: the second half), {repeats} run(s) per world size, alternating; world size "
        "2 under `torchrun --nproc-per-node 2` (each rank half the batch, "
        "DistributedDataParallel). Median and interquartile range over runs.", "",
        markdown_table(["world size", "step ms", "IQR ms", "samples/s", "vs world size 1"],
                       rows), "",
        machine_line(m), ""])
    write(args.results_dir / args.name, {"shape": shape, "steps": steps, "repeats": repeats,
                                         "results": results, "machine": m}, md)


if __name__ == "__main__":
    main()
