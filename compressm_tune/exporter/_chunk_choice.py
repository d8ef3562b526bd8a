"""Choose a network's sequence graph (per-token ``Scan`` or chunk length ``T``) by timing them.

Which variant is fastest depends on the widths, the sequence length and the machine: a chunk
does O(T) work per token and state instead of O(1), so at large N and long sequences the
per-token ``Scan`` can win, while at small N the chunked graph's few large ops beat L loop
iterations. So the export times each candidate in onnxruntime (batch 1, the bundle's thread
count, at the length the model is for) and keeps the fastest; the profiler calls the same
function, so that profiles time the graphs bundles hold.
"""

from __future__ import annotations

import time

import numpy as np

from compressm_tune.exporter._chunked import (
    CHUNK_ARCHS,
    CHUNK_CHOICES,
    check_chunk,
    chunk_label,
    max_chunk,
)
from compressm_tune.exporter._onnx_graph import DEFAULT_OPSET, build_sequence_model
from compressm_tune.exporter._weights import ModelWeights

__all__ = ["candidates", "choose_chunk", "ort_session", "sequence_graph"]


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
    top = min(max_chunk(block.ssm) for block in w.blocks)
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
            sessions[chunk].run(None, {"x": x})
    samples: dict[int | None, list[float]] = {c: [] for c in options}
    for _ in range(rounds):
        for chunk, session in sessions.items():
            spent = 0.0
            for i in range(calls):
                if i >= 2 and spent >= round_s:
                    break
                t0, c0 = time.perf_counter(), clock()
                session.run(None, {"x": x})
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
