"""diffusers schedulers as Gaussian chains, and the speculative scheduler wrapper.

One adapter per scheduler family turns ``(scheduler, step index, x, model output)`` into the
step's ``(mean, std)``, vectorised over rows at different steps:

=========================================  ===========================================
diffusers scheduler                        adapter
=========================================  ===========================================
``DDPMScheduler`` (fixed variance types)   :class:`~specdiff.schedulers.ddpm.DDPMAdapter`
``DDIMScheduler`` with ``eta > 0``         :class:`~specdiff.schedulers.ddim.DDIMAdapter`
``EulerAncestralDiscreteScheduler``        :class:`~specdiff.schedulers.euler_ancestral.EulerAncestralAdapter`
``DPMSolverMultistepScheduler``            :class:`~specdiff.schedulers.dpmsolver_sde.DPMSolverSDEAdapter`
(``algorithm_type="sde-dpmsolver++"``)
``FlowMatchEulerDiscreteScheduler``        :class:`~specdiff.schedulers.flow_match.FlowMatchEulerAdapter`
(``stochastic_sampling=True``)
``LTXEulerAncestralRFScheduler``           :class:`~specdiff.schedulers.flow_match.LTXEulerAncestralAdapter`
(``eta > 0``)
:class:`FlowMatchSDEScheduler` (ours,      :class:`~specdiff.schedulers.flow_match.FlowMatchSDEAdapter`
``churn > 0``)
=========================================  ===========================================
"""

from .base import (
    SchedulerAdapter,
    SchedulerChain,
    adapter_class_for,
    adapter_for,
    register_adapter,
    supported_schedulers,
)
from .ddim import DDIMAdapter
from .ddpm import DDPMAdapter
from .dpmsolver_sde import DPMSolverSDEAdapter
from .euler_ancestral import EulerAncestralAdapter
from .flow_match import FlowMatchEulerAdapter, FlowMatchSDEAdapter, FlowMatchSDEScheduler, LTXEulerAncestralAdapter
from .speculative import SpeculativeScheduler

__all__ = [
    "DDIMAdapter",
    "DDPMAdapter",
    "DPMSolverSDEAdapter",
    "EulerAncestralAdapter",
    "FlowMatchEulerAdapter",
    "FlowMatchSDEAdapter",
    "FlowMatchSDEScheduler",
    "LTXEulerAncestralAdapter",
    "SchedulerAdapter",
    "SchedulerChain",
    "SpeculativeScheduler",
    "adapter_class_for",
    "adapter_for",
    "register_adapter",
    "supported_schedulers",
]
