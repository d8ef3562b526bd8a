"""Inference runtimes the profiler can time: eager torch, TorchScript and onnxruntime.

:func:`onnxruntime_functions` runs a live model's exported graphs in onnxruntime without writing
files: the graphs are built from the model's current weights and opened from bytes, with the
edge runner's session settings (fixed intra-op threads, inter-op 1, sequential execution).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from compressm_tune.errors import ExportError, ExportOptionError
from compressm_tune.models import SSMModel

__all__ = ["InferenceRunner", "RUNTIME_BUILDERS", "onnxruntime_functions", "prepare_runtime"]

Forward = Callable[[torch.Tensor], torch.Tensor]
StepFn = Callable[[torch.Tensor, list[torch.Tensor]], tuple[torch.Tensor, list[torch.Tensor]]]


@dataclass(frozen=True)
class InferenceRunner:
    """One model prepared for inference in one runtime.

    Attributes
    ----------
    runtime : str
        ``"torch"``, ``"torchscript"`` or ``"onnxruntime"``.
    forward : callable
        ``x (batch, L, d_input) -> (batch, d_output)``; batch sizes as given to
        :func:`prepare_runtime`.
    step : callable
        ``(x_t (1, d_input), state) -> (y_t, state)``, batch 1.
    """

    runtime: str
    forward: Forward
    step: StepFn


class _Step(nn.Module):
    """``model.step`` with a flat signature, so tracing sees tensors, not a list."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x_t: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, new_state = self.model.step(x_t, list(state))
        return (y, *new_state)


def _torch_runner(
    model: nn.Module, seq_inputs: list[torch.Tensor], step_inputs: tuple[torch.Tensor, list]
) -> InferenceRunner:
    return InferenceRunner("torch", model.__call__, model.step)


def _check_parity(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got - want).abs().max().item()
    if not err <= 1e-4 * (1.0 + want.abs().max().item()):
        raise ExportError(f"{name} output differs from eager torch by {err:.3g} (> 1e-4 relative)")


def _torchscript_runner(
    model: nn.Module, seq_inputs: list[torch.Tensor], step_inputs: tuple[torch.Tensor, list]
) -> InferenceRunner:
    """Trace and freeze one graph per sequence input shape and one for the step."""
    by_shape = {}
    with torch.no_grad():
        for x in seq_inputs:
            traced = torch.jit.freeze(torch.jit.trace(model, x))
            _check_parity("torchscript forward", traced(x), model(x))
            by_shape[tuple(x.shape)] = traced
        x_t, state = step_inputs
        step_module = torch.jit.freeze(torch.jit.trace(_Step(model).eval(), (x_t, *state)))
        _check_parity("torchscript step", step_module(x_t, *state)[0], model.step(x_t, state)[0])

    def forward(x: torch.Tensor) -> torch.Tensor:
        return by_shape[tuple(x.shape)](x)

    def step(x_t: torch.Tensor, state: list[torch.Tensor]):
        y, *new_state = step_module(x_t, *state)
        return y, new_state

    return InferenceRunner("torchscript", forward, step)


def _onnxruntime_runner(
    model: nn.Module, seq_inputs: list[torch.Tensor], step_inputs: tuple[torch.Tensor, list]
) -> InferenceRunner:
    """The exporter's ONNX graphs in onnxruntime (the engine budgets are measured in), with
    as many intra-op threads as torch has here; output checked against eager torch. The
    sequence graph is chosen as an export chooses it (timed at the inputs' length), so the
    profile times the graph a bundle of this model would hold."""
    forward, step = onnxruntime_functions(model, threads=torch.get_num_threads(),
                                          chunk="auto", seq_len=int(seq_inputs[0].shape[1]))
    with torch.no_grad():
        for x in seq_inputs:
            _check_parity("onnxruntime forward", forward(x), model(x))
        x_t, state = step_inputs
        _check_parity("onnxruntime step", step(x_t, state)[0], model.step(x_t, state)[0])
    return InferenceRunner("onnxruntime", forward, step)


# Runtime name -> builder(model, sequence inputs, (x_t, state)) -> InferenceRunner.
RUNTIME_BUILDERS: dict[str, Callable[..., InferenceRunner]] = {
    "torch": _torch_runner,
    "torchscript": _torchscript_runner,
    "onnxruntime": _onnxruntime_runner,
}


