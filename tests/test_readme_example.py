"""The Python examples in README.md run as written (each block in a fresh namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8")) if README.exists() else []


def test_readme_has_a_python_example():
    assert python_blocks(), f"no ```python block in {README}"


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: on a busy 2-core machine one thread is the fastest
    torch.manual_seed(0)
    try:
        exec(
            compile(python_blocks()[index], f"README.md[python block {index}]", "exec"),
            {"__name__": "__readme__"},
        )
    finally:
        torch.set_num_threads(threads)
