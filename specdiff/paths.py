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
