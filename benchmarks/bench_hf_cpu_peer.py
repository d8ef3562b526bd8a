"""Our ONNX bundle graphs against ``transformers``' own CPU path, same random weights, one thread.

For each model (4 layers, d_model 256, random weights: ``MambaForCausalLM`` with d_state 16 and
64, ``Mamba2ForCausalLM`` with d_state 128, 8 heads of 64 channels, one group) the ONNX graphs
are built from the imported model (``from_hf_mamba`` / ``from_hf_mamba2``) and, for the cut
model,
from a copy cut to ``--cut`` states per layer (``keep_states``; which states does not matter for
the time). Timed in interleaved rounds, one thread (torch and onnxruntime), batch 1:

* prefill: a forward over L=256 random ids: ``transformers``' ``model(ids)`` under
  ``torch.no_grad`` (its slow torch path: no CUDA kernels on a CPU) vs our sequence graph as
  ``export --chunk auto`` picks it (per-token Scan or chunked, recorded), full and cut;
* decode: per token, ``--decode`` tokens after a 16-token prompt: ``transformers``' cached step
  (``model(next_id, cache=cache, use_cache=True)``, what ``generate`` calls per token) vs our
  step graph with its cache tensors fed back; the prompt's prefill is not timed.

Reports medians over rounds (thread CPU time and wall time) and the speed-up ratios against the
issue's targets: cut prefill >= 2x faster than full, full >= 3x faster than transformers,
decode >= 6x faster than transformers' cached step.

    python benchmarks/bench_hf_cpu_peer.py [--quick] [--results-dir /tmp]
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import int_list, interleave, machine, machine_line, parser, spread, write  # noqa: E402

from compressm_tune._table import markdown_table  # noqa: E402
from compressm_tune.exporter import (  # noqa: E402
    DEFAULT_OPSET,
    build_sequence_model,
    build_step_model,
    extract_weights,
    ort_session,
    sequence_graph,
)
from compressm_tune.models import from_hf_mamba, from_hf_mamba2  # noqa: E402

VOCAB, D_MODEL, LAYERS, PROMPT = 256, 256, 4, 16
TARGETS = {"cut_vs_full_prefill": 2.0, "full_vs_hf_prefill": 3.0, "decode_vs_hf": 6.0}


def hf_model(arch: str, d_state: int, seed: int = 0):
    """``transformers``' model with random weights and our import of it."""
    import transformers

    torch.manual_seed(seed)
    kw = {"vocab_size": VOCAB, "hidden_size": D_MODEL, "state_size": d_state,
          "num_hidden_layers": LAYERS}
    if arch == "mamba2":
        hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            **kw, num_heads=2 * D_MODEL // 64, head_dim=64, n_groups=1)).eval()
        return hf, from_hf_mamba2(hf).eval()
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(**kw)).eval()
    return hf, from_hf_mamba(hf).eval()


def cut_model(model, keep: int):
    """A copy of ``model`` with ``keep`` states per layer."""
    cut = copy.deepcopy(model)
    for block in cut.blocks:
        block.ssm.keep_states(torch.arange(keep))
    return cut


def macs_per_token(model) -> dict:
    """Multiply-adds per token (an estimate from the shapes, not a measurement): the
    projections a state cut leaves alone (``fixed``) and those that scale with N: the B/C
    projections and the recurrence, counted as 2 E N (state update and read-out)."""
    fixed = scaled = 0
    for bw in extract_weights(model).blocks:
        e, n = (bw.d_inner, bw.state_dim) if hasattr(bw, "d_inner") else (
            bw.conv.shape[0], bw.state_dim)
        if hasattr(bw, "in_xbc"):  # Mamba-2: x rows of in_xbc, then 2GN B/C rows
            fixed += bw.in_z.size + bw.in_xbc.shape[0] * e + bw.in_dt.size + bw.out_w.size
            scaled += bw.in_xbc.size - bw.in_xbc.shape[0] * e
        else:
            s = bw.ssm
            fixed += bw.in_x.size + bw.in_z.size + s.dt_down.size + s.dt_up.size + bw.out_w.size
            scaled += s.b_proj.size + s.c_proj.size
        scaled += 2 * e * n
    return {"fixed": int(fixed), "state": int(scaled)}


def graphs(model, seq_len: int) -> dict:
    """The sequence graph ``--chunk auto`` would pick and the step graph, as sessions."""
    w = extract_weights(model)
    choice = sequence_graph(w, "auto", seq_len, 1, DEFAULT_OPSET)
    seq = ort_session(build_sequence_model(w, DEFAULT_OPSET, choice["chunk"])
                      .SerializeToString(), 1)
    step = ort_session(build_step_model(w, DEFAULT_OPSET).SerializeToString(), 1)
    return {"seq": seq, "step": step, "choice": choice, "state_dims": list(model.state_dims)}


