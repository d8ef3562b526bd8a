"""torch.distributed plumbing of the trainer: the process group, shards, and what ranks share.

``compressm-tune train`` under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) starts one process group (NCCL on CUDA,
gloo on CPU; each rank pinned to ``cuda:LOCAL_RANK``) with :func:`init_from_env`; the
:class:`~compressm_tune.training.Trainer` then reads :func:`current`. Without torchrun
nothing here runs: no process group, the single-process path unchanged.

What the ranks agree on, and how:

* the global batch is the configured one: every rank draws the same global batch (a pure
  function of seed and step) and trains on its contiguous :func:`shard`, so a run at world
  size K sees the data a run at world size 1 sees, and resumes at any world size;
* validation is sharded the same way and its per-sample values are gathered in sample order
  (:func:`gather_rows`) before a record is made or a cut is judged, so every rank judges the
  same global numbers;
* cuts: every rank runs the same reducer on bitwise identical weights (DDP's all-reduced
  gradients), the same calibration slice and the same gathered validation, so all make the
  same cut; :func:`check_widths` proves it after every change of shapes (one line on a
  mismatch, never a hang), and re-wrapping in DDP broadcasts rank 0's weights;
* settings: :func:`check_same` compares a hash of the run's settings and the package version.

Each rank's loss is the mean over its shard and DDP averages the gradients, which is the
global batch's mean whenever every shard scores as many elements: always for classification
and fixed-length regression; for NaN-padded regression targets of varying length, shards
with more real steps weigh a little less than in one process.

A rank that dies or stops answering ends the others' collectives: gloo notices a closed
connection at once, and every collective gives up after the process group's ``timeout``
(NCCL: its watchdog); torchrun's agent then stops the remaining workers.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from compressm_tune._device import resolve_device
from compressm_tune.errors import ConfigError, DistributedError

__all__ = ["Ranks", "check_same", "check_split", "check_widths", "current", "gather_rows",
           "init_from_env", "launched", "mean", "shard", "teardown", "unanimous", "wrap"]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the process group."""

    rank: int
    world: int
    device: torch.device  # where collectives' tensors live (NCCL: the rank's GPU)

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that writes files."""
        return self.rank == 0


def launched() -> bool:
    """Whether this process was started by torchrun (its environment variables are set)."""
    return all(name in os.environ for name in _ENV)


def init_from_env(device: str, timeout_s: float) -> str:
    """Start the process group torchrun describes; return the device spec of this rank.

    ``device`` is the ``--device`` asked for: on CUDA each rank takes ``cuda:LOCAL_RANK``
    (NCCL), on CPU gloo. ``timeout_s`` bounds every collective: a lost rank ends the others
    within it.
    """
    local = int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    kind = resolve_device(device)
    if kind.type == "cuda":
        if kind.index is not None and world > 1:
            raise ConfigError(f"--device {device}: under torchrun each rank uses "
                              "cuda:LOCAL_RANK; pass --device cuda (or auto)")
        if local >= torch.cuda.device_count():
            raise ConfigError(f"rank with LOCAL_RANK {local} has no GPU: "
                              f"{torch.cuda.device_count()} visible; lower --nproc-per-node")
        spec = f"cuda:{local}"
        torch.cuda.set_device(local)
    else:
        spec = "cpu"
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if kind.type == "cuda" else "gloo",
                                    timeout=timedelta(seconds=timeout_s),
                                    device_id=torch.device(spec) if kind.type == "cuda"
                                    else None)
        except (dist.DistError, RuntimeError) as exc:  # no rendezvous: a port, a lost peer
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise DistributedError(
                f"rank {os.environ['RANK']} cannot join the process group at "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}: {first[:200]}"
            ) from None
    return spec


def teardown() -> None:
    """Leave the process group (a no-op without one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def current() -> Ranks | None:
    """The process group's ranks, or None when training runs in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    backend = dist.get_backend()
    device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
              else torch.device("cpu"))
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def shard(n: int, ranks: Ranks) -> slice:
    """This rank's contiguous share of ``n`` rows (the first ``n % world`` ranks hold one
    more); shards in rank order cover ``0..n`` in order."""
    size, extra = divmod(n, ranks.world)
    start = ranks.rank * size + min(ranks.rank, extra)
    return slice(start, start + size + (ranks.rank < extra))


def check_split(ranks: Ranks, batch_size: int, n_train: int, n_val: int) -> None:
    """Refuse, in one line, a batch or data the ranks cannot share."""
    k = ranks.world
    if batch_size % k:
        raise ConfigError(f"--batch-size {batch_size} does not split over {k} ranks: use a "
                          f"multiple of {k} (the batch is the global one; each rank trains "
                          "on batch-size / world-size sequences)")
    if n_train < batch_size:
        raise ConfigError(f"the training split holds {n_train} sequences, fewer than one "
                          f"global batch of {batch_size}: lower --batch-size")
    if n_val < k:
        raise ConfigError(f"the validation split holds {n_val} sequences, fewer than the "
                          f"{k} ranks sharing it: raise --val-fraction or use fewer ranks")


def _all_gather_bytes(data: bytes, ranks: Ranks) -> list[bytes]:
    """Every rank's ``data``, in rank order."""
    sizes = [torch.zeros(1, dtype=torch.int64, device=ranks.device) for _ in range(ranks.world)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=ranks.device))
    longest = max(int(s) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8, device=ranks.device)
    if data:
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = [torch.empty_like(mine) for _ in range(ranks.world)]
    dist.all_gather(parts, mine)
    return [p[:int(s)].cpu().numpy().tobytes() for p, s in zip(parts, sizes, strict=True)]


