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