def prepare_runtime(
    runtime: str,
    model: nn.Module,
    seq_inputs: list[torch.Tensor],
    step_inputs: tuple[torch.Tensor, list[torch.Tensor]],
) -> InferenceRunner:
    """Prepare ``model`` (already in eval mode) for timed inference in ``runtime``.

    Parameters
    ----------
    runtime : {"torch", "torchscript", "onnxruntime"}
        The runtime; TorchScript traces and freezes the model and checks its output
        against eager torch.
    model : torch.nn.Module
        An :class:`~compressm_tune.models.SSMModel` in eval mode.
    seq_inputs : list of torch.Tensor
        Every sequence input the runner will see, ``(batch, L, d_input)`` each.
    step_inputs : tuple
        ``(x_t (1, d_input), state)`` as the runner's step will see them.

    Returns
    -------
    InferenceRunner

    Raises
    ------
    ExportError
        A compiled graph's output differs from eager torch.
    ValueError
        ``runtime`` is unknown.
    """
    if runtime not in RUNTIME_BUILDERS:
        raise ValueError(f"runtime must be one of {sorted(RUNTIME_BUILDERS)}, got {runtime!r}")
    return RUNTIME_BUILDERS[runtime](model, seq_inputs, step_inputs)


def onnxruntime_functions(model: SSMModel, threads: int = 1, opset: int | None = None,
                          chunk: int | str | None = None,
                          seq_len: int | None = None) -> tuple[Forward, StepFn]:
    """``(forward, step)`` running ``model``'s exported graphs in onnxruntime.

    ``forward(x (batch, L, d_input))`` and ``step(x_t (batch, d_input), state)`` take and return
    torch tensors exactly like ``model(x)`` and ``model.step(x_t, state)`` (``state`` as from
    ``model.allocate_state``), so they drop into code written for the eager model. Weights are
    read once, now: later changes to ``model`` are not seen. ``chunk`` picks the sequence graph
    as in :func:`~compressm_tune.exporter.export_bundle`: ``"auto"`` times the candidates at
    ``seq_len`` tokens (as an export does, so a profile times the graph a bundle would hold),
    ``None`` or ``"scan"`` the per-token Scan, an integer T chunks of T tokens. ``opset``
    defaults to the exporter's ``DEFAULT_OPSET``.

    Examples
    --------
    >>> from compressm_tune.models import SSMConfig
    >>> model = SSMModel(SSMConfig(d_input=1, d_output=2, d_model=4, state_dims=[3])).eval()
    >>> forward, step = onnxruntime_functions(model)
    >>> x = torch.randn(2, 5, 1)
    >>> bool(torch.allclose(forward(x), model(x), atol=1e-5))
    True
    """
    # The exporter builds the graphs; imported here because the exporter imports this package.
    from compressm_tune.exporter import (
        DEFAULT_OPSET,
        build_sequence_model,
        build_step_model,
        extract_weights,
        join_cache,
        ort_session,
        sequence_graph,
        split_cache,
    )

    if opset is None:
        opset = DEFAULT_OPSET
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ExportOptionError(f"threads must be an integer >= 1, got {threads=}")
    weights = extract_weights(model)
    if chunk == "auto":
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ExportOptionError(f"chunk='auto' times the graphs at seq_len tokens; give "
                                    f"seq_len >= 1, got {seq_len=}")
    chunk = sequence_graph(weights, chunk, seq_len or 1, threads, opset)["chunk"]
    seq = ort_session(build_sequence_model(weights, opset, chunk).SerializeToString(), threads)
    stp = ort_session(build_step_model(weights, opset).SerializeToString(), threads)
    seq_name = seq.get_inputs()[0].name  # "x", or "input_ids" for a token model
    step_names = [i.name for i in stp.get_inputs()]

    def _np(t: torch.Tensor) -> np.ndarray:
        t = t.detach().cpu()
        return (t.long() if weights.tokens else t.to(torch.float32)).numpy()

    def _states(state: list[torch.Tensor]) -> list[np.ndarray]:
        return [s.detach().to(torch.float32).cpu().numpy() for s in state]

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(seq.run(None, {seq_name: _np(x)})[0])

    def step(x_t: torch.Tensor, state: list[torch.Tensor]):
        # a token model's graph holds transformers' cache layout: split and join around it
        feeds = dict(zip(step_names, [_np(x_t), *split_cache(weights, _states(state))],
                         strict=True))
        y, *new_state = stp.run(None, feeds)
        return torch.from_numpy(y), [torch.from_numpy(s) for s in join_cache(weights, new_state)]

    return forward, step