def unanimous(error: Exception | None, ranks: Ranks) -> None:
    """Raise on every rank when any rank met ``error`` (a check only some ranks can make,
    such as rank 0's folder lock): that rank raises its own, the others a
    :class:`DistributedError` naming it. Returns on every rank otherwise."""
    messages = _all_gather_bytes(b"" if error is None else str(error).encode(), ranks)
    if error is not None:
        raise error
    for rank, message in enumerate(messages):
        if message:
            raise DistributedError(f"rank {rank}: {message.decode()}")


def check_same(settings: str, ranks: Ranks) -> None:
    """Refuse when the ranks run other settings or another package version (``settings``:
    a canonical text of everything that must match)."""
    from compressm_tune import __version__

    digest = hashlib.sha256(f"{__version__}\n{settings}".encode()).digest()
    digests = _all_gather_bytes(digest, ranks)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise DistributedError(
            f"rank(s) {differ} run other settings or another compressm-tune version than rank "
            f"0 (this rank: {ranks.rank}, version {__version__}): start every rank with the "
            "same command and installation")


def check_widths(widths: list[int], ranks: Ranks) -> None:
    """Prove that every rank holds the same state widths (after a cut), or stop in one line."""
    mine = torch.tensor(widths, dtype=torch.int64, device=ranks.device)
    every = [torch.empty_like(mine) for _ in range(ranks.world)]
    dist.all_gather(every, mine)
    seen = [t.cpu().tolist() for t in every]
    if any(w != seen[0] for w in seen):
        raise DistributedError(f"the ranks cut to different widths {seen}; they ran on "
                               "different numerics (mixed devices or libraries?)")


def gather_rows(values: torch.Tensor, n: int, ranks: Ranks) -> torch.Tensor:
    """The full ``(n,)`` vector whose :func:`shard` of rows this rank holds, on the CPU, in
    row order (float64, so sums match the single-process ones)."""
    longest = -(-n // ranks.world)
    mine = torch.zeros(longest, dtype=torch.float64, device=ranks.device)
    mine[:len(values)] = values.to(ranks.device, torch.float64)
    parts = [torch.empty_like(mine) for _ in range(ranks.world)]
    dist.all_gather(parts, mine)
    out = []
    for rank, part in enumerate(parts):
        rows = shard(n, Ranks(rank, ranks.world, ranks.device))
        out.append(part[:rows.stop - rows.start])
    return torch.cat(out).cpu()


def mean(value: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The mean over ranks of a scalar tensor (a copy; the argument is left alone)."""
    total = value.detach().to(ranks.device, torch.float64).clone().reshape(1)
    dist.all_reduce(total)
    return total[0] / ranks.world


def broadcast_payload(payload: dict[str, Any] | None, ranks: Ranks) -> dict[str, Any] | None:
    """Rank 0's ``payload`` (a checkpoint's entries) on every rank, serialized as a checkpoint
    is and loaded with ``weights_only=True``."""
    data = b""
    if ranks.main and payload is not None:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
    size = torch.tensor([len(data)], dtype=torch.int64, device=ranks.device)
    dist.broadcast(size, 0)
    if not int(size):
        return None
    if ranks.main:
        dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(ranks.device), 0)
        return payload
    received = torch.empty(int(size), dtype=torch.uint8, device=ranks.device)
    dist.broadcast(received, 0)
    return torch.load(io.BytesIO(received.cpu().numpy().tobytes()), map_location="cpu",
                      weights_only=True)


def wrap(model: torch.nn.Module, ranks: Ranks) -> torch.nn.Module:
    """``model`` in a fresh DistributedDataParallel wrapper (its construction broadcasts rank
    0's weights and buffers). Batch statistics are synchronized by the model itself
    (``SSMModel.sync_batch_stats``), so buffers need no broadcast at every step."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
