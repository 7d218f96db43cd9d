"""The README's "Use it in diffusers" examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Use it in diffusers"


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of the "Use it in diffusers" section of a markdown file (the
    section ends at the next heading of level 1 or 2 outside a code block)."""
    blocks, current, in_section, fence = [], None, False, False
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("```"):
            fence = not fence
            if in_section and fence and line.strip() == "```python":
                current = []
            elif in_section and not fence and current is not None:
                blocks.append("".join(current))
                current = None
            continue
        if fence:
            if current is not None:
                current.append(line)
            continue
        if line.rstrip() == HEADING:
            in_section = True
        elif in_section and re.match(r"#{1,2} ", line):
            break
    return blocks


SOURCES = [ROOT / "README.md"]


def test_readme_section_has_examples():
    assert len(python_blocks(ROOT / "README.md")) >= 2, "the README's 'Use it in diffusers' section lost its examples"


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_use_it_in_diffusers_examples_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write files next to them...
    if (ROOT / "assets").exists():
        (tmp_path / "assets").symlink_to(ROOT / "assets")  # ...and may read the bundled models
    monkeypatch.syspath_prepend(str(ROOT))
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(python_blocks(path)):
        exec(compile(block, f"{path.name}[python block {i}]", "exec"), namespace)
