"""specdiff: exact speculative sampling for diffusion models."""

from .chains import CategoricalChain, GaussianChain
from .coupling import acceptance_probability, reflection_coupling
from .drafters import Drafter, FrozenTargetDrafter, ModelDrafter
from .sampler import SpeculativeOutput, sample_baseline, speculative_sample
from .stats import SpeculativeStats
from .discrete import MaskedDiffusionScheduler, sample_baseline_discrete, speculative_sample_discrete
from .schedulers.speculative import SpeculativeScheduler  # diffusers wrapper (imports diffusers)

__version__ = "0.1.0"

__all__ = [
    "CategoricalChain",
    "Drafter",
    "FrozenTargetDrafter",
    "GaussianChain",
    "MaskedDiffusionScheduler",
    "ModelDrafter",
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
