"""Rebuild this folder's bundle with the code from BEFORE token bundles took transformers' names.

Run it against that commit's package (not the current one), from the repository root::

    git worktree add /tmp/oldexp ffc050a~1
    cp compressm_tune/models/_scan_kernel*.so /tmp/oldexp/compressm_tune/models/
    PYTHONPATH=/tmp/oldexp python tests/data/old_mamba_token_bundle/make_fixture.py
    git worktree remove --force /tmp/oldexp

It trains a tiny Mamba character LM (an embedding over the pystdlib-chars ids, 2 blocks of
widths 4 and 3) for 300 steps, exports it with that commit's ``export_bundle`` into ``bundle/``
and saves that commit's eager-torch logits on fixed ids in ``reference.npz``, with its greedy
continuation of a prompt (a plain loop re-running the whole prefix, no state).
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import torch

import compressm_tune
from compressm_tune.data import load_dataset
from compressm_tune.exporter import export_bundle
from compressm_tune.models import SSMConfig, SSMModel
from compressm_tune.training import save_checkpoint

HERE = Path(__file__).resolve().parent
STEPS = 300


def main() -> None:
    if Path(compressm_tune.__file__).resolve().parents[1] == HERE.parents[2]:
        raise SystemExit("run this against the old commit: PYTHONPATH=/tmp/oldexp python ...")
    torch.manual_seed(0)
    data = load_dataset("pystdlib-chars")
    vocab = data.d_input
    ids, targets = data.x_train.argmax(-1), data.y_train  # one-hot rows -> ids
    model = SSMModel(SSMConfig(arch="mamba", vocab_size=vocab, d_output=vocab, d_model=8,
                               state_dims=[4, 3], pooling="none"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(STEPS):
        batch = torch.randint(len(ids), (16,))
        logits = model(ids[batch])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[batch].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    work = HERE / "_work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    ckpt = work / "model.pt"
    save_checkpoint(ckpt, model, step=STEPS, dataset={
        "name": data.name, "task": data.task, "d_input": data.d_input,
        "d_output": data.d_output, "seq_len": data.seq_len, "norm_mean": list(data.norm_mean),
        "norm_std": list(data.norm_std), "info": data.info})
    shutil.rmtree(HERE / "bundle", ignore_errors=True)
    export_bundle(ckpt, HERE / "bundle", chunk="scan", parity_lengths=(1, 64, 130))
    # the bundle's run.py is that version's copy of the edge runner: kept gzipped beside the
    # bundle (the test puts it back), so the repository holds one edge runner as source
    runner = HERE / "bundle" / "run.py"
    (HERE / "run.py.gz").write_bytes(gzip.compress(runner.read_bytes(), mtime=0))
    runner.unlink()
    probe = data.x_test[:2, :32].argmax(-1)  # real text, 2 sequences of 32 ids
    with torch.no_grad():
        want = model(probe).numpy()
        lookup = {b: i for i, b in enumerate(data.info["vocab_bytes"])}
        prompt, margin = "def __init__(self", np.inf
        gen = [lookup[b] for b in prompt.encode()]
        for _ in range(12):
            last = model(torch.tensor([gen]))[0, -1]
            top2 = last.topk(2).values
            margin = min(margin, float(top2[0] - top2[1]))  # far above float error: no ties
            gen.append(int(last.argmax()))
    table = [chr(b) for b in data.info["vocab_bytes"]] + ["\ufffd"]  # the unknown id last
    text = prompt + "".join(table[i] for i in gen[len(prompt):])
    print(f"loss {loss.item():.3f}; greedy {text!r}, smallest top-2 logit margin {margin:.2e}")
    np.savez_compressed(HERE / "reference.npz", ids=probe.numpy(), logits=want, prompt=prompt,
                        text=text, loss=loss.item())
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
