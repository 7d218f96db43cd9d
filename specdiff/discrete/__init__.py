"""Masked (absorbing-state) discrete diffusion: scheduler, chain, and exact speculative sampling.

scheduler  MaskedDiffusionScheduler   the MDLM / MD4 ancestral kernel, diffusers-style
chain      MaskedDiffusionChain       scheduler + model as a CategoricalChain; test networks;
                                      exact output laws by enumeration
model      MaskedDiffusionTransformer (diffusers ModelMixin), the bundled model's network

The categorical coupling (joint step acceptance min(1, K/J), the exact (K - J)+ residual) is the
kernel :mod:`specdiff.kernels.categorical`; the samplers are :func:`specdiff.speculative_sample`
and :func:`specdiff.sample_baseline` (``speculative_sample_discrete`` / ``sample_baseline_discrete``
are the same functions under their earlier names).
"""

from ..kernels.categorical import (
    log_ratio,
    residual_acceptance_probability,
    sample_categorical,
    sample_residual,
    step_acceptance_probability,
    total_variation,
)
from ..sampler import sample_baseline_discrete, speculative_sample_discrete
from .chain import LookupDenoiser, MarkovDenoiser, MaskedDiffusionChain, exact_baseline_law, exact_speculative_law
from .scheduler import MaskedDiffusionScheduler, MaskedDiffusionSchedulerOutput

__all__ = [
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
