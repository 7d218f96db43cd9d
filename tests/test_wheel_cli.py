"""The README's commands from a plain (non-editable) install, run from another folder (issue 20, item 6):
the text command finds the bundled model by its checkout path, and ``specdiff bench`` would write under
./outputs, never into the installed package."""

import json
import subprocess
import sys

import pytest
from test_packaging import wheel  # noqa: F401  (the module-scoped fixture: the wheel, built once here)


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("installed")
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return target, elsewhere, {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(root)}


def test_the_readme_text_command_and_bench_from_an_installed_copy(installed):
    """One interpreter (start-up dominates): the README's text command with the model's checkout path, and
    where ``specdiff bench`` would write (its own run is minutes; tests/test_cli.py checks the hand-over)."""
    target, elsewhere, env = installed
    script = (
        "import sys; from specdiff.cli import _bench_argv, _installed, main\n"
        "print('bench:', _installed(), _bench_argv(['analytic', '--quick']))\n"
        "sys.exit(main(['generate', '--model', 'assets/models/stdlib-text', '--prompt', 'Return the ', '--length',"
        " '8', '--steps', '4', '--window', '2', '--num-images', '1', '--out', 'text', '--no-progress']))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert "bench: True ['analytic', '--quick', '--out', 'outputs/bench']" in run.stdout
    assert "Return the " in run.stdout
    model = json.loads((elsewhere / "text" / "stats.json").read_text())["model"]
    assert model.startswith(str(target))  # the installed package's model
