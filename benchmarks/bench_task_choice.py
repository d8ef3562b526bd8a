"""Which task shows in-training compression: a cut model against the same widths from scratch.

One job = one line of arguments: DATASET BLOCKS HIDDEN N STEPS SEED MODE, MODE one of
``full`` (N states throughout), ``cut-settle`` (tau=0.04, the settle schedule on input-weighted
HSVs; then the final widths trained from scratch, same seed and steps) or ``cut-window``
(tau=0.04, the paper's window schedule; then scratch). Batch size from ``BATCH`` (default 64).
One torch thread; prints one JSON line per job (test metric at the best validation checkpoint,
wall and process CPU seconds, 1-minute load). The choice of the quickstart's default task used
it (bench_results/tune_default_task.md):

    BATCH=32 python benchmarks/bench_task_choice.py lti-sysid 1 16 256 600 0 cut-settle
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from compressm_tune.data import load_dataset
from compressm_tune.models import SSMConfig, dropout_for
from compressm_tune.reduction import ReduceConfig, Reducer, ReductionPolicy
from compressm_tune.training import TrainConfig, Trainer


def main() -> None:
    ds, blocks, hidden, n, steps, seed, mode = sys.argv[1:8]
    blocks, hidden, n, steps, seed = int(blocks), int(hidden), int(n), int(steps), int(seed)
    batch = int(os.environ.get("BATCH", 64))
    torch.set_num_threads(1)
    data = load_dataset(ds, seed=seed)
    metric = "accuracy" if data.task == "classification" else "loss"

    def run(dims: list[int], reducer: Reducer | None, tag: str) -> dict:
        model = SSMConfig(d_input=data.d_input, d_output=data.d_output, d_model=hidden,
                          state_dims=dims, dropout=dropout_for(data.task), pooling=data.pooling)
        train = TrainConfig(steps=steps, batch_size=batch, eval_every=max(1, steps // 10),
                            seed=seed, threads=1)
        out = f"runs/task-choice/{ds}-{blocks}x{hidden}x{n}-{steps}-b{batch}-{tag}-{seed}"
        t, c = time.time(), time.process_time()
        s = Trainer(model, train, data, out, reducer=reducer, progress=False).fit()
        return {"tag": tag, "dims": s["best_state_dims"], "test": s["test_best"][metric],
                "wall_s": round(time.time() - t, 1), "cpu_s": round(time.process_time() - c, 1)}

    runs = []
    if mode == "full":
        runs.append(run([n] * blocks, None, "full"))
    else:
        policy = (ReductionPolicy("tau", 0.04, weighting="input") if mode == "cut-settle"
                  else ReductionPolicy("tau", 0.04))
        reducer = Reducer(ReduceConfig(policy=policy, schedule=mode.removeprefix("cut-"),
                                       max_drop=0.02 if metric == "accuracy" else 0.1))
        cut = run([n] * blocks, reducer, mode)
        runs += [cut, run(list(cut["dims"]), None, "scratch-" + mode)]
    print(json.dumps({"dataset": ds, "shape": {"blocks": blocks, "hidden": hidden, "N": n,
                                               "steps": steps, "batch": batch},
                      "seed": seed, "load_1m": os.getloadavg()[0], "runs": runs}))


if __name__ == "__main__":
    main()
