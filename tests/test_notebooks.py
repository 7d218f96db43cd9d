"""The notebooks run as Jupyter runs them (a kernel started in notebooks/), each checking what it
claims in its own assert cells; they are stored without outputs (issue 11 §3)."""

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="Jupyter is in the dev extras: pip install -e '.[dev]'")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_why_exact.ipynb", "03_speed.ipynb", "04_discrete.ipynb", "05_langevin.ipynb"]


def test_every_notebook_is_covered():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NAMES, "add the new notebook to NAMES"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    cells = json.loads((NOTEBOOKS / name).read_text())["cells"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_from_the_notebooks_folder(name, monkeypatch, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # small tensors; 2 shared cores
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    before = sorted(p.name for p in NOTEBOOKS.iterdir())
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError (with the cell and traceback) if any cell fails
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "stream" for o in outputs), "the notebook printed nothing"
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before, "the notebook wrote files next to itself"
