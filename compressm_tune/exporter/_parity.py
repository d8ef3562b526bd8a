"""Checks of the exported engines at export time: parity with eager torch, the timing that
chooses the sequence graph, and the int8 variants' accuracy on the rebuilt dataset.

Parity feeds the same seeded input to eager torch in eval mode and to one engine and records the
largest absolute difference. Inputs are real sequences when the checkpoint's dataset can be
rebuilt (:func:`data_inputs`, test sequences laid end to end), else N(0, 1): a selective block's
output grows up to the 4th power of its input, so off-distribution inputs can drive torch's own
outputs to 1e15, where float32 rounding alone exceeds any bar. Streaming checks run the step
graph from zero state and compare with torch's sequence output (the last ``y_t`` with mean
pooling, every ``y_t`` without).

Which sequence graph is fastest (per-token ``Scan`` or chunk length T) depends on widths,
length and machine, so :func:`choose_chunk` times each candidate in onnxruntime; the profiler
calls the same function, so profiles time the graphs bundles hold.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from compressm_tune.errors import CompressmError, ExportError
from compressm_tune.exporter._onnx import DEFAULT_OPSET, build_sequence_model
from compressm_tune.exporter._weights import (
    CHUNK_ARCHS,
    CHUNK_CHOICES,
    ModelWeights,
    check_chunk,
    chunk_label,
    max_chunk,
)
from compressm_tune.models import SSMModel

__all__ = ["ParityCheck", "candidates", "choose_chunk", "data_inputs", "default_lengths",
           "evaluate_test_split", "feed", "gaussian_inputs", "ort_session", "rebuild_dataset",
           "run_parity", "sequence_graph", "stream_onnx", "stream_torchscript", "token_inputs",
           "zero_states"]

# (batch, length, generator) -> normalized input (batch, length, d_input), or token ids
Inputs = Callable[[int, int, torch.Generator], torch.Tensor]

_LONG_MIN = 2000  # the long check runs at least this many steps...
_LONG_FACTOR = 4  # ...and at least this many training lengths


@dataclass(frozen=True)
class ParityCheck:
    """One comparison: ``engine`` in ``mode`` at ``(batch, length)`` against eager torch."""

    engine: str  # "onnxruntime" or "torchscript"
    mode: str  # "sequence" or "step" (token by token)
    batch: int
    length: int
    max_abs_error: float
    reference_max_abs: float  # largest |output| of torch on this input: the error's scale


def default_lengths(seq_len: int) -> tuple[int, ...]:
    """Length 1, the training length, and one much longer (``max(2000, 4 * seq_len)``).

    Examples
    --------
    >>> default_lengths(40)
    (1, 40, 2000)
    """
    return tuple(sorted({1, seq_len, max(_LONG_MIN, _LONG_FACTOR * seq_len)}))


def gaussian_inputs(d_input: int) -> Inputs:
    """N(0, 1) inputs ``(batch, length, d_input)`` in normalized space."""
    return lambda batch, length, gen: torch.randn(batch, length, d_input, generator=gen)


def token_inputs(vocab_size: int) -> Inputs:
    """Uniformly drawn token ids ``(batch, length)`` int64, for models with an embedding."""
    return lambda batch, length, gen: torch.randint(vocab_size, (batch, length), generator=gen)


def data_inputs(x: torch.Tensor) -> Inputs:
    """Inputs made of real sequences ``x (n, L_data, d_input)`` (normalized) or token ids
    ``x (n, L_data)`` (int): each row lays randomly drawn sequences end to end and is cut to
    the requested length; ids keep their ``(batch, length)`` shape and dtype.

    Examples
    --------
    >>> x = torch.arange(6.0).reshape(2, 3, 1)  # two sequences of length 3
    >>> data_inputs(x)(4, 7, torch.Generator().manual_seed(0)).shape
    torch.Size([4, 7, 1])
    >>> data_inputs(torch.arange(6).reshape(2, 3))(4, 7, torch.Generator()).shape
    torch.Size([4, 7])
    """
    n, seq_len = x.shape[:2]

    def draw(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
        per_row = -(-length // seq_len)  # sequences per row, rounded up
        idx = torch.randint(n, (batch * per_row,), generator=gen)
        rows = x[idx].reshape(batch, per_row * seq_len, *x.shape[2:])  # (B, per_row * L, [d])
        return rows[:, :length].contiguous()

    return draw


def feed(session, x: np.ndarray) -> dict[str, np.ndarray]:
    """``x`` as the feed of a graph's first (only, for a sequence graph) input, whatever its
    name (``x``, ``input_ids``): bundles of every version name it in their graph."""
    return {session.get_inputs()[0].name: x}


def zero_states(session, batch: int) -> list[np.ndarray]:
    """Zero states for a step graph, shaped as its state inputs (every input after the
    first) say, ``batch`` for the symbolic batch axis."""
    return [np.zeros([batch if isinstance(d, str) else d for d in i.shape], np.float32)
            for i in session.get_inputs()[1:]]


def stream_onnx(session, x: np.ndarray, state: list[np.ndarray] | None = None) -> np.ndarray:
    """Run an ONNX step graph over ``x (batch, L, d_input)`` from ``state`` (default zeros);
    returns ``(batch, L, d_out)``."""
    names = [i.name for i in session.get_inputs()]
    state = zero_states(session, x.shape[0]) if state is None else state
    ys = []
    for t in range(x.shape[1]):
        out = session.run(None, dict(zip(names, [x[:, t], *state], strict=True)))
        ys.append(out[0])
        state = out[1:]
    return np.stack(ys, axis=1)


def stream_torchscript(module, x: torch.Tensor) -> torch.Tensor:
    """Run a scripted module's ``step`` over ``x (batch, L, d_input)`` -> ``(batch, L, d_out)``."""
    state = module.allocate_state(x.shape[0])
    ys = []
    for t in range(x.shape[1]):
        y, state = module.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1)


