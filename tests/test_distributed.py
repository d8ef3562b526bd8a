"""Training under torch.distributed (gloo, real processes): the same run at world size 2 and 1,
resuming across world sizes, and the one-line endings (a killed rank, a batch that does not
split, ranks on different settings)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compressm_tune.models import SSMConfig
from compressm_tune.reduction import ReduceConfig, Reducer, ReductionPolicy
from compressm_tune.training import TrainConfig, Trainer, load_checkpoint
from compressm_tune.training.distributed import Ranks, shard

ROOT = Path(__file__).resolve().parent.parent
STEPS = 30


def _trainer(dataset, out, resume=False, on_eval=None):
    """A tiny run whose every step is deterministic (no dropout) and that cuts at step 10
    with the safety net on (it validates before and after; max_drop=1 never rolls back)."""
    model_cfg = SSMConfig(d_input=dataset.d_input, d_output=dataset.d_output, d_model=8,
                          state_dims=[8, 8], dropout=0.0, pooling=dataset.pooling)
    cfg = TrainConfig(steps=STEPS, batch_size=32, lr=1e-3, eval_every=10, seed=0,
                      warmup_frac=0.1, eval_batch_size=256)
    reducer = Reducer(ReduceConfig(policy=ReductionPolicy.parse("rank=2"), schedule="window",
                                   window=0.4, max_drop=1.0))
    return Trainer(model_cfg, cfg, dataset, out, reducer=reducer, resume=resume,
                   progress=False, on_eval=on_eval)


def _keep_step_20(out: Path, rank: int = 0):
    """An ``on_eval`` that copies rank 0's step-20 checkpoints aside (``last20.pt``,
    ``best20.pt``): an interrupted run's folder."""
    def keep(record):
        if record["step"] == 20 and rank == 0:
            for name in ("last", "best"):
                (out / f"{name}20.pt").write_bytes((out / f"{name}.pt").read_bytes())
    return keep


def _interrupted_copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("last", "best"):
        (dst / f"{name}.pt").write_bytes((src / f"{name}20.pt").read_bytes())
    return dst


