"""Export: reduced SSM networks (LRU, selective, Mamba or Mamba-2) to ONNX and TorchScript,
checked in onnxruntime.

``export_bundle(checkpoint, out_dir)`` writes ``model.onnx`` (whole sequences, dynamic batch and
length; chunked or one per-token ``Scan`` per block, as measured faster), ``model_step.onnx``
(streaming, explicit states), ``model.ts`` (TorchScript), ``run.py`` (the numpy + onnxruntime
edge runner) and ``manifest.json``, after checking every engine against eager torch.
``load_bundle`` / ``verify_bundle`` reject a bundle whose files do not match its manifest;
``measure_latency`` times a bundle on this machine. Token models (an embedding over int64 ids)
get the same bundle; its manifest's ``input`` section says the runner takes ids, and its graphs
use ``transformers``' names (``input_ids``, ``logits``, the cache as ``past_conv_state.{i}`` /
``past_ssm_state.{i}`` in and ``present_...`` out; :func:`step_states`, the manifest's ``io``;
:func:`split_cache` / :func:`join_cache` convert from and to ``allocate_state``'s layout).
Mamba and Mamba-2 sequence graphs can be chunked too (the SSD form). The pieces are public
too: ``extract_weights`` -> ``build_sequence_model`` / ``build_step_model`` / ``script_model``,
checked with ``run_parity``.
"""

from compressm_tune.errors import ExportOptionError
from compressm_tune.exporter._bundle import (
    DEFAULT_SEQ_LEN,
    FILE_NAMES,
    FORMATS,
    MODES,
    export_bundle,
)
from compressm_tune.exporter._edge import (
    BundleError,
    EdgeBundle,
    Streamer,
    latency_stats,
    time_calls,
)
from compressm_tune.exporter._manifest import load_bundle, measure_latency, verify_bundle
from compressm_tune.exporter._names import join_cache, split_cache, step_states
from compressm_tune.exporter._onnx import (
    DEFAULT_OPSET,
    QUANTIZE_CHOICES,
    SUPPORTED_OPSETS,
    build_sequence_model,
    build_step_model,
)
from compressm_tune.exporter._parity import choose_chunk, ort_session, run_parity, sequence_graph
from compressm_tune.exporter._torchscript import ScriptedSSM, script_model
from compressm_tune.exporter._weights import (
    BlockWeights,
    LRUWeights,
    Mamba2BlockWeights,
    MambaBlockWeights,
    ModelWeights,
    SelectiveWeights,
    extract_weights,
)
from compressm_tune.hardware import onnxruntime_functions  # its home: the profiler's runtimes

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_SEQ_LEN",
    "FILE_NAMES",
    "FORMATS",
    "MODES",
    "QUANTIZE_CHOICES",
    "SUPPORTED_OPSETS",
    "BlockWeights",
    "BundleError",
    "EdgeBundle",
    "ExportOptionError",
    "LRUWeights",
    "Mamba2BlockWeights",
    "MambaBlockWeights",
    "ModelWeights",
    "ScriptedSSM",
    "SelectiveWeights",
    "Streamer",
    "build_sequence_model",
    "build_step_model",
    "choose_chunk",
    "export_bundle",
    "extract_weights",
    "join_cache",
    "latency_stats",
    "load_bundle",
    "measure_latency",
    "onnxruntime_functions",
    "ort_session",
    "run_parity",
    "script_model",
    "sequence_graph",
    "split_cache",
    "step_states",
    "time_calls",
    "verify_bundle",
]
