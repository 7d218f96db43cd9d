"""Every python example in the README outside "Use it in diffusers" (which
test_readme_diffusers.py runs) runs as written, from a scratch folder."""

import re
from pathlib import Path

import matplotlib
import pytest

ROOT = Path(__file__).resolve().parents[1]


def sections_with_python(text: str) -> dict[str, list[str]]:
    blocks, heading, current = {}, None, None
    for line in text.splitlines(keepends=True):
        if current is None and re.match(r"## ", line):
            heading = line[3:].strip()
        elif line.strip() == "```python" and current is None:
            current = []
        elif line.startswith("```") and current is not None:
            blocks.setdefault(heading, []).append("".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


SECTIONS = {k: v for k, v in sections_with_python((ROOT / "README.md").read_text()).items() if k != "Use it in diffusers"}


def test_the_readme_has_python_examples():
    assert {"Use it from Python", "Discrete (masked) diffusion"} <= set(SECTIONS)


@pytest.mark.parametrize("heading", sorted(SECTIONS))
def test_readme_example_runs(heading, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    namespace = {"__name__": "__readme__"}
    for i, block in enumerate(SECTIONS[heading]):
        exec(compile(block, f"README[{heading}][{i}]", "exec"), namespace)  # noqa: S102
    assert "out" in namespace and namespace["out"].stats.target_calls > 0


def test_readme_benchmark_tables_are_the_saved_results():
    """The README's numbers are exactly what `python -m specdiff.workbench.bench report` prints."""
    from specdiff.workbench.bench import report

    text = (ROOT / "README.md").read_text()
    shown = text.split("<!-- bench-report -->\n", 1)[1].split("\n<!-- /bench-report -->", 1)[0]
    assert shown.strip() == report(ROOT / "assets" / "bench").strip()


def test_the_readme_lists_exactly_the_supported_schedulers():
    from specdiff.schedulers import supported_table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("<!-- schedulers:start -->\n")[1].split("\n<!-- schedulers:end -->")[0]
    assert block == supported_table()