def _check(engine: str, mode: str, length: int, got, want: torch.Tensor) -> ParityCheck:
    got = torch.as_tensor(np.asarray(got))
    if tuple(got.shape) != tuple(want.shape):
        raise ExportError(f"exported output has shape {tuple(got.shape)}, torch's "
                          f"{tuple(want.shape)}")
    return ParityCheck(engine, mode, int(want.shape[0]), length,
                       float((got.double() - want.double()).abs().max()),
                       float(want.abs().max()))


def run_parity(model: SSMModel, *, onnx_sequence=None, onnx_step=None, torchscript=None,
               lengths: tuple[int, ...], batches: tuple[int, ...] = (1, 3),
               tolerance: float = 1e-4, seed: int = 0, inputs: Inputs | None = None,
               inputs_doc: str | None = None) -> dict:
    """Compare every given engine with ``model`` (eval mode) and fail loudly past ``tolerance``.

    Sequence checks run at every (batch, length); streaming checks at every length for the
    largest batch and at the lengths below the longest for the other batches (a long
    token-by-token run costs one runtime call per token).

    Parameters
    ----------
    model : SSMModel
        The reference, put in eval mode.
    onnx_sequence, onnx_step : onnxruntime.InferenceSession, optional
    torchscript : torch.jit.ScriptModule, optional
        The loaded exported files; engines left ``None`` are not checked.
    lengths, batches : tuple of int
    tolerance : float
        Largest allowed absolute error (float32 outputs).
    seed : int
        Seeds the inputs.
    inputs : callable, optional
        ``inputs(batch, length, generator)`` -> normalized ``(batch, length, d_input)``;
        default :func:`gaussian_inputs` (token models: :func:`token_inputs`, and
        ``inputs_doc`` should say so). ``inputs_doc`` says in the report what they are.

    Returns
    -------
    dict
        ``tolerance``, ``reference``, ``inputs``, ``max_abs_error`` (worst check), ``worst``,
        ``checks`` (list of :class:`ParityCheck` as dicts), ``time_s``.

    Raises
    ------
    ExportError
        A check exceeds ``tolerance`` (the message names the worst one and torch's output
        scale on its input).
    """
    model.eval()
    mean_pool = model.config.pooling == "mean"
    vocab = model.config.vocab_size
    inputs = inputs or (gaussian_inputs(model.config.d_input) if vocab is None
                        else token_inputs(vocab))
    inputs_doc = inputs_doc or ("N(0, 1) in normalized space" if vocab is None
                                else f"token ids uniform in [0, {vocab})")
    gen = torch.Generator().manual_seed(seed)
    longest, biggest = max(lengths), max(batches)
    checks: list[ParityCheck] = []
    start = time.perf_counter()
    for batch in batches:
        for length in lengths:
            x = inputs(batch, length, gen)  # (B, L, d_input)
            with torch.no_grad():
                want = model(x)  # (B, d_out) or (B, L, d_out)
                if onnx_sequence is not None:
                    got = onnx_sequence.run(None, feed(onnx_sequence, x.numpy()))[0]
                    checks.append(_check("onnxruntime", "sequence", length, got, want))
                if torchscript is not None:
                    checks.append(_check("torchscript", "sequence", length, torchscript(x), want))
                if length == longest and batch != biggest:
                    continue
                if onnx_step is not None:
                    got = stream_onnx(onnx_step, x.numpy())  # from zero states
                    got = got[:, -1] if mean_pool else got
                    checks.append(_check("onnxruntime", "step", length, got, want))
                if torchscript is not None:
                    got = stream_torchscript(torchscript, x)
                    got = got[:, -1] if mean_pool else got
                    checks.append(_check("torchscript", "step", length, got, want))
    if not checks:
        raise ExportError("parity: no exported engine to check")
    worst = max(checks, key=lambda c: c.max_abs_error)
    report = {
        "tolerance": tolerance,
        "reference": f"torch eager, eval mode, float32; seed {seed}",
        "inputs": inputs_doc,
        "max_abs_error": worst.max_abs_error,
        "worst": asdict(worst),
        "lengths": list(lengths), "batches": list(batches),
        "checks": [asdict(c) for c in checks],
        "time_s": round(time.perf_counter() - start, 3),
    }
    if not worst.max_abs_error <= tolerance:  # also catches NaN
        raise ExportError(
            f"parity check failed: {worst.engine} {worst.mode} at batch={worst.batch} "
            f"length={worst.length} differs from torch by {worst.max_abs_error:.3g} "
            f"(tolerance {tolerance:g}; torch's outputs reach {worst.reference_max_abs:.3g} on "
            f"these inputs, {inputs_doc}); the bundle was not written")
    return report


