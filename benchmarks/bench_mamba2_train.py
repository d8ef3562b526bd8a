"""Mamba-2 training speed: forward + backward of one mixer, three ways, interleaved round-robin.

``ours-ssd`` (:class:`Mamba2Layer`, its chunked SSD, what training runs), ``ours-s6-kernel``
(the same layer with its scan on the fused S6 C kernel, groups folded into the batch: what
state importance runs, timed here as the alternative training path) and ``transformers``
(``Mamba2Mixer``'s torch path, chunked SSD with ``chunk_size`` 64; no mamba_ssm kernels on
CPU). Same shapes, random weights, one thread, loss ``mean(y^2)``.

    python benchmarks/bench_mamba2_train.py [--repeats 7] [--quick]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleave, machine, machine_line, parser, spread, write  # noqa: E402

from compressm_tune._table import markdown_table  # noqa: E402
from compressm_tune.models import Mamba2Layer  # noqa: E402
from compressm_tune.models.selective import scan_readout  # noqa: E402

SHAPES = [  # batch, L, H, N, head_dim, groups
    dict(batch=16, L=128, H=64, N=128, P=32, G=1),
    dict(batch=16, L=128, H=64, N=32, P=32, G=1),
    dict(batch=8, L=256, H=128, N=16, P=32, G=1),
    dict(batch=8, L=256, H=128, N=64, P=64, G=1),
    dict(batch=8, L=256, H=128, N=128, P=64, G=2),
]
QUICK = [dict(batch=2, L=64, H=32, N=16, P=16, G=1)]


def _kernel_forward(layer: Mamba2Layer, u: torch.Tensor) -> torch.Tensor:
    """The layer with its scan on the S6 kernel over folded groups instead of the SSD."""
    z, x, b, c, delta = layer._ssm_inputs(u)
    y = scan_readout(*layer._fold(x, b, c, delta))  # (batch G, L, E / G)
    batch, length = x.shape[:2]
    y = y.reshape(batch, layer.n_groups, length, -1).transpose(1, 2).reshape(x.shape)
    y = y + layer.D.repeat_interleave(layer.head_dim) * x
    return layer.out_proj(layer._gated_norm(y, z))


def candidates(s: dict) -> dict:
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    torch.manual_seed(0)
    e = 2 * s["H"]
    ours = Mamba2Layer(s["H"], s["N"], head_dim=s["P"], n_groups=s["G"])
    theirs = Mamba2Mixer(Mamba2Config(hidden_size=s["H"], state_size=s["N"],
                                      num_heads=e // s["P"], head_dim=s["P"], n_groups=s["G"],
                                      chunk_size=64, num_hidden_layers=1), 0)
    u = torch.randn(s["batch"], s["L"], s["H"])

    def run(forward):
        def call():
            forward(u).square().mean().backward()
        return call
    return {"ours-ssd": run(ours), "ours-s6-kernel": run(lambda v: _kernel_forward(ours, v)),
            "transformers": run(theirs)}


def main() -> None:
    ap = parser(__doc__, "mamba2_train")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    load_before = os.getloadavg()[0]
    rows, results = [], []
    for s in QUICK if args.quick else SHAPES:
        times = interleave(candidates(s), 2 if args.quick else args.repeats, warmup=1)
        stats = {name: spread(ms[0]) for name, ms in times.items()}
        results.append({"shape": s, "candidates": stats})
        base = stats["ours-ssd"]["median_ms"]
        rows.append([f"B={s['batch']} L={s['L']} H={s['H']} N={s['N']} P={s['P']} G={s['G']}"]
                    + [f"{st['median_ms']:.0f} (x{st['median_ms'] / base:.2f})"
                       for st in stats.values()])
    notes = machine(load_before)
    md = ("# Mamba-2 mixer, forward + backward, one thread (median ms, ratio to ours-ssd)\n\n"
          + markdown_table(["shape", *results[0]["candidates"]], rows) + "\n\n"
          + machine_line(notes) + "\n")
    write(args.results_dir / args.name, {"benchmark": "mamba2_train", "machine": notes,
                                         "repeats": args.repeats, "results": results}, md)


if __name__ == "__main__":
    main()
