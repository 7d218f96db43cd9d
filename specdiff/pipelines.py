"""The speculative diffusers pipelines, as ``specdiff.pipelines.<Name>``.

They live in the top-level ``pipelines`` package (one file per pipeline, so each file also
loads as a diffusers custom pipeline); this module forwards to it. Pipelines with heavier
dependencies (Stable Diffusion needs ``transformers``) are imported on first use.
"""

import pipelines as _pipelines

__all__ = list(_pipelines.__all__)


def __getattr__(name: str):
    if name in __all__:
        return getattr(_pipelines, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
