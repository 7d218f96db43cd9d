"""specdiff: exact speculative sampling for diffusion models.

The core (chains, kernels, the round, drafters, stats) needs only torch; the diffusers
integration (``SpeculativeScheduler``, the masked-diffusion scheduler, ``specdiff.pipelines``)
is imported on first use.
"""

from importlib import import_module

from . import langevin  # noqa: F401  (specdiff.langevin: ULA for unnormalized densities)
from .chains import CategoricalChain, GaussianChain
from .drafters import Drafter, DraftMemory, FrozenTargetDrafter, ModelDrafter, PicardDrafter
from .kernels.gaussian import acceptance_probability, reflection_coupling
from .sampler import (
    SpeculativeOutput,
    sample_baseline,
    sample_baseline_discrete,
    speculative_sample,
    speculative_sample_discrete,
)
from .stats import SpeculativeStats

__version__ = "0.2.0"

_LAZY = {  # name -> module (imports diffusers)
    "SpeculativeScheduler": ".schedulers.speculative",
    "MaskedDiffusionScheduler": ".discrete.scheduler",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CategoricalChain",
    "DraftMemory",
    "Drafter",
    "FrozenTargetDrafter",
    "GaussianChain",
    "MaskedDiffusionScheduler",
    "ModelDrafter",
    "PicardDrafter",
    "SpeculativeOutput",
    "SpeculativeScheduler",
    "SpeculativeStats",
    "acceptance_probability",
    "reflection_coupling",
    "sample_baseline",
    "sample_baseline_discrete",
    "speculative_sample",
    "speculative_sample_discrete",
]
