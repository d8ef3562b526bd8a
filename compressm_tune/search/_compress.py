"""Compress a pretrained model folder after training (``compressm-tune compress``).

A local Hugging Face-style Mamba folder is read (:func:`from_hf_folder`), every layer is scored
on calibration text and cut to its width (:func:`compress_pretrained`): the same for every
layer (``keep``), by the ``tau`` rule, or the widths of the smallest ``tau`` whose predicted
latency on this machine fits a budget (``budget_ms``, or ``budget`` relative to the full
model; the hardware profile's :class:`LatencyModel`). An optional short fine-tune with the
training loop follows, distilled from the uncut model (``distill``: the loss mixes the
next-token cross-entropy with the KL divergence to the uncut model's next-token distribution),
during which the in-training schedule may cut further (``finetune_reduce``). The result is
written as a Hugging Face-style folder (:func:`save_hf_folder`) with ``compress_summary.json``:
the widths and the held-out bits per token (per character on character data) before the cut,
after it, and after the fine-tune.

Data (``data``): ``pystdlib-chars`` (the built-in character LM text; the model's vocabulary must
hold its ids) or a ``.npy`` / ``.npz`` file of integer token ids ``(n, L + 1)`` (``.npz``: key
``input_ids``), split by a seeded shuffle into 80% train (calibration and fine-tune), 10%
validation and 10% held-out test.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressm_tune.data import Dataset, load_dataset
from compressm_tune.errors import ConfigError, DataError
from compressm_tune.hardware import latency_model_for
from compressm_tune.models import (
    SSMModel,
    check_hf_output,
    check_mamba2_scan,
    from_hf_folder,
    save_hf_folder,
)
from compressm_tune.reduction import (
    SCORES,
    ReduceConfig,
    Reducer,
    ReductionPolicy,
    compress_pretrained,
    layer_scores,
    widths_for_budget,
)
from compressm_tune.search._config import parse_relative_budget
from compressm_tune.training import (
    MAMBA2_SCAN_SETTING,
    TrainConfig,
    Trainer,
    evaluate,
    model_from_checkpoint,
)

__all__ = ["BUILTIN_TEXT", "DISTILL", "SUMMARY", "CompressConfig", "compress_folder",
           "finetune_compressed", "load_token_data"]

BUILTIN_TEXT = ("pystdlib-chars",)
SUMMARY = "compress_summary.json"
DISTILL = 0.5  # the fine-tune's share of KL to the uncut model (``--distill``)
# what a user's folder may hold besides the weights: copied so the output is used the same way
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "generation_config.json")


@dataclass
class CompressConfig:
    """Settings of one post-training compression (``compressm-tune compress``)."""

    model: str = field(default="", metadata={"cli": False})  # the folder, a positional argument
    data: str = field(default="pystdlib-chars", metadata={
        "help": "calibration and evaluation text: pystdlib-chars (built in) or a .npy/.npz file "
                "of token ids (n, L+1)"})
    keep: int | None = field(default=None, metadata={
        "help": "keep this many states in every layer"})
    tau: float | None = field(default=None, metadata={
        "help": "per layer, keep the fewest states holding 1 - TAU of the importance sum"})
    budget_ms: float | None = field(default=None, metadata={
        "help": "latency budget in ms (onnxruntime, batch 1, one sequence of the data's "
                "length) as this machine's profile predicts it"})
    budget: str | None = field(default=None, metadata={
        "help": "latency budget relative to the full model, e.g. 0.3x"})
    score: str = field(default="data", metadata={
        "choices": SCORES,
        "help": "state scores: data (input-weighted importance on the calibration text) or "
                "magnitude (data-free, a baseline)"})
    calibration: int = field(default=64, metadata={
        "help": "calibration sequences the states are scored on"})
    eval_sequences: int = field(default=500, metadata={
        "help": "held-out sequences bits per token are measured on"})
    finetune_steps: int = field(default=0, metadata={
        "help": "optimizer steps of fine-tuning after the cut (0: none)"})
    finetune_reduce: str | None = field(default=None, metadata={
        "help": "in-training reduction policy during the fine-tune, e.g. tau=0.02 (default: "
                "no further cuts)"})
    distill: float = field(default=DISTILL, metadata={
        "help": "fine-tune loss: this share is the KL divergence to the uncut model's "
                "next-token distribution (distillation, temperature 1), the rest the "
                "next-token cross-entropy (0: cross-entropy only)"})
    lr: float = field(default=1e-3, metadata={"help": "fine-tune peak learning rate"})
    batch_size: int = field(default=16, metadata={"help": "fine-tune sequences per step"})
    mamba2_scan: str = field(default="ssd", metadata=MAMBA2_SCAN_SETTING)  # in the fine-tune
    seed: int = field(default=0, metadata={"help": "seed of the data split and fine-tune"})
    profile: str | None = field(default=None, metadata={
        "help": "profile JSON for the budgets (default: this machine's, cached or measured)"})
    threads: int | None = field(default=None, metadata={
        "help": "torch threads (default: torch's)"})
    out: str = field(default="", metadata={"cli": False})  # the output folder

    def __post_init__(self) -> None:
        rules = [self.keep, self.tau, self.budget_ms, self.budget]
        if sum(v is not None for v in rules) != 1:
            raise ConfigError("give exactly one of --keep, --tau, --budget-ms, --budget")
        if self.keep is not None and self.keep < 1:
            raise ConfigError(f"--keep must be >= 1, got {self.keep}")
        if self.tau is not None and not 0 <= self.tau < 1:
            raise ConfigError(f"--tau must satisfy 0 <= TAU < 1, got {self.tau}")
        if self.budget_ms is not None and not 0 < self.budget_ms < math.inf:
            raise ConfigError(f"--budget-ms must be > 0 and finite, got {self.budget_ms}")
        if self.budget is not None:
            self.budget = f"{parse_relative_budget(self.budget):g}x"
        if self.score not in SCORES:
            raise ConfigError(f"--score must be one of {SCORES}, got {self.score!r}")
        check_mamba2_scan(self.mamba2_scan, "--mamba2-scan")
        for name in ("calibration", "eval_sequences", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got "
                                  f"{getattr(self, name)}")
        if self.finetune_steps < 0:
            raise ConfigError(f"--finetune-steps must be >= 0, got {self.finetune_steps}")
        if not 0 <= self.distill <= 1:
            raise ConfigError(f"--distill must be in [0, 1], got {self.distill}")
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.finetune_reduce is not None:
            if self.finetune_steps < 2:
                raise ConfigError("--finetune-reduce needs --finetune-steps >= 2")
            ReductionPolicy.parse(self.finetune_reduce)
        if not self.out:
            raise ConfigError("--out is required: the folder the compressed model goes to")


def _token_dataset(ids: np.ndarray, name: str, info: dict, seed: int) -> Dataset:
    """Token ids ``(n, L + 1)`` -> a next-token :class:`Dataset` (inputs are the ids)."""
    if ids.ndim != 2 or ids.shape[1] < 2 or ids.shape[0] < 10:
        raise DataError(f"{name}: token ids must be an (n >= 10, L + 1 >= 2) integer array, got "
                        f"shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0:
        raise DataError(f"{name}: token ids must be non-negative integers, got {ids.dtype}")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test = n_val = max(1, len(ids) // 10)
    parts = np.split(ids[order].astype(np.int64), [len(ids) - n_val - n_test, len(ids) - n_test])
    tensors = [(torch.from_numpy(p[:, :-1].copy()), torch.from_numpy(p[:, 1:].copy()))
               for p in parts]
    return Dataset(name=name, task="classification", x_train=tensors[0][0],
                   y_train=tensors[0][1], x_val=tensors[1][0], y_val=tensors[1][1],
                   x_test=tensors[2][0], y_test=tensors[2][1], d_input=1,
                   d_output=int(ids.max()) + 1, seq_len=ids.shape[1] - 1, norm_mean=[0.0],
                   norm_std=[1.0], info=info)


def _read_ids(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"--data {path}: no such file (give pystdlib-chars or a .npy/.npz file "
                        "of token ids)")
    if path.suffix not in (".npy", ".npz"):
        raise DataError(f"--data {path}: token files are .npy or .npz")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as npz:
            ids = npz["input_ids"] if "input_ids" in npz.files else None
            keys = npz.files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read token ids from {path}: {exc}") from None
    if ids is None:
        raise DataError(f"{path} has no 'input_ids' array (keys: {keys})")
    return ids


def load_token_data(data: str, vocab_size: int, seed: int) -> Dataset:
    """The token dataset ``data`` names (see the module docstring), checked against the
    model's vocabulary."""
    if data in BUILTIN_TEXT:
        chars = load_dataset(data)
        split = [chars.x_train.argmax(-1), chars.x_val.argmax(-1), chars.x_test.argmax(-1)]
        ds = Dataset(name=data, task="classification", x_train=split[0], y_train=chars.y_train,
                     x_val=split[1], y_val=chars.y_val, x_test=split[2], y_test=chars.y_test,
                     d_input=1, d_output=chars.d_output, seq_len=chars.seq_len, norm_mean=[0.0],
                     norm_std=[1.0], info=chars.info)
    else:
        path = Path(data)
        ds = _token_dataset(_read_ids(path), path.name, {"path": str(path.resolve()),
                                                         "bits_name": "bits_per_token"}, seed)
    if ds.d_output > vocab_size:
        raise DataError(f"--data {data} holds token ids up to {ds.d_output - 1}; the model's "
                        f"vocabulary has {vocab_size}")
    return ds