def decode_ours(g: dict, prompt: np.ndarray, tokens: np.ndarray):
    """A call timing ``len(tokens)`` step-graph calls after an untimed prompt."""
    step = g["step"]
    names = [i.name for i in step.get_inputs()]
    zeros = [np.zeros([1 if isinstance(d, str) else d for d in i.shape], np.float32)
             for i in step.get_inputs()[1:]]

    def run(ids, state):
        for t in ids:
            y, *state = step.run(None, dict(zip(names, [np.array([t]), *state], strict=True)))
        return state

    def call():
        state = run(prompt[0], zeros)
        t0, c0 = time.perf_counter(), time.thread_time()
        run(tokens, state)
        return time.perf_counter() - t0, time.thread_time() - c0
    return call


def decode_hf(hf, prompt: np.ndarray, tokens: np.ndarray):
    """The same for ``transformers``: prefill the prompt with a cache, then one cached forward
    per token."""
    ids = torch.as_tensor(prompt)
    steps = [torch.tensor([[int(t)]]) for t in tokens]

    def call():
        with torch.no_grad():
            cache = hf(ids, use_cache=True).cache
            t0, c0 = time.perf_counter(), time.thread_time()
            for tok in steps:
                cache = hf(tok, cache=cache, use_cache=True).cache
        return time.perf_counter() - t0, time.thread_time() - c0
    return call


def bench(arch: str, d_state: int, keep: int, seq_len: int, decode: int, rounds: int) -> dict:
    hf, full = hf_model(arch, d_state)
    cut = cut_model(full, keep).eval()
    rng = np.random.default_rng(d_state)
    ids = rng.integers(VOCAB, size=(1, seq_len))
    ours = {"full": graphs(full, seq_len), "cut": graphs(cut, seq_len)}
    macs = {"full": macs_per_token(full), "cut": macs_per_token(cut)}
    with torch.no_grad():  # parity of what is timed, against transformers' logits
        want = hf(torch.as_tensor(ids)).logits.numpy()
    got = ours["full"]["seq"].run(None, {"input_ids": ids})[0]
    error = float(np.abs(got - want).max())
    tid = torch.as_tensor(ids)

    def hf_prefill():
        with torch.no_grad():
            hf(tid)
    prefill = interleave({
        "transformers": hf_prefill,
        "onnx_full": lambda: ours["full"]["seq"].run(None, {"input_ids": ids}),
        "onnx_cut": lambda: ours["cut"]["seq"].run(None, {"input_ids": ids}),
    }, rounds, warmup=1, clocks=(time.thread_time, time.perf_counter))
    prompt, tokens = ids[:, :PROMPT], ids[0, PROMPT:PROMPT + decode]
    dec_calls = {"transformers": decode_hf(hf, prompt, tokens),
                 "onnx_full": decode_ours(ours["full"], prompt, tokens),
                 "onnx_cut": decode_ours(ours["cut"], prompt, tokens)}
    for call in dec_calls.values():
        call()  # warm-up
    dec: dict[str, list[list[float]]] = {k: [[], []] for k in dec_calls}
    for _ in range(rounds):
        for name, call in dec_calls.items():
            wall, cpu = call()
            dec[name][0].append(cpu * 1e3 / len(tokens))
            dec[name][1].append(wall * 1e3 / len(tokens))
    med = {k: float(np.median(v[0])) for k, v in prefill.items()}
    dmed = {k: float(np.median(v[0])) for k, v in dec.items()}
    return {
        "arch": arch, "d_state": d_state, "cut_to": keep, "seq_len": seq_len,
        "decode_tokens": len(tokens),
        "max_abs_logit_error_vs_transformers": error,
        "macs_per_token_estimate": macs,
        "cut_vs_full_macs_ratio": sum(macs["full"].values()) / sum(macs["cut"].values()),
        "sequence_graph": {k: {"variant": g["choice"]["variant"], "chunk": g["choice"]["chunk"],
                               "candidates_ms": g["choice"]["timings"]["median_ms"]}
                           for k, g in ours.items()},
        "prefill_ms": {k: {"thread_cpu": spread(v[0]), "wall": spread(v[1])}
                       for k, v in prefill.items()},
        "decode_ms_per_token": {k: {"thread_cpu": spread(v[0]), "wall": spread(v[1])}
                                for k, v in dec.items()},
        "ratios": {"full_vs_hf_prefill": med["transformers"] / med["onnx_full"],
                   "cut_vs_full_prefill": med["onnx_full"] / med["onnx_cut"],
                   "decode_vs_hf": dmed["transformers"] / dmed["onnx_full"],
                   "cut_vs_full_decode": dmed["onnx_full"] / dmed["onnx_cut"]},
    }


