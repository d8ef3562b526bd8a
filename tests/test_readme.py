"""Every Python code block in the README and docs/ runs as written (in a scratch folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(doc, i, code) for doc in DOCS
          for i, code in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), re.S))]


def test_the_docs_have_python_blocks():
    assert len(BLOCKS) >= 3, [(d.name, i) for d, i, _ in BLOCKS]


@pytest.mark.parametrize("doc,index,code", BLOCKS,
                         ids=[f"{d.relative_to(ROOT)}#{i}" for d, i, _ in BLOCKS])
def test_block_runs(doc: Path, index: int, code: str, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COMPRESSM_CACHE", str(tmp_path / "cache"))
    exec(compile(code, f"{doc.name} block {index}", "exec"), {"__name__": "docs"})


# The shell blocks: every compressm-tune and run.py command of the README runs as written, in
# order, in one scratch folder (a command may use what an earlier one wrote). Installing and
# testing (pip, pytest, ruff) is what CI itself does, so those lines are left out.
SHELL = [line.split("  #")[0].strip()
         for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
         for command in block.splitlines()
         for line in command.split("&&")
         if line.strip().startswith(("compressm-tune", "python3 bundle/run.py"))]


def test_the_readme_has_commands_to_run():
    assert any(c.startswith("compressm-tune --budget") for c in SHELL), SHELL
    assert any(c.startswith("compressm-tune train") for c in SHELL), SHELL


def _users_files(folder: Path) -> None:
    """What the README's commands take from the user: a pretrained Mamba saved by
    transformers (random weights, small) and a file of token ids."""
    import numpy as np
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    MambaForCausalLM(MambaConfig(vocab_size=128, hidden_size=32, state_size=64,
                                 num_hidden_layers=2)).save_pretrained(folder / "my-mamba")
    np.save(folder / "ids.npy", np.random.default_rng(0).integers(0, 128, (96, 65)))


@pytest.mark.slow
def test_the_readme_commands_run_as_written(tmp_path):
    import shlex
    import shutil
    import subprocess
    import sys

    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    _users_files(tmp_path)
    cli = "import sys; from compressm_tune.cli import main; sys.exit(main())"
    for command in SHELL:
        argv = shlex.split(command)
        argv = ([sys.executable, "-c", cli, *argv[1:]] if argv[0] == "compressm-tune"
                else [sys.executable, *argv[1:]])
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
