"""Masked (absorbing-state) discrete diffusion: scheduler, chain, and exact speculative sampling.

scheduler  MaskedDiffusionScheduler   the MDLM / MD4 ancestral kernel, diffusers-style
chain      MaskedDiffusionChain       scheduler + model as a CategoricalChain; test networks;
                                      exact output laws by enumeration
coupling   joint step acceptance min(1, K/J) and the exact (K - J)+ residual by rejection
sampler    sample_baseline_discrete (plain / cached), speculative_sample_discrete
model      MaskedDiffusionTransformer (diffusers ModelMixin)
"""

from .chain import LookupDenoiser, MarkovDenoiser, MaskedDiffusionChain, exact_baseline_law, exact_speculative_law
from .coupling import (
    log_ratio,
    residual_acceptance_probability,
    sample_residual,
    step_acceptance_probability,
    total_variation,
)
from .sampler import CategoricalNoise, sample_baseline_discrete, speculative_sample_discrete
from .scheduler import MaskedDiffusionScheduler, MaskedDiffusionSchedulerOutput, sample_categorical

__all__ = [
    "CategoricalNoise",
    "LookupDenoiser",
    "MarkovDenoiser",
    "MaskedDiffusionChain",
    "MaskedDiffusionScheduler",
    "MaskedDiffusionSchedulerOutput",
    "exact_baseline_law",
    "exact_speculative_law",
    "log_ratio",
    "residual_acceptance_probability",
    "sample_baseline_discrete",
    "sample_categorical",
    "sample_residual",
    "speculative_sample_discrete",
    "step_acceptance_probability",
    "total_variation",
]
