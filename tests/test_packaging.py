"""A plain (non-editable) install is self-contained: the wheel holds the pipelines as
``specdiff.pipelines`` and the bundled models as ``specdiff.assets``, installs no other top-level
name, and the default ``specdiff generate`` runs from another folder."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(out)],
        check=True, cwd=out, capture_output=True,
    )  # fmt: skip
    (path,) = out.glob("specdiff-*.whl")
    return path


def test_the_wheel_holds_every_package_the_pipelines_and_the_models(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"specdiff"}  # no `pipelines`, no `assets`
    packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "specdiff").rglob("__init__.py")}
    for package in packages:
        assert f"{package}/__init__.py" in names, f"{package} is missing from the wheel (pyproject packages)"
    for pipeline in (ROOT / "pipelines").glob("*.py"):
        assert f"specdiff/pipelines/{pipeline.name}" in names
    for model in (ROOT / "assets" / "models").rglob("*"):
        if model.is_file():
            assert "specdiff/assets/" + model.relative_to(ROOT / "assets").as_posix() in names


def test_an_installed_copy_generates_from_another_folder(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    where = subprocess.run(
        [sys.executable, "-c", "import specdiff, specdiff.pipelines as p; print(specdiff.__file__, p.__file__)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert where.count(str(target)) == 2, where
    run = subprocess.run(
        [sys.executable, "-m", "specdiff", "generate", "--num-images", "1", "--steps", "10", "--window", "4",
         "--out", "out", "--no-progress"],
        cwd=elsewhere, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (elsewhere / "out" / "speculative.png").exists()