def main() -> None:
    ap = parser(__doc__, "hf_cpu_peer", quick="Mamba-1 d_state 16 and Mamba-2 d_state 32, "
                                              "L=64, 2 rounds")
    ap.add_argument("--models", type=lambda text: [(a, int(n)) for a, n in (
        item.split(":") for item in text.split(",") if item)],
                    default=[("mamba", 16), ("mamba", 64), ("mamba2", 128)],
                    help="arch:d_state,... (default mamba:16,mamba:64,mamba2:128)")
    ap.add_argument("--cut", type=int_list, default=None,
                    help="states kept per layer in the cut model, one per --models entry "
                         "(default: min(32, d_state // 4))")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--decode", type=int, default=32, help="decoded tokens timed per round")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    if args.quick:
        args.models, args.seq_len, args.decode, args.rounds = ([("mamba", 16), ("mamba2", 32)],
                                                               64, 8, 2)
    cuts = args.cut or [min(32, n // 4) for _, n in args.models]
    torch.set_num_threads(1)
    logging.getLogger("transformers").setLevel(logging.ERROR)  # its slow-path notices
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    load = os.getloadavg()[0]
    start = time.perf_counter()
    results = [bench(a, n, k, args.seq_len, args.decode, args.rounds)
               for (a, n), k in zip(args.models, cuts, strict=True)]
    m = machine(load)
    rows = []
    for r in results:
        p, d, q = r["prefill_ms"], r["decode_ms_per_token"], r["ratios"]
        rows.append([r["arch"], f"{r['d_state']} -> {r['cut_to']}",
                     f"{p['transformers']['thread_cpu']['median_ms']:.1f}",
                     f"{p['onnx_full']['thread_cpu']['median_ms']:.1f} "
                     f"({r['sequence_graph']['full']['variant']})",
                     f"{p['onnx_cut']['thread_cpu']['median_ms']:.1f} "
                     f"({r['sequence_graph']['cut']['variant']})",
                     f"{q['full_vs_hf_prefill']:.2f}x",
                     f"{q['cut_vs_full_prefill']:.2f}x "
                     f"(MACs {r['cut_vs_full_macs_ratio']:.2f}x)",
                     f"{d['transformers']['thread_cpu']['median_ms']:.3f}",
                     f"{d['onnx_full']['thread_cpu']['median_ms']:.3f}",
                     f"{d['onnx_cut']['thread_cpu']['median_ms']:.3f}",
                     f"{q['decode_vs_hf']:.2f}x",
                     f"{r['max_abs_logit_error_vs_transformers']:.1e}"])
    met = {name: {f"{r['arch']}:{r['d_state']}": r["ratios"][name] >= bar for r in results}
           for name, bar in TARGETS.items()}
    table = markdown_table(["arch", "d_state -> cut", "HF prefill ms", "ONNX full ms",
                            "ONNX cut ms", "full vs HF", "cut vs full", "HF decode ms/tok",
                            "ONNX full ms/tok", "ONNX cut ms/tok", "decode vs HF",
                            "logit err"], rows)
    verdict = "\n".join(
        f"- {name.replace('_', ' ')} >= {bar:g}x: " + ", ".join(
            f"{n}: {'met' if ok else 'NOT met'} ({r['ratios'][name]:.2f}x)"
            for r, (n, ok) in zip(results, met[name].items(), strict=True))
        for name, bar in TARGETS.items())
    md = (f"# ONNX bundle graphs vs transformers' CPU path (Mamba-1, Mamba-2)\n\n"
          f"{LAYERS} layers, d_model {D_MODEL}, vocab {VOCAB}, random weights (the same in both), "
          f"batch 1, one thread; prefill L={args.seq_len}, decode {args.decode} tokens after a "
          f"{PROMPT}-token prompt; median thread-CPU ms over {args.rounds} interleaved rounds "
          f"(wall times in the JSON). Our sequence graph is the one `--chunk auto` picks. "
          f"'cut vs full (MACs m)': m is the ratio of multiply-adds per token, full over cut, "
          f"estimated from the shapes (projections + B/C rows + 2 E N for the recurrence; not "
          f"measured): about what a state cut can give while the projections stay.\n\n"
          f"{table}\n\nTargets:\n{verdict}\n\n{machine_line(m)} Run took "
          f"{time.perf_counter() - start:.0f} s.\n")
    write(args.results_dir / args.name, {"results": results, "targets": TARGETS,
                                         "targets_met": met, "machine": m,
                                         "args": {k: str(v) for k, v in vars(args).items()}},
          md)


if __name__ == "__main__":
    main()
