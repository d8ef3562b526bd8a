"""The training loop: batches, schedule, evaluation, checkpoints, and the reduction hook.

One :class:`Trainer` owns a model, its optimizer and a dataset. Every ``eval_every`` steps it
evaluates on the validation split, appends a line to ``metrics.jsonl``, writes ``last.pt`` (and
``best.pt`` when validation improves) atomically, and, inside the reduction window, hands
control to the :class:`~compressm_tune.reduction.Reducer`, which may shrink layers.
Batches are a pure function of ``(seed, step)``, so a run resumed from ``last.pt`` sees the
same data it would have seen without the interrupt.

Under torch.distributed (``torchrun``, see :mod:`compressm_tune.training.distributed`) every
rank trains its shard of the same global batch through a DistributedDataParallel wrapper,
rebuilt with the optimizer after every cut; validation is gathered across ranks before a cut
is judged; rank 0 alone writes the folder. Checkpoints hold the unwrapped model, so a run
resumes at any world size.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import MISSING, Field, asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from compressm_tune._device import (
    PRECISIONS,
    check_device_spec,
    check_precision,
    matmul_precision,
    resolve_device,
)
from compressm_tune._io import FolderLock, atomic_write_text, ensure_dir
from compressm_tune.data import Dataset
from compressm_tune.errors import (
    CheckpointError,
    CompressmError,
    ConfigError,
    DivergedError,
    FolderBusyError,
    RankLostError,
)
from compressm_tune.models import (
    MAMBA2_SCANS,
    Mamba2Layer,
    SSMConfig,
    SSMModel,
    check_mamba2_scan,
)
from compressm_tune.reduction import CALIBRATION, spectrum_record
from compressm_tune.training import distributed
from compressm_tune.training.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from compressm_tune.training.evaluation import (
    _loss,
    check_training_memory,
    distill_loss,
    evaluate,
    score,
)
from compressm_tune.training.optim import build_optimizer, lr_factor, set_lr
from compressm_tune.training.step import TrainStep

__all__ = ["MAMBA2_SCAN_SETTING", "RunSettings", "TrainConfig", "Trainer", "dataset_record"]

# the metadata of RunSettings.mamba2_scan, also declared by settings that train outside
# RunSettings (``compress --finetune-steps``), so every flag reads the same help
MAMBA2_SCAN_SETTING = {
    "choices": MAMBA2_SCANS,
    "help": "how Mamba-2 layers run their scan: ssd (chunked, matmuls in torch) or fused "
            "(the selective layer's fused kernel over folded groups: Triton on CUDA, C on "
            "CPU; stores no (batch, L, E, N) tensor)"}


@dataclass
class RunSettings:
    """Where and how a run computes: settings shared by :class:`TrainConfig` and the budgeted
    job's ``TuneConfig``, declared once here.

    A subclass changes a default by assigning a plain value to the annotated name
    (``threads: int | None = 1``); the field keeps the help declared here (the command line's
    flag reader follows the same rule).
    """

    seed: int = field(default=0, metadata={
        "help": "seed of data split, weights, batches and search"})
    threads: int | None = field(default=None, metadata={
        "none": "torch's", "help": "torch threads for training"})
    device: str = field(default="cpu", metadata={  # the command line's default is auto
        "help": "where training runs: auto (a CUDA GPU if there is one), cpu, cuda or cuda:N"})
    precision: str = field(default="fp32", metadata={
        "choices": PRECISIONS,
        "help": "training arithmetic: fp32; tf32 (CUDA: float32 products on the tensor cores); "
                "bf16 (autocast projections, scans in float32)"})
    cuda_graphs: bool = field(default=True, metadata={
        "help": "on CUDA, launch every kernel of every step from Python instead of replaying a "
                "captured graph (slower; for debugging)"})
    batch_size: int = field(default=64, metadata={"help": "sequences per step"})
    mamba2_scan: str = field(default="ssd", metadata=MAMBA2_SCAN_SETTING)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        shared = RunSettings.__dataclass_fields__
        for name in cls.__dict__.get("__annotations__", {}):
            value = cls.__dict__.get(name, MISSING)
            if name in shared and value is not MISSING and not isinstance(value, Field):
                setattr(cls, name, field(default=value, metadata=shared[name].metadata))


@dataclass
class TrainConfig(RunSettings):
    """Optimization settings of one run (the model's shape lives in ``SSMConfig``)."""

    steps: int = field(default=1500, metadata={"help": "optimizer steps"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    # the paper's code scales the LR of nu/theta/gamma/B by a factor
    ssm_lr_factor: float = field(default=0.5, metadata={
        "help": "LR multiplier of the recurrence's parameters"})
    weight_decay: float = field(default=0.05, metadata={
        "help": "AdamW weight decay of the non-SSM parameters"})
    warmup_frac: float = field(default=0.1, metadata={
        "flag": "--warmup", "help": "share of steps in linear LR warm-up"})
    min_lr_frac: float = field(default=1e-3, metadata={  # cosine decays to lr * min_lr_frac
        "cli": False, "help": "cosine decay's floor, a share of the peak LR"})
    eval_every: int = field(default=100, metadata={"help": "steps between evaluations"})
    eval_batch_size: int = field(default=500, metadata={"cli": False})
    log_spectrum: bool = field(default=False, metadata={
        "help": "log every layer's HSVs at every evaluation and plot them (OUT/hsv.png)"})
    dist_timeout: float = field(default=60.0, metadata={
        "help": "under torchrun: seconds a rank waits for the others before the run stops "
                "with one line (a lost rank; last.pt stays for --resume)"})

    def __post_init__(self) -> None:
        check_device_spec(self.device)
        check_precision(self.precision)
        rules = {
            "steps": self.steps >= 1, "batch_size": self.batch_size >= 1,
            "lr": 0 < self.lr < math.inf, "ssm_lr_factor": 0 < self.ssm_lr_factor < math.inf,
            "weight_decay": 0 <= self.weight_decay < math.inf,
            "warmup_frac": 0 <= self.warmup_frac < 1,
            "min_lr_frac": 0 <= self.min_lr_frac <= 1, "eval_every": self.eval_every >= 1,
            "eval_batch_size": self.eval_batch_size >= 1,
            "threads": self.threads is None or self.threads >= 1,
            "dist_timeout": 0 < self.dist_timeout < math.inf,
        }
        for name, ok in rules.items():
            if not ok:
                raise ConfigError(f"invalid training setting {name}={getattr(self, name)!r}")
        check_mamba2_scan(self.mamba2_scan, "--mamba2-scan")


_SMALL_VAL = 50  # validation sequences below which best.pt's choice is mostly noise


def _schedule_attempts(reducer: Any, config: TrainConfig) -> None:
    """Make sure the reduction window holds cut attempts: with attempts only at evaluations
    and no evaluation inside the window (``steps=200``, ``eval_every=100``, window 10%), no
    cut would ever be tried. Then attempt every third of the window instead, and say so."""
    window_steps = int(reducer.config.window * config.steps)
    if (window_steps >= 1 and reducer.cadence(config.steps) is None
            and config.eval_every > window_steps):
        every = max(1, window_steps // 3)
        reducer.config = replace(reducer.config, every=every)
        print(f"compressm-tune: note: no evaluation falls in the reduction window (steps 1-"
              f"{window_steps}, evaluations every {config.eval_every}); attempting cuts every "
              f"{every} steps inside it (--reduce-every {every})", file=sys.stderr)


def _check_resumable(payload: dict[str, Any], model_config: SSMConfig, dataset: Dataset,
                     path: Path) -> None:
    """Refuse, in one line, to resume a run of another model shape or another dataset (the
    checkpoint would silently win over the flags)."""
    saved = payload["model_config"]
    initial = payload.get("initial_state_dims", saved.get("state_dims"))
    wanted = {"arch": model_config.arch, "d_model": model_config.d_model,
              "blocks": len(model_config.state_dims), "state_dims": list(model_config.state_dims),
              "d_input": model_config.d_input, "d_output": model_config.d_output}
    have = {"arch": saved.get("arch", "lru"), "d_model": saved.get("d_model"),
            "blocks": len(saved.get("state_dims", [])), "state_dims": list(initial or []),
            "d_input": saved.get("d_input"), "d_output": saved.get("d_output")}
    diff = [f"{k} {have[k]} (asked {wanted[k]})" for k in wanted if have[k] != wanted[k]]
    name = (payload.get("dataset") or {}).get("name")
    if name is not None and name != dataset.name:
        diff.insert(0, f"dataset {name} (asked {dataset.name})")
    if diff:
        raise ConfigError(f"--resume: {path} holds another run: " + ", ".join(diff)
                          + "; use its settings or another --out")


def _settings(model_config: SSMConfig, config: TrainConfig, dataset: Dataset,
              reducer: Any) -> str:
    """What every rank of one run must share, as canonical text (the device is per rank)."""
    reduce = None if reducer is None else {
        k: v for k, v in vars(reducer.config).items() if not callable(v)}
    return json.dumps({
        "model": asdict(model_config),
        "train": {k: v for k, v in asdict(config).items() if k != "device"},
        "reduce": repr(reduce), "dataset": dataset.name, "info": repr(dataset.info),
        "sizes": [len(dataset.x_train), len(dataset.x_val), len(dataset.x_test)],
    }, sort_keys=True, default=repr)


def dataset_record(dataset: Dataset) -> dict[str, Any]:
    """What a checkpoint records of its dataset: the export reads the training length and the
    normalization from it, and rebuilds the data for its parity inputs."""
    d = dataset
    return {"name": d.name, "task": d.task, "d_input": d.d_input, "d_output": d.d_output,
            "seq_len": d.seq_len, "norm_mean": list(d.norm_mean),
            "norm_std": list(d.norm_std), "info": d.info}


def _no_phase(name: str) -> AbstractContextManager:
    return nullcontext()


class Trainer:
    """Train one model on one dataset, writing everything into ``out_dir``.

    Parameters
    ----------
    model_config, config : SSMConfig, TrainConfig
    dataset : Dataset
    out_dir : str or Path
        Receives ``metrics.jsonl``, ``last.pt``, ``best.pt`` and ``summary.json``.
    reducer : Reducer, optional
        Called at every evaluation inside its window; may shrink layers.
    resume : bool
        Continue from ``out_dir/last.pt`` when it exists.
    model : SSMModel, optional
        Start from these weights instead of a fresh ``SSMModel(model_config)`` (fine-tuning;
        ``model_config`` is then ignored).
    on_eval : callable, optional
        Called with each evaluation record after it is written (the search reports
        intermediate values and prunes from here by raising).
    phase : callable, optional
        Called with a phase name, returns a context manager wrapping that phase (timing,
        tracing; default: nothing): ``"eval"`` (a periodic evaluation with its reduction
        attempt and checkpoints) and ``"validate"`` (one validation pass, the reducer's
        included). Pass the same callable to the :class:`~compressm_tune.reduction.Reducer`
        to see its phases too.

    Under an initialized default process group (``torchrun``) the trainer runs distributed
    (module docstring): ``config.batch_size`` is the global batch and must split over the
    ranks; on ranks other than 0, :meth:`fit` returns an empty dict.
    """

    def __init__(self, model_config: SSMConfig, config: TrainConfig, dataset: Dataset,
                 out_dir: str | Path, reducer: Any = None, resume: bool = False,
                 progress: bool = True, model: SSMModel | None = None,
                 on_eval: Callable[[dict[str, Any]], None] | None = None,
                 phase: Callable[[str], AbstractContextManager] | None = None,
                 teacher: SSMModel | None = None, distill_weight: float = 0.5) -> None:
        if teacher is not None and (dataset.task != "classification"
                                    or not 0 <= distill_weight <= 1):
            raise ConfigError(f"distillation needs a classification task and a weight in [0, 1]"
                              f" (task {dataset.task}, weight {distill_weight!r})")
        self.config, self.dataset, self.reducer = config, dataset, reducer
        self.on_eval = on_eval
        self.phase = phase if phase is not None else _no_phase
        self.progress = progress
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        check_precision(config.precision, self.device)
        self.ranks = distributed.current()
        world = 1 if self.ranks is None else self.ranks.world
        check_training_memory(model.config if model is not None else model_config,
                              config.batch_size // world, dataset.seq_len,
                              config.eval_batch_size, self.device,
                              None if teacher is None else teacher.config)
        if self.ranks is not None:
            distributed.check_split(self.ranks, config.batch_size, len(dataset.x_train),
                                    len(dataset.x_val))
            distributed.check_same(_settings(model_config, config, dataset, reducer),
                                   self.ranks)
        # checks first: a refused run leaves no folder behind
        self.out_dir, self._lock = Path(out_dir), None
        self._on_main(lambda: self._claim(out_dir))
        torch.manual_seed(config.seed)  # seeds CUDA's generators too
        self.model = (model if model is not None else SSMModel(model_config)).to(self.device)
        self.rebuild_optimizer()
        if reducer is not None:
            _schedule_attempts(reducer, config)
        # DDP's gradient hooks are not captured into a graph: ranks step eagerly
        if teacher is None:
            def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return _loss(out, y, dataset.task)
        else:
            teacher = teacher.to(self.device)

            def loss_fn(out: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return distill_loss(out, t, y, distill_weight)
        self._step = TrainStep(loss_fn, self.device, config.precision,
                               graphs=config.cuda_graphs and self.ranks is None,
                               teacher=teacher)
        self.step = 0
        self.best_score = float("-inf")
        self.best_loss = float("inf")  # of the best checkpoint: breaks ties in the score
        self.train_time_s = 0.0
        if len(dataset.x_val) < _SMALL_VAL:
            print(f"compressm-tune: note: the validation split holds {len(dataset.x_val)} "
                  "sequences; best.pt is chosen on them (ties go to the lower loss), so its "
                  "test score is noisy: raise --val-fraction or bring more data", file=sys.stderr)
        self.initial_state_dims = self.model.state_dims
        last = self.out_dir / "last.pt"
        payload = None
        if resume:  # rank 0 reads the file and hands it to the others
            payload = self._on_main(lambda: load_checkpoint(last) if last.exists() else None)
            if self.ranks is not None:
                payload = distributed.broadcast_payload(payload, self.ranks)
        if payload is not None:
            if model is None:
                _check_resumable(payload, model_config, dataset, last)
            self._restore(payload)

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files (rank 0, or the only process)."""
        return self.ranks is None or self.ranks.main

    def _on_main(self, action: Callable[[], Any]) -> Any:
        """``action()`` on rank 0 only; its refusal is every rank's (see
        :func:`~compressm_tune.training.distributed.unanimous`)."""
        if self.ranks is None:
            return action()
        result, error = None, None
        if self.ranks.main:
            try:
                result = action()
            except CompressmError as exc:
                error = exc
        distributed.unanimous(error, self.ranks)
        return result

    def _claim(self, out_dir: str | Path) -> None:
        """Create ``out_dir`` and lock it for this run."""
        self.out_dir = ensure_dir(out_dir)
        self._lock = FolderLock(self.out_dir)
        if not self._lock.acquire():
            raise FolderBusyError(f"another run (pid {self._lock.holder()}) is writing into "
                                  f"{self.out_dir}; wait for it or use another output folder")
        for debris in self.out_dir.glob(".*.tmp"):  # left by a kill during a write
            debris.unlink(missing_ok=True)

    # -- checkpoints -------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        """Everything a resume or rollback needs, as ``save_checkpoint`` extras."""
        return {
            "optimizer": self.optimizer.state_dict(), "step": self.step,
            "rng": torch.get_rng_state(), "train_config": asdict(self.config),
            "cuda_rng": (torch.cuda.get_rng_state(self.device)
                         if self.device.type == "cuda" else None),
            "best_score": self.best_score, "best_loss": self.best_loss,
            "train_time_s": self.train_time_s,
            "initial_state_dims": self.initial_state_dims,
            "reducer": self.reducer.state_dict() if self.reducer else None,
            "dataset": self.dataset_info(),
        }

    def dataset_info(self) -> dict[str, Any]:
        return dataset_record(self.dataset)

    def save(self, name: str) -> Path:
        path = self.out_dir / name
        if self.main:
            save_checkpoint(path, self.model, **self.payload())
        return path

    # -- the ReductionHost interface (compressm_tune.reduction) ------------------------------
    @property
    def steps_done(self) -> int:
        return self.step

    @property
    def warmup_steps(self) -> int:
        """Steps of linear LR warm-up: the adaptive schedule does not cut before they end."""
        return int(self.config.warmup_frac * self.config.steps)

    def reducible_layers(self) -> list[torch.nn.Module]:
        return self.model.ssm_layers()

    def calibration_inputs(self, n: int) -> torch.Tensor:
        return self.dataset.x_train[:n]

    # the snapshot below is the whole training state, so the reducer may let a cut recover
    # for a while before judging it
    defers_verdicts = True

    def snapshot(self) -> Path | dict[str, Any]:
        """The full training state before a cut, on disk (``pre_cut.pt``); under
        torch.distributed in memory on every rank (rank 0 alone writes files)."""
        if self.ranks is None:
            return self.save("pre_cut.pt")
        return copy.deepcopy({"model_config": self.model.config.to_dict(),
                              "model": self.model.state_dict(), **self.payload()})

    def widths_changed(self) -> None:
        self.best_score = float("-inf")  # "best" now means best at the new widths

    def restore(self, path: str | Path | dict[str, Any]) -> None:
        """Return model and optimizer to a checkpoint of this run (the reducer's rollback),
        a file or a :meth:`snapshot` held in memory."""
        payload = path if isinstance(path, dict) else load_checkpoint(path)
        self.model = model_from_checkpoint(payload, device=self.device)
        self.model.train()
        self.rebuild_optimizer(payload["optimizer"])

    def _restore(self, payload: dict[str, Any]) -> None:
        self.model = model_from_checkpoint(payload, device=self.device)
        try:
            self.rebuild_optimizer(payload["optimizer"])
            self.step = int(payload["step"])
            torch.set_rng_state(payload["rng"])
            if self.device.type == "cuda" and payload.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(payload["cuda_rng"], self.device)
            self.best_score = float(payload["best_score"])
            self.best_loss = float(payload.get("best_loss", float("inf")))
            self.train_time_s = float(payload["train_time_s"])
            self.initial_state_dims = [int(n) for n in payload["initial_state_dims"]]
            if self.reducer and payload.get("reducer"):
                self.reducer.load_state_dict(payload["reducer"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"checkpoint cannot resume training: {first}") from None

    def rebuild_optimizer(self, state: dict[str, Any] | None = None) -> None:
        """A fresh optimizer over the current parameters (after surgery), optionally loaded;
        under torch.distributed, first a fresh DDP wrapper around the new shapes."""
        self._wrap()
        self.optimizer = self._optimizer()
        if state is not None:
            self.optimizer.load_state_dict(state)

    def _wrap(self) -> None:
        """Point the training step at the current model: itself, or under torch.distributed
        a new DDP wrapper, once the ranks proved they hold the same widths (its
        construction broadcasts rank 0's weights)."""
        self._configure(self.model)
        self.model.padded_inputs = "padding" in self.dataset.info  # see SSMModel.forward
        self._trained: torch.nn.Module = self.model
        if self.ranks is not None:
            distributed.check_widths(self.model.state_dims, self.ranks)
            self.model.sync_batch_stats = True
            self._trained = distributed.wrap(self.model, self.ranks)

    def _configure(self, model: SSMModel) -> SSMModel:
        """``model``, its Mamba-2 layers set to scan as ``config.mamba2_scan`` says."""
        for layer in model.modules():
            if isinstance(layer, Mamba2Layer):
                layer.scan = self.config.mamba2_scan
        return model

    def _optimizer(self) -> torch.optim.AdamW:
        cfg = self.config
        return build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.ssm_lr_factor,
                               fused=self.device.type == "cuda")

    # -- the loop ----------------------------------------------------------------------------
    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.dataset.x_train)
        per_epoch = max(1, n // self.config.batch_size)
        epoch, index = divmod(step, per_epoch)
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen)
        idx = order[index * self.config.batch_size:(index + 1) * self.config.batch_size]
        if self.ranks is not None:  # this rank's share of the global batch
            idx = idx[distributed.shard(len(idx), self.ranks)]
        return (self.dataset.x_train[idx].to(self.device, non_blocking=True),
                self.dataset.y_train[idx].to(self.device, non_blocking=True))

    def validate(self) -> dict[str, float]:
        return self.validate_samples()[0]

    def validate_samples(self) -> tuple[dict[str, float], dict[str, Any]]:
        """The validation record and its per-sample values (see :func:`evaluate`)."""
        d = self.dataset
        rows, gather = slice(None), None
        if self.ranks is not None:  # each rank its shard; the whole split's numbers on all
            ranks, n = self.ranks, len(d.x_val)
            rows = distributed.shard(n, ranks)

            def gather(values: torch.Tensor) -> torch.Tensor:
                return distributed.gather_rows(values, n, ranks)

        with self.phase("validate"):
            return evaluate(self.model, d.x_val[rows], d.y_val[rows], d.task,
                            self.config.eval_batch_size, self.config.precision,
                            d.info.get("bits_name"), per_sample=True, gather=gather)

    def fit(self) -> dict[str, Any]:
        """Train to ``config.steps``; return the summary also written to ``summary.json``."""
        cfg = self.config
        # a fresh run starts a new log; a resumed one continues it
        metrics_file = (open(self.out_dir / "metrics.jsonl", "a" if self.step else "w")
                        if self.main else open(os.devnull, "w"))
        self.model.train()
        if self.ranks is not None and not self.ranks.main:  # its own dropout masks
            torch.manual_seed(cfg.seed * 1_000_003 + 7919 * self.ranks.rank + self.step)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train ({self.device.type})",
                   disable=not (self.progress and self.main), dynamic_ncols=True)
        try:
            if self.reducer is not None and self.step == 0:
                self.reducer.begin(self)  # the validation before training: readiness's band
            with matmul_precision(cfg.precision):
                self._loop(metrics_file, bar, [])
            return self.summarize() if self.main else {}
        except dist.DistError as exc:
            raise self._lost(exc) from None
        except RuntimeError as exc:  # gloo reports a closed connection as a RuntimeError
            if self.ranks is None or "gloo" not in str(exc).lower():
                raise
            raise self._lost(exc) from None
        finally:
            bar.close()
            metrics_file.close()
            if self._lock is not None:
                self._lock.release()

    def _lost(self, exc: Exception) -> RankLostError:
        """A collective failed: another rank died or stopped answering."""
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # gloo: "[.../pair.cc:537] Read error [127.0.0.1]:34180: Connection reset by peer. ..."
        first = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0][:160]
        last = self.out_dir / "last.pt"
        kept = (f"{last} is kept: rerun with --resume (at any number of ranks)"
                if self.main and last.exists() else "rerun with --resume from rank 0's last.pt")
        return RankLostError(f"rank {self.ranks.rank} lost the other ranks at step "
                             f"{self.step + 1} ({first}); {kept}")

    def _loop(self, metrics_file: Any, bar: Any, losses: list[float]) -> None:
        cfg = self.config
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            set_lr(self.optimizer, lr_factor(self.step, cfg.steps, cfg.warmup_frac,
                                             cfg.min_lr_frac))
            x, y = self._batch(self.step)
            loss = self._step(self._trained, self.optimizer, x, y)
            if self.ranks is not None:  # the global batch's loss, the same verdict everywhere
                loss = distributed.mean(loss, self.ranks)
            # .item() waits for the device: the step's time is its compute, not its launch
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                kept = ("last.pt, from before it, is kept" if (self.out_dir / "last.pt").exists()
                        else "no checkpoint was written yet")
                raise DivergedError(
                    f"training diverged at step {self.step + 1}: the loss is {losses[-1]} "
                    f"(lr={cfg.lr:g}, weight_decay={cfg.weight_decay:g}); lower the learning "
                    f"rate ({kept})")
            self.train_time_s += time.perf_counter() - t0
            self.step += 1
            bar.update(1)
            record = None
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                with self.phase("eval"):
                    record = self._evaluate_and_save(losses)
                losses = []
                bar.set_postfix(val=f"{score(record['val']):.4f}",
                                dims=",".join(map(str, self.model.state_dims)))
                if self.on_eval is not None:
                    self.on_eval(record)
            elif self.reducer is not None and self.reducer.due(self.step, cfg.steps):
                record = self._reduce_between_evaluations()
            if record is not None:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()

    def _evaluate_and_save(self, losses: list[float]) -> dict[str, Any]:
        # the reducer's safety net and readiness read the per-sample values
        val, samples = self.validate_samples() if self.reducer is not None else (
            self.validate(), None)
        record: dict[str, Any] = {
            "step": self.step, "train_loss": sum(losses) / max(1, len(losses)), "val": val,
            "lr": self.optimizer.param_groups[1]["lr"], "state_dims": self.model.state_dims,
            "train_time_s": round(self.train_time_s, 3),
        }
        if self.reducer is not None and self.reducer.active(self.step, self.config.steps):
            t0 = time.perf_counter()
            record["reduction"], val = self.reducer.attempt(self, val, samples)
            self.train_time_s += time.perf_counter() - t0  # reduction is part of training cost
            record["val"], record["state_dims"] = val, self.model.state_dims
            self._note_readiness(record)
        elif self.reducer is not None and not self.reducer.closed:
            cut = self.reducer.close_window(self)
            if cut is not None:
                record["budget_cut"] = cut
                val = self.validate()
                record["val"], record["state_dims"] = val, self.model.state_dims
        if self.config.log_spectrum and self.main:
            weighting = "none" if self.reducer is None else self.reducer.config.policy.weighting
            record["spectrum"] = spectrum_record(self.model, self.dataset.x_train[:CALIBRATION],
                                                 weighting)
        # ties (common on a small validation split: a handful of samples gives few distinct
        # accuracies) go to the lower validation loss, not to the first maximum
        if (score(val), -val["loss"]) > (self.best_score, -self.best_loss):
            self.best_score, self.best_loss = score(val), val["loss"]
            self.save("best.pt")
        self.save("last.pt")
        return record

    def _reduce_between_evaluations(self) -> dict[str, Any]:
        """An extra attempt (``ReduceConfig.every``) between evaluations: it validates only if
        it cuts, and saves nothing (a resumed run replays these steps and cuts identically)."""
        t0 = time.perf_counter()
        reduction, val = self.reducer.attempt(self, None)
        self.train_time_s += time.perf_counter() - t0  # reduction is part of training cost
        record = {"step": self.step, "state_dims": self.model.state_dims,
                  "train_time_s": round(self.train_time_s, 3), "reduction": reduction}
        if val is not None:
            record["val"] = val
        self._note_readiness(record)
        return record

    def _note_readiness(self, record: dict[str, Any]) -> None:
        """Mark the record of the attempt at which the model became ready to cut."""
        ready = self.reducer.ready
        if ready is not None and ready["step"] == self.step:
            record["ready"] = {**ready, "baseline": self.reducer.summary()["baseline"]}

    def summarize(self) -> dict[str, Any]:
        d = self.dataset
        cfg = self.config
        test_last = evaluate(self.model, d.x_test, d.y_test, d.task, cfg.eval_batch_size,
                             cfg.precision, d.info.get("bits_name"))
        best = self._configure(model_from_checkpoint(self.out_dir / "best.pt",
                                                     device=self.device))
        test_best = evaluate(best, d.x_test, d.y_test, d.task, cfg.eval_batch_size,
                             cfg.precision, d.info.get("bits_name"))
        summary = {
            "dataset": d.name, "task": d.task, "steps": self.step,
            "initial_state_dims": self.initial_state_dims,
            "final_state_dims": self.model.state_dims,
            "best_state_dims": best.state_dims,
            "val_best": self.best_score, "test_last": test_last, "test_best": test_best,
            "train_time_s": round(self.train_time_s, 3),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device), "precision": cfg.precision,
        }
        if self.reducer is not None:
            summary["reduction"] = self.reducer.summary()
        atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary
