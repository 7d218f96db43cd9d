"""The notebooks run top to bottom (code cells in order, plots off-screen) and show what they claim."""

import json
from pathlib import Path

import matplotlib
import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_notebook(name, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(ROOT)
    cells = [c for c in json.loads((ROOT / "notebooks" / name).read_text())["cells"] if c["cell_type"] == "code"]
    namespace = {"__name__": "__notebook__"}
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"{name}[cell {i}]", "exec"), namespace)  # noqa: S102
    return namespace


def test_tour_notebook_runs_and_its_samples_match_the_plain_sampler(monkeypatch):
    ns = run_notebook("tour.ipynb", monkeypatch)
    for window, out in ns["results"].items():
        assert ns["two_sample_test"](out.sample, ns["plain"]).passed, window
    assert ns["results"][16].stats.speedup > 2
    assert ns["out"].images.shape == (16, 1, 16, 16)


def test_every_notebook_is_covered():
    assert sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")) == ["tour.ipynb"], (
        "add a test that runs the new notebook"
    )
