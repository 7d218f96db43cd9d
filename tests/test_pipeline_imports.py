"""The pipelines' import graph: every pipeline file imports what it shares from
``speculative_utils.py`` only, never another pipeline file, and ``speculative_utils.py``
imports no pipeline, so there is no cycle to dodge with a function-level import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
FILES = sorted(p for p in PIPELINES.glob("*.py") if p.name != "__init__.py")


def pipeline_imports(path: Path) -> list[tuple[str, bool]]:
    """``(module, top_level)`` for every import of a module of this package in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from .x import y / from . import x
                names = [module] if module else [a.name for a in node.names]
            elif module.startswith("specdiff.pipelines."):
                names = [module.removeprefix("specdiff.pipelines.")]
            elif module == "specdiff.pipelines":
                names = [a.name for a in node.names]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name.removeprefix("specdiff.pipelines.") for a in node.names
                     if a.name.startswith("specdiff.pipelines.")]
        else:
            continue
        found += [(name.split(".")[0], id(node) in top) for name in names]
    return found


def test_the_files_are_found():
    assert {p.name for p in FILES} >= {"speculative_utils.py", "pipeline_speculative_ddpm.py"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_no_pipeline_file_imports_another_pipeline_file(path):
    imported = pipeline_imports(path)
    others = sorted({m for m, _ in imported if m.startswith("pipeline_")})
    assert not others, f"{path.name} imports {others}: shared helpers belong in speculative_utils.py"
    if path.name == "speculative_utils.py":
        assert not imported, f"speculative_utils.py imports pipelines: {imported}"
    lazy = sorted({m for m, top_level in imported if not top_level})
    assert not lazy, f"{path.name} imports {lazy} inside a function: import at the top"
