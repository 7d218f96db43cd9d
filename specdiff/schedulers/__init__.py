"""diffusers schedulers as Gaussian chains, and the speculative scheduler wrapper.

One adapter per scheduler family (one file each, registered by being in this package) turns
``(scheduler, step index, x, model output)`` into the step's ``(mean, std)``, vectorised over
rows at different steps. The list of supported schedulers is :func:`supported_schedulers`
(:func:`supported_table` prints it as the README's table). Samplers by name (the command
line's ``--scheduler``) and :func:`stochastic_sibling` (``--stochastic``) are in :mod:`.names`.
"""

from .base import (
    SchedulerAdapter,
    SchedulerChain,
    adapter_class_for,
    adapter_for,
    register_adapter,
    supported_schedulers,
    supported_table,
)
from .ddim import DDIMAdapter
from .ddpm import DDPMAdapter
from .dpmsolver_sde import DPMSolverSDEAdapter
from .euler_ancestral import EulerAncestralAdapter
from .flow_match import FlowMatchEulerAdapter, FlowMatchSDEAdapter, FlowMatchSDEScheduler, LTXEulerAncestralAdapter
from .names import SAMPLERS, StochasticSibling, scheduler_from_name, stochastic_sibling
from .speculative import PlainStepWarning, SpeculativeScheduler

__all__ = [
    "SAMPLERS",
    "DDIMAdapter",
    "DDPMAdapter",
    "DPMSolverSDEAdapter",
    "EulerAncestralAdapter",
    "FlowMatchEulerAdapter",
    "FlowMatchSDEAdapter",
    "FlowMatchSDEScheduler",
    "LTXEulerAncestralAdapter",
    "PlainStepWarning",
    "SchedulerAdapter",
    "SchedulerChain",
    "SpeculativeScheduler",
    "StochasticSibling",
    "adapter_class_for",
    "adapter_for",
    "register_adapter",
    "scheduler_from_name",
    "stochastic_sibling",
    "supported_schedulers",
    "supported_table",
]
