"""In-memory onnxruntime callables for a live model (the profiler's ``onnxruntime`` runtime).

No files are written: the graphs are built from the model's current weights and opened from
bytes, with the same session settings as the edge runner (fixed intra-op threads, inter-op 1,
sequential execution).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from compressm_tune.errors import ExportOptionError
from compressm_tune.exporter._onnx import (
    DEFAULT_OPSET,
    build_sequence_model,
    build_step_model,
)
from compressm_tune.exporter._parity import ort_session, sequence_graph
from compressm_tune.exporter._weights import extract_weights
from compressm_tune.models import SSMModel

__all__ = ["onnxruntime_functions"]

Forward = Callable[[torch.Tensor], torch.Tensor]
Step = Callable[[torch.Tensor, list[torch.Tensor]], tuple[torch.Tensor, list[torch.Tensor]]]


def onnxruntime_functions(model: SSMModel, threads: int = 1, opset: int = DEFAULT_OPSET,
                          chunk: int | str | None = None,
                          seq_len: int | None = None) -> tuple[Forward, Step]:
    """``(forward, step)`` running ``model``'s exported graphs in onnxruntime.

    ``forward(x (batch, L, d_input))`` and ``step(x_t (batch, d_input), state)`` take and return
    torch tensors exactly like ``model(x)`` and ``model.step(x_t, state)`` (``state`` as from
    ``model.allocate_state``), so they drop into code written for the eager model. Weights are
    read once, now: later changes to ``model`` are not seen. ``chunk`` picks the sequence graph
    as in :func:`~compressm_tune.exporter.export_bundle`: ``"auto"`` times the candidates at
    ``seq_len`` tokens (as an export does, so a profile times the graph a bundle would hold),
    ``None`` or ``"scan"`` the per-token Scan, an integer T chunks of T tokens.

    Examples
    --------
    >>> from compressm_tune.models import SSMConfig
    >>> model = SSMModel(SSMConfig(d_input=1, d_output=2, d_model=4, state_dims=[3])).eval()
    >>> forward, step = onnxruntime_functions(model)
    >>> x = torch.randn(2, 5, 1)
    >>> bool(torch.allclose(forward(x), model(x), atol=1e-5))
    True
    """
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
    step_names = [i.name for i in stp.get_inputs()]

    def _np(t: torch.Tensor) -> np.ndarray:
        return t.detach().to(torch.float32).cpu().numpy()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(seq.run(None, {"x": _np(x)})[0])

    def step(x_t: torch.Tensor, state: list[torch.Tensor]):
        feeds = dict(zip(step_names, [_np(x_t), *map(_np, state)], strict=True))
        y, *new_state = stp.run(None, feeds)
        return torch.from_numpy(y), [torch.from_numpy(s) for s in new_state]

    return forward, step