def _bits(model: SSMModel, data: Dataset, n: int) -> float:
    record = evaluate(model, data.x_test[:n], data.y_test[:n], "classification", 100,
                      bits_name="bits")
    return record["bits"]


def _widths_for_budget(config: CompressConfig, model: SSMModel, data: Dataset
                       ) -> tuple[list[int], dict[str, Any]]:
    c = model.config
    latency, _, notes = latency_model_for(
        arch=c.arch, hidden=c.d_model, blocks=c.n_blocks, seq_len=data.seq_len,
        d_input=c.vocab_size, d_output=c.d_output, widths=c.state_dims, threads=1,
        profile=config.profile)
    full = latency.predict(c.state_dims)
    budget = (config.budget_ms if config.budget_ms is not None
              else parse_relative_budget(config.budget) * full)
    scores = layer_scores(model, data.x_train[:config.calibration], config.score)
    widths, tau = widths_for_budget(scores, latency.predict, budget)
    return widths, {"budget_ms": budget, "predicted_full_ms": full, "tau": tau,
                    "predicted_ms": latency.predict(widths), "notes": notes}


def finetune_compressed(model: SSMModel, data: Dataset, steps: int, *,
                        teacher: SSMModel | None = None, distill: float = DISTILL,
                        lr: float = 1e-3, batch_size: int = 16, seed: int = 0,
                        threads: int | None = None, reduce: str | None = None,
                        calibration: int = 64, mamba2_scan: str = "ssd",
                        progress: bool = False) -> SSMModel:
    """The fine-tune after a post-training cut (``compress --finetune-steps``): ``steps`` of
    the training loop on ``data``'s training split (warm-up, cosine decay from ``lr``), the
    loss ``(1 - distill)`` x cross-entropy + ``distill`` x KL to ``teacher``'s next-token
    distribution (the uncut model; cross-entropy alone without one), optionally cutting
    further by the in-training ``reduce`` policy (e.g. ``"tau=0.02"``) in the first half,
    Mamba-2 layers scanning as ``mamba2_scan`` says (``TrainConfig.mamba2_scan``). Returns
    the checkpoint with the best validation score, in eval mode."""
    reducer = None
    if reduce:
        reducer = Reducer(ReduceConfig(policy=ReductionPolicy.parse(reduce), schedule="window",
                                       window=0.5, every=max(1, steps // 10),
                                       calibration=calibration))
    train = TrainConfig(steps=steps, batch_size=batch_size, lr=lr,
                        eval_every=max(1, steps // 4), seed=seed, threads=threads,
                        eval_batch_size=100, mamba2_scan=mamba2_scan)
    kw = {"teacher": teacher, "distill_weight": distill} if teacher is not None else {}
    run_dir = Path(tempfile.mkdtemp(prefix="compressm-finetune-"))
    try:
        Trainer(model.config, train, data, run_dir, reducer=reducer, model=model,
                progress=progress, **kw).fit()
        return model_from_checkpoint(run_dir / "best.pt").eval()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def compress_folder(config: CompressConfig, progress: bool = False) -> dict[str, Any]:
    """Run one compression (see the module docstring); returns the summary also written to
    ``OUT/compress_summary.json``.

    Raises
    ------
    ConfigError
        Not a model folder, not a supported model, settings that cannot run.
    DataError
        ``data`` missing, unreadable or outside the model's vocabulary.
    ReductionError
        A width out of range, or a budget not even one state per layer meets.
    """
    t0 = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    source = Path(config.model)
    model = from_hf_folder(source)
    if config.keep is not None and config.keep > max(model.state_dims):
        raise ConfigError(f"--keep {config.keep} is above the widest layer "
                          f"({max(model.state_dims)} states): nothing would be cut")
    copied = [name for name in _TOKENIZER_FILES if (source / name).is_file()]
    check_hf_output(config.out, [SUMMARY, *copied])  # before the work, not after it
    data = load_token_data(config.data, model.config.vocab_size, config.seed)
    torch.manual_seed(config.seed)
    bits_name = data.info.get("bits_name", "bits")
    n_eval = config.eval_sequences
    before_dims, before_bits = model.state_dims, _bits(model, data, n_eval)
    calibration = data.x_train[:config.calibration]
    teacher = copy.deepcopy(model) if config.finetune_steps and config.distill else None
    budget = None
    if config.budget_ms is not None or config.budget is not None:
        widths, budget = _widths_for_budget(config, model, data)
        result = compress_pretrained(model, calibration, widths=widths, score=config.score)
    else:
        result = compress_pretrained(model, calibration, keep=config.keep, tau=config.tau,
                                     score=config.score)
    cut_dims, cut_bits = model.state_dims, _bits(model, data, n_eval)
    summary: dict[str, Any] = {
        "source": str(source.resolve()), "data": data.name, "metric": bits_name,
        "settings": {k: v for k, v in asdict(config).items() if k not in ("model", "out")},
        "before": {"state_dims": before_dims, bits_name: before_bits},
        "after_cut": {"state_dims": cut_dims, bits_name: cut_bits},
        "kept": result["kept"], "eval_sequences": min(n_eval, len(data.x_test)),
    }
    if budget is not None:
        summary["budget"] = budget
    if config.finetune_steps:
        model = finetune_compressed(
            model, data, config.finetune_steps, teacher=teacher, distill=config.distill,
            lr=config.lr, batch_size=config.batch_size, seed=config.seed,
            threads=config.threads, reduce=config.finetune_reduce,
            calibration=config.calibration, mamba2_scan=config.mamba2_scan, progress=progress)
        summary["after_finetune"] = {"state_dims": model.state_dims,
                                     bits_name: _bits(model, data, n_eval),
                                     "steps": config.finetune_steps}
    summary["state_dims"] = model.state_dims
    summary["time_s"] = round(time.perf_counter() - t0, 2)
    extra = {SUMMARY: json.dumps(summary, indent=2) + "\n"}
    for name in copied:
        extra[name] = (source / name).read_text()
    save_hf_folder(model, config.out, extra_files=extra)
    return summary
