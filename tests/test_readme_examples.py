"""Every python example in the README runs on its own (a fresh namespace), from an empty folder
that is not the repository, and leaves nothing behind (issue 11 §4)."""

import re
from pathlib import Path

import matplotlib
import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(text: str) -> list[tuple[str, int, str]]:
    """``(section heading, index in section, code)`` of every ```python block."""
    blocks, heading, current, counts = [], None, None, {}
    for line in text.splitlines(keepends=True):
        if current is None and re.match(r"## ", line):
            heading = line[3:].strip()
        elif line.strip() == "```python" and current is None:
            current = []
        elif line.startswith("```") and current is not None:
            counts[heading] = counts.get(heading, -1) + 1
            blocks.append((heading, counts[heading], "".join(current)))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


BLOCKS = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))


def test_the_readme_has_python_examples():
    assert {"Use it from Python", "Use it in diffusers", "Discrete (masked) diffusion", "Many GPUs"} <= {
        heading for heading, _, _ in BLOCKS
    }


@pytest.mark.parametrize(("heading", "index", "code"), BLOCKS, ids=[f"{h}[{i}]" for h, i, _ in BLOCKS])
def test_readme_example_runs_alone_anywhere_and_leaves_no_files(heading, index, code, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile(code, f"README[{heading}][{index}]", "exec"), namespace)  # noqa: S102
    assert list(tmp_path.iterdir()) == [], "the example wrote files where it was run"
    if "out" in namespace:  # every example that samples reports its network calls
        assert namespace["out"].stats.target_calls > 0


def test_the_benchmark_page_is_the_saved_results():
    """docs/benchmarks.md is exactly what `python -m specdiff.workbench.bench report --write` writes."""
    from specdiff.workbench.report import DOCS, render_docs

    assert DOCS == ROOT / "docs" / "benchmarks.md"
    assert DOCS.read_text() == render_docs(ROOT / "assets" / "bench")


def test_the_readme_lists_exactly_the_supported_schedulers():
    from specdiff.schedulers import supported_table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("<!-- schedulers:start -->\n")[1].split("\n<!-- schedulers:end -->")[0]
    assert block == supported_table()


def test_the_readme_shows_the_command_that_make_demo_runs():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    demo = re.search(r"^demo:.*\n\t\$\(BIN\)/(specdiff generate .*)$", makefile, re.M).group(1)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = re.search(r"^(specdiff generate .*?)\s+# what `make demo` runs$", readme, re.M).group(1)
    assert shown == demo.strip()


def test_the_defaults_table_in_the_docs_is_the_saved_benchmark():
    """docs/defaults.md shows exactly what ``bench_defaults --table`` renders from assets/bench/defaults.json."""
    import json

    from specdiff.workbench.bench_defaults import table

    result = json.loads((ROOT / "assets" / "bench" / "defaults.json").read_text())
    assert f"<!-- bench_defaults table -->\n{table(result)}\n<!-- /bench_defaults table -->" in (
        ROOT / "docs" / "defaults.md").read_text()
