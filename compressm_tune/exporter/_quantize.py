"""Dynamic int8 quantization of the ONNX graphs, with its size and accuracy cost.

``onnxruntime.quantization.quantize_dynamic`` stores the MatMul weights (encoder, GLU, head and
the layers' input projections: LRU ``B``, ``C``; selective ``dt_down``, ``dt_up``, ``B_proj``,
``C_proj``) as int8 with per-tensor scales and quantizes activations on the fly; the recurrence
inside ``Scan`` stays float32 (it has no weights to quantize), and so do the chunked graphs'
recurrence constants (MatMuls named with :data:`._onnx_chunked.RECURRENCE`). The accuracy
change is measured on the test split of the checkpoint's dataset when ``load_dataset`` can
rebuild it here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from compressm_tune.errors import ExportError, MissingDependencyError
from compressm_tune.exporter._onnx_chunked import RECURRENCE

__all__ = ["QUANTIZE_CHOICES", "quantize_file", "evaluate_test_split"]

QUANTIZE_CHOICES = ("int8",)
_EVAL_BATCH = 250


def _recurrence_nodes(path: Path) -> list[str]:
    """Names of the chunked graphs' recurrence MatMuls (their constants are powers of lambda,
    which int8 would round to a few digits), in the graph and its subgraphs."""
    import onnx

    names, graphs = [], [onnx.load(str(path)).graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            if node.name.startswith(RECURRENCE):
                names.append(node.name)
            graphs += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    return names


def quantize_file(src: Path, dst: Path) -> None:
    """Write the dynamically int8-quantized version of ONNX file ``src`` to ``dst``."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise MissingDependencyError(
            f"--quantize needs onnxruntime's quantization tools (`pip install onnxruntime`): "
            f"{exc}") from exc
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # it logs a pre-processing hint at WARNING
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                         nodes_to_exclude=_recurrence_nodes(src))
    except Exception as exc:  # onnxruntime raises bare exceptions for unsupported graphs
        raise ExportError(f"int8 quantization of {src.name} failed: {exc}") from exc
    finally:
        logging.getLogger().setLevel(level)


def _evaluate(session, x: np.ndarray, y: np.ndarray, task: str) -> dict[str, float]:
    out = np.concatenate([session.run(None, {"x": x[i:i + _EVAL_BATCH]})[0]
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

    ``ds, skipped`` come from :func:`~compressm_tune.exporter._dataset.rebuild_dataset`; with no
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
