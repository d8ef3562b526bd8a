"""Mamba-2 training speed: forward + backward of one mixer, each way side by side, interleaved.

``ours-ssd`` (:class:`Mamba2Layer` on its chunked SSD, ``train``'s default), ``ours-fused``
(the same layer with ``scan="fused"``, what ``train --mamba2-scan fused`` runs: the selective
layer's fused kernel over the folded groups, C on CPU, Triton on CUDA) and, on CPU,
``transformers`` (``Mamba2Mixer``'s torch path, chunked SSD with ``chunk_size`` 64; no
mamba_ssm kernels on CPU). Same shapes, random weights, loss ``mean(y^2)``, float32.

``--device cpu`` (default): one thread, small shapes. ``--device cuda``: realistic shapes
(d_model 256-512, d_state 128, L 1024-2048, batch 8), every call synchronized; the peak memory
of one step is measured apart from the timing.

    python benchmarks/bench_mamba2_train.py [--repeats 7] [--quick]
    python benchmarks/bench_mamba2_train.py --device cuda --name mamba2_train_cuda
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleave, machine, machine_line, parser, spread, write  # noqa: E402

from compressm_tune._table import markdown_table  # noqa: E402
from compressm_tune.hardware import measure_peak_memory  # noqa: E402
from compressm_tune.models import Mamba2Layer  # noqa: E402

SHAPES = {  # batch, L, H, N, head_dim, groups
    "cpu": [dict(batch=16, L=128, H=64, N=128, P=32, G=1),
            dict(batch=16, L=128, H=64, N=32, P=32, G=1),
            dict(batch=8, L=256, H=128, N=16, P=32, G=1),
            dict(batch=8, L=256, H=128, N=64, P=64, G=1),
            dict(batch=8, L=256, H=128, N=128, P=64, G=2)],
    "cuda": [dict(batch=8, L=1024, H=256, N=128, P=64, G=1),
             dict(batch=8, L=2048, H=512, N=128, P=64, G=1),
             dict(batch=8, L=2048, H=512, N=128, P=64, G=8)],
}
QUICK = {"cpu": [dict(batch=2, L=64, H=32, N=16, P=16, G=1)],
         "cuda": [dict(batch=2, L=256, H=64, N=128, P=32, G=2)]}


def candidates(s: dict, device: str) -> dict[str, Callable[[], None]]:
    """One training step's forward + backward per implementation, synchronized on CUDA."""
    torch.manual_seed(0)
    e = 2 * s["H"]
    ssd = Mamba2Layer(s["H"], s["N"], head_dim=s["P"], n_groups=s["G"]).to(device)
    fused = copy.deepcopy(ssd)
    fused.scan = "fused"
    u = torch.randn(s["batch"], s["L"], s["H"], device=device)
    layers = {"ours-ssd": ssd, "ours-fused": fused}
    if device == "cpu":
        from transformers import Mamba2Config
        from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

        layers["transformers"] = Mamba2Mixer(Mamba2Config(
            hidden_size=s["H"], state_size=s["N"], num_heads=e // s["P"], head_dim=s["P"],
            n_groups=s["G"], chunk_size=64, num_hidden_layers=1), 0)

    def run(layer: torch.nn.Module) -> Callable[[], None]:
        def call() -> None:
            layer(u).square().mean().backward()
            layer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
        return call
    return {name: run(layer) for name, layer in layers.items()}


def peak_mib(calls: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Peak CUDA memory of one step per candidate, MiB above what was held before it."""
    cuda = torch.device("cuda")
    out = {}
    for name, call in calls.items():
        torch.cuda.empty_cache()
        out[name] = round(measure_peak_memory(call, cuda).peak_mb, 1)
    return out


def main() -> None:
    ap = parser(__doc__, "mamba2_train")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    if device == "cpu":
        torch.set_num_threads(1)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    load_before = os.getloadavg()[0]
    rows, results = [], []
    for s in (QUICK if args.quick else SHAPES)[device]:
        calls = candidates(s, device)
        times = interleave(calls, 2 if args.quick else args.repeats, warmup=1)
        stats = {name: spread(ms[0]) for name, ms in times.items()}
        if device == "cuda":
            for name, mib in peak_mib(calls).items():
                stats[name]["peak_mib"] = mib
        results.append({"shape": s, "candidates": stats})
        base = stats["ours-ssd"]["median_ms"]
        rows.append([f"B={s['batch']} L={s['L']} H={s['H']} N={s['N']} P={s['P']} G={s['G']}"]
                    + [f"{st['median_ms']:.3g} (x{st['median_ms'] / base:.2f})"
                       + (f", {st['peak_mib']:.0f} MiB" if "peak_mib" in st else "")
                       for st in stats.values()])
        del calls
    notes = machine(load_before)
    if device == "cuda":
        notes["gpu"] = torch.cuda.get_device_name()
    where = (f"on {notes['gpu']} (median ms, ratio to ours-ssd; peak memory of one step)"
             if device == "cuda" else "one thread (median ms, ratio to ours-ssd)")
    md = (f"# Mamba-2 mixer, forward + backward, float32, {where}\n\n"
          + markdown_table(["shape", *results[0]["candidates"]], rows) + "\n\n"
          + machine_line(notes) + "\n")
    write(args.results_dir / args.name, {"benchmark": "mamba2_train", "device": device,
                                         "machine": notes, "repeats": args.repeats,
                                         "results": results}, md)


if __name__ == "__main__":
    main()