def ort_session(model_bytes: bytes, threads: int):
    """An onnxruntime CPU session with the edge runner's settings (fixed intra-op threads,
    inter-op 1, sequential)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def candidates(w: ModelWeights, seq_len: int) -> list[int | None]:
    """``None`` (the per-token Scan) and every chunk length worth timing for ``w``.

    Chunks longer than the sequence only pad (so none; the sequence's own length instead),
    and none beyond the size cap of any block (:func:`max_chunk`).

    Examples
    --------
    >>> from compressm_tune.models import SSMConfig, SSMModel
    >>> from compressm_tune.exporter._weights import extract_weights
    >>> w = extract_weights(SSMModel(SSMConfig(d_model=4, state_dims=[16, 8])))
    >>> candidates(w, 40), candidates(w, 12)
    ([None, 8, 16, 32, 40], [None, 8, 12])
    """
    if w.arch not in CHUNK_ARCHS:
        return [None]
    top = min(max_chunk(getattr(block, "ssm", block)) for block in w.blocks)  # Mamba-2: itself
    chunks = {t for t in CHUNK_CHOICES if t < seq_len and t <= top}
    if seq_len <= top:
        chunks.add(seq_len)  # one chunk, no padding, no carry
    return [None, *sorted(chunks)]


def choose_chunk(w: ModelWeights, seq_len: int, threads: int = 1, opset: int = DEFAULT_OPSET,
                 *, rounds: int = 3, calls: int = 15, round_s: float = 0.05,
                 seed: int = 0) -> dict:
    """Time every :func:`candidates` graph on one ``(1, seq_len, d_input)`` input (token
    models: random ids ``(1, seq_len)``); pick the fastest.

    Candidates are timed in ``rounds`` interleaved rounds (after two warm-up calls), so a
    change in machine load hits all alike; with one thread by the calling thread's CPU time.
    A round of one candidate is ``calls`` calls or ``round_s`` seconds, whichever ends first,
    but at least two calls (slow graphs of long sequences would otherwise make an export take
    minutes). The statistic is the median over all calls.

    Returns
    -------
    dict
        ``chunk`` (None = per-token Scan, else T), ``variant`` (``"scan"`` or ``"chunked"``),
        ``median_ms`` per candidate label, ``seq_len``, ``threads`` and ``method``.
    """
    rng = np.random.default_rng(seed)
    x = (rng.integers(w.encoder.shape[0], size=(1, seq_len)) if w.tokens  # ids into the table
         else rng.standard_normal((1, seq_len, w.d_input)).astype(np.float32))
    # With one intra-op thread onnxruntime computes on the calling thread, so its CPU time is
    # the call's cost without the time other processes held the core (a shared machine's
    # load moved wall-clock choices by up to 2x); with more threads, wall time.
    clock = time.thread_time if threads == 1 else time.perf_counter
    options = candidates(w, seq_len)
    sessions = {}
    for chunk in options:
        sessions[chunk] = ort_session(build_sequence_model(w, opset, chunk).SerializeToString(),
                                      threads)
        for _ in range(2):
            sessions[chunk].run(None, feed(sessions[chunk], x))
    samples: dict[int | None, list[float]] = {c: [] for c in options}
    for _ in range(rounds):
        for chunk, session in sessions.items():
            spent = 0.0
            for i in range(calls):
                if i >= 2 and spent >= round_s:
                    break
                t0, c0 = time.perf_counter(), clock()
                session.run(None, feed(session, x))
                samples[chunk].append(clock() - c0)
                spent += time.perf_counter() - t0
    median = {c: float(np.median(s)) * 1e3 for c, s in samples.items()}
    best = min(options, key=median.__getitem__) if len(options) > 1 else None
    return {"chunk": best, "variant": "scan" if best is None else "chunked",
            "median_ms": {chunk_label(c): round(m, 4) for c, m in median.items()},
            "seq_len": seq_len, "threads": threads,
            "method": f"onnxruntime CPU, batch 1, {threads} intra-op thread(s); median "
                      f"{'thread CPU' if threads == 1 else 'wall-clock'} time of {rounds} "
                      f"interleaved rounds of {calls} calls or {round_s} s (>= 2 calls) per "
                      "candidate, after 2 warm-up calls"}


def sequence_graph(weights: ModelWeights, chunk: int | str | None, seq_len: int, threads: int,
                   opset: int) -> dict:
    """The manifest's ``sequence_graph``: which graph a bundle holds and why (``chunk``:
    ``"auto"`` measures with :func:`choose_chunk`, ``"scan"``/None or T are taken as given)."""
    if chunk == "auto":
        choice = choose_chunk(weights, seq_len, threads, opset)
        return {"variant": choice["variant"], "chunk": choice["chunk"],
                "chosen_by": "measured at export", "timings": choice}
    chunk = check_chunk(None if chunk == "scan" else chunk, weights.arch)
    return {"variant": "scan" if chunk is None else "chunked", "chunk": chunk,
            "chosen_by": "given"}


def rebuild_dataset(dataset: dict | None, train_seed: int, d_input: int):
    """``(Dataset, None)``, or ``(None, reason)`` when the dataset cannot be rebuilt here.

    ``dataset`` is the checkpoint's entry; ``train_seed`` the training run's seed (it seeds the
    splits); ``d_input`` the model's input width, which the rebuilt data must have.
    """
    from compressm_tune.data import DATASETS, SelectiveCopyConfig, load_dataset

    if not dataset or "name" not in dataset:
        return None, "the checkpoint records no dataset"
    name, info = dataset["name"], dataset.get("info") or {}
    if name not in DATASETS:
        return None, f"dataset {name!r} is not one load_dataset can rebuild"
    if name == "smnist":
        return None, "smnist needs the user's IDX folder, which the checkpoint does not record"
    kwargs: dict[str, Any] = {"seed": train_seed}
    if name == "npz":
        kwargs["path"] = info.get("path")
    if name == "selective-copy" and "config" in info:
        kwargs["copy_config"] = SelectiveCopyConfig(**info["config"])
    try:
        ds = load_dataset(name, **kwargs)
    except (CompressmError, OSError) as exc:
        return None, f"cannot rebuild dataset {name!r} here: {exc}"
    if ds.d_input != d_input:
        return None, f"the rebuilt {name!r} has {ds.d_input} input channels, the model {d_input}"
    return ds, None


_EVAL_BATCH = 250


def _evaluate(session, x: np.ndarray, y: np.ndarray, task: str) -> dict[str, float]:
    out = np.concatenate([session.run(None, feed(session, x[i:i + _EVAL_BATCH]))[0]
                          for i in range(0, len(x), _EVAL_BATCH)])
    if task == "classification":
        if y.ndim == 2:  # per-token labels (n, M): scored at the last M steps of (n, L, C)
            out, y = out[:, -y.shape[1]:].reshape(-1, out.shape[-1]), y.reshape(-1)
        z = out - out.max(-1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return {"accuracy": float((out.argmax(-1) == y).mean()),
                "loss": float(-log_p[np.arange(len(y)), y].mean())}
    return {"loss": float(((out - y) ** 2).mean())}


def evaluate_test_split(ds, skipped: str | None, dataset: dict | None, float_session,
                        int8_session, x: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy (classification) or MSE (regression) of both models on the test split.

    ``ds, skipped`` come from :func:`rebuild_dataset`; with no
    dataset (none recorded, a user file that moved, ...) the result is ``{"skipped": reason}``.
    ``dataset`` is the checkpoint's entry (its normalization is compared with the rebuilt one).
    ``x``: the test inputs as the graphs take them, when not ``ds.x_test`` (a token model's ids).
    """
    if ds is None:
        return {"skipped": skipped}
    name = ds.name
    x = ds.x_test.numpy() if x is None else x
    y = ds.y_test.numpy()
    ref = _evaluate(float_session, x, y, ds.task)
    quant = _evaluate(int8_session, x, y, ds.task)
    metric = "accuracy" if ds.task == "classification" else "loss"
    result = {"dataset": name, "split": "test", "n": int(len(x)), "metric": metric,
              "float32": ref, "int8": quant, "change": quant[metric] - ref[metric]}
    want_mean, want_std = dataset.get("norm_mean"), dataset.get("norm_std")
    if want_mean is not None and not (np.allclose(ds.norm_mean, want_mean, rtol=1e-5)
                                      and np.allclose(ds.norm_std, want_std, rtol=1e-5)):
        result["note"] = ("the rebuilt dataset's normalization differs from the checkpoint's; "
                          "the metrics use the rebuilt one")
    return result
