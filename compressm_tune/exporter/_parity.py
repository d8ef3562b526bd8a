"""Parity of the exported graphs against eager torch, run at export time on the written files.

Every check feeds the same seeded input to eager torch in eval mode (the reference) and to one
exported engine, and records the largest absolute difference of the outputs. Inputs are real
sequences when the checkpoint's dataset can be rebuilt (:func:`data_inputs`: test-split
sequences laid end to end, so lengths beyond the training length stay in distribution), else
N(0, 1) in normalized space. This matters for selective layers: a block's output grows up to
the 4th power of its input (``delta``, ``B_t``, ``C_t`` and ``u`` each scale with it), so
off-distribution inputs (Gaussian noise fed to a model trained on one-hot tokens) can drive
torch's own outputs to 1e15, where float32 rounding alone exceeds any absolute bar.

Streaming checks run the step graph token by token from zero state and compare with the
*sequence* output of torch: the last ``y_t`` with mean pooling (the mean of all features seen
so far), every ``y_t`` without pooling.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from compressm_tune.errors import ExportError
from compressm_tune.models import SSMModel

__all__ = ["ParityCheck", "data_inputs", "default_lengths", "gaussian_inputs", "run_parity",
           "stream_onnx", "stream_torchscript", "token_inputs"]

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


def stream_onnx(session, x: np.ndarray, state: list[np.ndarray]) -> np.ndarray:
    """Run an ONNX step graph over ``x (batch, L, d_input)``; returns ``(batch, L, d_out)``."""
    names = [i.name for i in session.get_inputs()]
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
                    got = onnx_sequence.run(None, {"x": x.numpy()})[0]
                    checks.append(_check("onnxruntime", "sequence", length, got, want))
                if torchscript is not None:
                    checks.append(_check("torchscript", "sequence", length, torchscript(x), want))
                if length == longest and batch != biggest:
                    continue
                if onnx_step is not None:
                    state = [s.numpy() for s in model.allocate_state(batch)]
                    got = stream_onnx(onnx_step, x.numpy(), state)
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