def _rank(rank: int, world: int, store: str, dataset, out: Path, report: Path,
          resume_from_one: Path) -> None:
    """One rank of the world-size-2 runs: trains from scratch (keeping rank 0's step-20
    checkpoint), resumes the world-size-1 run's step-20 checkpoint, and reports its widths
    and weights."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        trainer = _trainer(dataset, out, on_eval=_keep_step_20(out, rank))
        trainer.fit()
        resumed = _trainer(dataset, resume_from_one, resume=True)
        assert resumed.step == 20
        resumed.fit()
        weights = {k: v.tolist() for k, v in trainer.model.state_dict().items()}
        looped = _user_loop(rank)
        (report / f"rank{rank}.json").write_text(json.dumps(
            {"dims": trainer.model.state_dims, "weights": weights,
             "wrapped": type(trainer._trained).__name__, "user_loop": looped}))
    finally:
        dist.destroy_process_group()


def _user_loop(rank: int) -> dict:
    """A user's DDP loop with a Compressor that re-wraps the model in ``on_cut``; each rank
    trains on its own data, so ranks stay equal only if the new parameters' gradients are
    averaged too."""
    from torch.nn.parallel import DistributedDataParallel

    from compressm_tune import Compressor
    from compressm_tune.models import SSMModel

    torch.manual_seed(0)
    model = SSMModel(SSMConfig(d_input=1, d_output=1, d_model=4, state_dims=[6], dropout=0.0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    held = {"ddp": DistributedDataParallel(model)}

    def rewrap():
        held["ddp"] = DistributedDataParallel(model)

    c = Compressor(model, opt, reduce="rank=3", total_steps=8, window=0.5, every=2,
                   on_cut=rewrap)
    data = torch.Generator().manual_seed(1 + rank)
    for step in range(1, 9):
        x = torch.randn(4, 10, 1, generator=data)
        loss = held["ddp"](x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        c.step(step)
    return {"dims": model.state_dims,
            "weights": {k: v.tolist() for k, v in model.named_parameters()}}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.allclose(a[key].double(), b[key].double(), atol=1e-5, rtol=0), (
            key, (a[key].double() - b[key].double()).abs().max().item())


def test_shards_cover_the_rows_in_order():
    for n in (7, 8, 33):
        for world in (1, 2, 3):
            rows = [shard(n, Ranks(r, world, torch.device("cpu"))) for r in range(world)]
            assert [i for s in rows for i in range(n)[s]] == list(range(n))
            assert max(s.stop - s.start for s in rows) - min(s.stop - s.start for s in rows) <= 1


def test_world_size_2_trains_what_world_size_1_trains_and_resumes_across(mnist1d, tmp_path):
    """Same global batch and seed: after 30 steps with a cut the weights agree within 1e-5,
    every rank holds the same widths, and a step-20 checkpoint written at one world size
    finishes at the other as the uninterrupted run does."""
    torch.set_num_threads(1)
    one = _trainer(mnist1d, tmp_path / "one", on_eval=_keep_step_20(tmp_path / "one"))
    one.fit()
    assert one.model.state_dims == [2, 2]  # the cut happened
    two, report = tmp_path / "two", tmp_path / "report"
    two.mkdir()
    report.mkdir()
    one_at_two = _interrupted_copy(tmp_path / "one", tmp_path / "one_at_two")
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), mnist1d, two, report, one_at_two),
             nprocs=2, join=True)
    _assert_close(_weights(one_at_two / "last.pt"), _weights(tmp_path / "one" / "last.pt"))
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["wrapped"] == "DistributedDataParallel"
    assert ranks[0]["dims"] == ranks[1]["dims"] == [2, 2]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # bitwise, on every rank
    # a user's loop re-wrapping DDP after the Compressor's cut keeps the ranks equal
    assert ranks[0]["user_loop"]["dims"] == ranks[1]["user_loop"]["dims"] == [3]
    assert ranks[0]["user_loop"]["weights"] == ranks[1]["user_loop"]["weights"]
    _assert_close(_weights(two / "last.pt"), _weights(tmp_path / "one" / "last.pt"))
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    assert records[0]["reduction"][0]["action"] == "cut"
    assert records[0]["reduction"][0]["n_val"] == len(mnist1d.x_val)  # judged on all of it

    resumed = _interrupted_copy(two, tmp_path / "two_at_one")
    again = _trainer(mnist1d, resumed, resume=True)
    assert again.step == 20 and again.model.state_dims == [2, 2]
    again.fit()
    _assert_close(_weights(resumed / "last.pt"), _weights(tmp_path / "one" / "last.pt"))


# ------------------------------------------------------------------ the command line's endings

_CLI = ["-m", "compressm_tune.cli", "train", "--dataset", "mnist1d", "--hidden", "8",
        "--blocks", "1", "--state-dim", "8", "--threads", "1", "--no-progress",
        "--device", "cpu", "--eval-every", "10", "--batch-size", "32"]

# rank 1 of the killed-rank test: kills itself (SIGKILL: no handler, no goodbye) right after
# its evaluation at step 20, when rank 0 has written last.pt
_KILLED = """
import os, signal, sys
from compressm_tune.cli import main
from compressm_tune.training import Trainer
real = Trainer._evaluate_and_save
def then_die(self, losses):
    record = real(self, losses)
    if self.step == 20:
        os.kill(os.getpid(), signal.SIGKILL)
    return record
Trainer._evaluate_and_save = then_die
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argvs: list[list[str]]) -> list[subprocess.Popen]:
    """One process per rank with the environment torchrun gives its workers."""
    port = _free_port()
    procs = []
    for rank, argv in enumerate(argvs):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(len(argvs)), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_killed_rank_ends_the_job_in_one_line_with_a_checkpoint(mnist1d, tmp_path):
    out = tmp_path / "run"
    flags = [*_CLI, "--steps", "400", "--dist-timeout", "60", "--out", str(out)]
    main, killed = _launch([flags, ["-c", _KILLED, *flags[2:]]])
    killed.wait(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    # rank 0 ends by itself, within the process group's timeout (gloo sees the closed socket)
    _, err = main.communicate(timeout=60)
    assert main.returncode == 2
    lines = _lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("compressm-tune: error: rank 0 lost the other ranks at step 21")
    assert "--resume" in lines[0]
    assert load_checkpoint(out / "last.pt")["step"] == 20


@pytest.mark.parametrize("case", ["batch", pytest.param("settings", marks=pytest.mark.slow)])
def test_ranks_that_cannot_train_together_stop_in_one_line(mnist1d, tmp_path, case):
    flags = [*_CLI, "--steps", "20", "--out", str(tmp_path / "run")]
    if case == "batch":
        argvs = [[*flags, "--batch-size", "33"]] * 2
        want = "--batch-size 33 does not split over 2 ranks"
    else:
        argvs = [flags, [*flags, "--lr", "0.01"]]
        want = "run other settings"
    procs = _launch(argvs)
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    said = [_lines(err) for _, err in results]
    assert len(said[0]) == 1 and want in said[0][0], said
    assert said[1] == [], said  # rank 0 alone says it
    assert not (tmp_path / "run" / "last.pt").exists()
