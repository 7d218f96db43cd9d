"""Where the bundled models and benchmark results are, in a checkout or after any install."""

from __future__ import annotations

from pathlib import Path


def asset(*parts: str) -> Path:
    """The path of ``assets/<parts...>`` (e.g. ``asset("models", "digits-ddpm")``).

    Installed, the repository's ``assets/`` folder is the data package ``specdiff.assets``;
    in a checkout that is not installed it is the folder next to ``specdiff/``.
    """
    try:
        from importlib.resources import files

        root = Path(str(files("specdiff.assets")))
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parent.parent / "assets"
    return root.joinpath(*parts)


def checkout() -> Path | None:
    """The repository's root when specdiff runs from a checkout (installed editable or not), else
    ``None`` (an installed wheel, whose folders must never be written to)."""
    root = asset().parent
    return root if (root / "pyproject.toml").exists() else None


def results(*parts: str) -> Path:
    """Where a benchmark writes by default: a checkout's ``assets/bench`` (the saved results its docs
    show), or ``./outputs/bench`` from a wheel."""
    root = checkout()
    return (root / "assets" / "bench" if root else Path("outputs") / "bench").joinpath(*parts)


def docs_page(name: str) -> Path:
    """A benchmark's page: a checkout's ``docs/<name>``, or ``./outputs/docs/<name>`` from a wheel."""
    root = checkout()
    return (root / "docs" if root else Path("outputs") / "docs") / name
