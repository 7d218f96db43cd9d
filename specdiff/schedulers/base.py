"""Scheduler adapters: one diffusers scheduler step as a Gaussian kernel, by step index.

Given the model output, every supported scheduler's ``step`` draws
``x_prev = mean + std * z`` with ``z ~ N(0, I)`` and ``std`` fixed by the schedule. An
adapter computes that ``(mean, std)`` for many rows at once, each row at its own step
index, which is what a speculative verification batch needs.

Adapters read the scheduler's arrays (``alphas_cumprod``, ``sigmas``, ``timesteps``) once,
when they are built, and never call ``step()``: the live scheduler is never mutated and
its internal counters (``_step_index``, DPM-Solver's output buffer) play no part. The
per-step coefficients are computed one step at a time with the same floating-point
operations as diffusers, so a plain run through an adapter reproduces ``step()`` bit
for bit (float32).

Notation (diffusers' names): ``a_t = alphas_cumprod[t]``, ``a_prev = alphas_cumprod[t_prev]``
(1 past the end), ``x0`` the predicted clean sample, ``eps`` the predicted noise.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ..drafters import takes_sample
from ..kernels import GaussianKernel

ModelFn = Callable[..., Tensor]
"""``model_fn(model_input, timesteps) -> model_output``: the network, batched over rows,
one timestep per row (``timesteps`` are the scheduler's own, e.g. 999, 899, ...). A model
function that also takes a ``sample`` keyword receives the batch index of each row
(``LongTensor[rows]``), for per-sample conditioning (different prompts in one batch)."""


_ADAPTERS: dict[str, type[SchedulerAdapter]] = {}

SWITCH = (
    "or switch to its stochastic sibling, a different sampler with its own law: "
    "specdiff.schedulers.stochastic_sibling(scheduler) (--stochastic on the command line)"
)
"""How the refusal of a deterministic scheduler ends (the siblings: :mod:`specdiff.schedulers.names`)."""

# Schedulers we recognise but cannot accelerate exactly, and what to use instead.
_DETERMINISTIC = (
    "is a deterministic (ODE) solver: given the model output its step has no noise, so there is "
    "nothing for a maximal coupling to accept or correct. Use a stochastic scheduler instead: "
    "DDPMScheduler, DDIMScheduler with eta > 0, EulerAncestralDiscreteScheduler, or "
    f"DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++'); {SWITCH}"
)
_UNSUPPORTED: dict[str, str] = {
    name: _DETERMINISTIC
    for name in (
        "PNDMScheduler",
        "LMSDiscreteScheduler",
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "DEISMultistepScheduler",
        "UniPCMultistepScheduler",
        "IPNDMScheduler",
        "DDIMInverseScheduler",
        "FlowMatchHeunDiscreteScheduler",
        "EulerDiscreteScheduler",
        "EDMEulerScheduler",
    )
}
_UNSUPPORTED.update(
    {
        "DPMSolverSDEScheduler": (
            "draws its noise from a Brownian tree (torchsde): the noise of one step is correlated with "
            "the others, so the sampler is not a Markov chain with independent Gaussian steps and the "
            "step-by-step coupling does not apply. Use DPMSolverMultistepScheduler("
            "algorithm_type='sde-dpmsolver++') — the same DPM-Solver++ SDE with independent noise; " + SWITCH
        ),
        "CosineDPMSolverMultistepScheduler": (
            "draws its noise from a Brownian tree (correlated across steps), so the step-by-step coupling "
            "does not apply. Use DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++')"
        ),
        "KDPM2AncestralDiscreteScheduler": (
            "has two model evaluations per step (order 2), so one step is not one Gaussian kernel given one "
            "model output. Use EulerAncestralDiscreteScheduler or DPMSolverMultistepScheduler("
            "algorithm_type='sde-dpmsolver++'); " + SWITCH
        ),
        "DPMSolverSinglestepScheduler": (
            "is not supported yet (singlestep solvers interleave intermediate evaluations). Use "
            "DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++'); " + SWITCH
        ),
        "EDMDPMSolverMultistepScheduler": (
            "is not supported yet. Use DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++')"
        ),
    }
)


def register_adapter(*scheduler_names: str):
    """Class decorator: the decorated adapter handles the diffusers schedulers named. Every module
    of this package is imported on first look-up (:func:`_load_adapters`), so an adapter
    registers itself by living in a file here; nothing else has to list it."""

    def decorate(cls: type[SchedulerAdapter]) -> type[SchedulerAdapter]:
        for name in scheduler_names:
            _ADAPTERS[name] = cls
        cls.scheduler_names = scheduler_names
        return cls

    return decorate


def _load_adapters() -> None:
    """Import every module of this package once (each registers its adapters)."""
    if _LOADED:
        return
    _LOADED.append(True)
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{__package__}.{module.name}")


_LOADED: list[bool] = []


def supported_schedulers() -> list[str]:
    """Names of the diffusers scheduler classes an adapter exists for (the one list of them)."""
    _load_adapters()
    return sorted(_ADAPTERS)


def step_options() -> tuple[str, ...]:
    """The ``step()`` arguments some adapter declares in its ``options`` (e.g. DDIM's ``eta``): the
    only place they are listed; :class:`SpeculativeScheduler` reads them from here."""
    _load_adapters()
    return tuple(sorted({name for cls in _ADAPTERS.values() for name in cls.options}))


def supported_table() -> str:
    """The supported schedulers as the README's markdown table (a test keeps the README equal to it)."""
    rows = ["| scheduler | supported configurations | adapter |", "| --- | --- | --- |"]
    for name in supported_schedulers():
        cls = _ADAPTERS[name]
        rows.append(f"| `{name}` | {cls.support} | `{cls.__module__}.{cls.__name__}` |")
    return "\n".join(rows)


def check_scheduler_name(name: str) -> type[SchedulerAdapter]:
    """The adapter class for scheduler class ``name``; a clear ``ValueError`` if there is none."""
    _load_adapters()
    if name in _ADAPTERS:
        return _ADAPTERS[name]
    if name in _UNSUPPORTED:
        raise ValueError(f"{name} cannot be sampled speculatively: it {_UNSUPPORTED[name]}.")
    raise ValueError(
        f"{name} has no speculative adapter. Supported schedulers: {', '.join(supported_schedulers())}. "
        "Speculative sampling needs a stochastic scheduler whose step is Gaussian given the model output, "
        "with a std fixed by the schedule."
    )


def adapter_class_for(scheduler) -> type[SchedulerAdapter]:
    """The adapter class for a scheduler instance (its class or the nearest registered base class)."""
    _load_adapters()
    for klass in type(scheduler).__mro__:
        if klass.__name__ in _ADAPTERS or klass.__name__ in _UNSUPPORTED:
            return check_scheduler_name(klass.__name__)
    return check_scheduler_name(type(scheduler).__name__)


def adapter_for(scheduler, **options) -> SchedulerAdapter:
    """Build the adapter for ``scheduler`` at its current ``timesteps``.

    ``options`` are step arguments that diffusers passes to ``step()`` rather than keeping
    in the config (DDIM's ``eta`` and ``use_clipped_model_output``); ``None`` means unset.
    """
    cls = adapter_class_for(scheduler)
    return cls(scheduler, **cls.accepted_options(options))


def threshold_sample(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Dynamic thresholding (Imagen, Saharia et al. 2022), row by row, with diffusers'
    arithmetic: clamp each row to its ``ratio`` quantile of ``|x0|`` (at least 1, at most
    ``max_value``) and divide by it."""
    dtype = x0.dtype
    batch, channels, *rest = x0.shape
    if dtype not in (torch.float32, torch.float64):
        x0 = x0.float()  # quantile and clamp need full precision
    flat = x0.reshape(batch, channels * math.prod(rest))
    s = torch.quantile(flat.abs(), ratio, dim=1)
    s = torch.clamp(s, min=1, max=max_value).unsqueeze(1)
    flat = torch.clamp(flat, -s, s) / s
    return flat.reshape(batch, channels, *rest).to(dtype)


def step_table(values: list[Tensor]) -> Tensor:
    """Stack per-step 0-d tensors. The coefficients are computed one step at a time on
    0-d tensors, exactly as ``step()`` computes them, because vectorised transcendental
    kernels (exp, log) may round differently from the scalar ones."""
    return torch.stack([torch.as_tensor(v) for v in values])


class SchedulerAdapter:
    """Base class: the Gaussian step of one diffusers scheduler family.

    Subclasses validate with :meth:`check`, set per-step tables in ``__init__`` and
    implement :meth:`transition`. Families whose step is a function of x0 also define
    ``x0_from_output(model_output, x, step)`` and ``transition_from_x0(x, step, x0)``, so
    that a chain freezing x0 steps from it directly (no round trip through the model output).
    ``step`` arguments are always ``LongTensor[B]`` step indices (0 = first denoising step),
    one per row. To support a new scheduler family: subclass, decorate with
    :func:`register_adapter`, and add its configurations to ``tests/test_scheduler_adapters.py``.
    """

    scheduler_names: tuple[str, ...] = ()
    support: str = ""  # the configurations it handles, one line (the README's table)
    options: tuple[str, ...] = ()  # step() arguments the family needs (e.g. DDIM's eta)
    uses_previous_prediction = False
    prediction_types: tuple[str, ...] = ("epsilon", "sample", "v_prediction")
    native_prediction = "model_output"  # what `prediction()` returns: the raw model output by default

    def __init__(self, scheduler):
        self.scheduler_name = type(scheduler).__name__
        self.config = scheduler.config
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        self.timesteps = scheduler.timesteps.detach().cpu().clone()
        self.num_steps = len(self.timesteps)

    @classmethod
    def accepted_options(cls, options: dict) -> dict:
        given = {k: v for k, v in options.items() if v is not None}
        extra = sorted(set(given) - set(cls.options))
        if extra:
            raise ValueError(
                f"{', '.join(extra)} do(es) not apply to {'/'.join(cls.scheduler_names)} "
                f"(options for this scheduler: {', '.join(cls.options) or 'none'})"
            )
        return given

    @classmethod
    def check(cls, scheduler, **options) -> None:
        """Raise a clear ``ValueError`` if this configuration cannot be sampled speculatively
        (called before any table is built, and by :class:`SpeculativeScheduler` at construction)."""
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in cls.prediction_types:
            raise ValueError(
                f"{type(scheduler).__name__} with prediction_type={prediction_type!r} is not supported here "
                f"(supported: {', '.join(cls.prediction_types)})"
            )

    # -- per-row helpers ------------------------------------------------------------------

    def rows(self, table: Tensor, step: Tensor, like: Tensor) -> Tensor:
        """``table[step]`` shaped ``[B, 1, ..., 1]`` to broadcast over the rows of ``like``."""
        return _gather(_on(self, table, like.device, like.ndim), step)

    def at(self, table: Tensor, step: Tensor, like: Tensor) -> Tensor:
        """``table[step]`` as ``[B]`` on ``like``'s device (e.g. the std of each row)."""
        return _gather(_on(self, table, like.device, 1), step)

    def model_timesteps(self, step: Tensor, device) -> Tensor:
        """The scheduler timestep of each row's step (what the network is conditioned on)."""
        return self.timesteps[step.cpu()].to(device)

    # -- what a subclass provides ------------------------------------------------------------

    def scale_model_input(self, x: Tensor, step: Tensor) -> Tensor:
        """What the network sees at state ``x`` (diffusers' ``scale_model_input``)."""
        return x

    def prediction(self, model_output: Tensor, x: Tensor, step: Tensor) -> Tensor:
        """The quantity the chain carries between steps (and a frozen drafter reuses)."""
        return model_output

    def signal_and_noise(self, step: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, sigma)`` per row with ``x = alpha * x0 + sigma * eps`` in this scheduler's state space."""
        raise NotImplementedError

    def transition(
        self, x: Tensor, step: Tensor, prediction: Tensor, previous: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(mean, std)`` of each row's step; ``std`` has one value per row."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.scheduler_name}, {self.num_steps} steps)"


def _on(adapter: SchedulerAdapter, table: Tensor, device: torch.device, ndim: int) -> Tensor:
    """``table`` on ``device``, shaped ``[steps, 1, ..., 1]`` (``ndim`` dims), made once per adapter:
    a drafted step then gathers its coefficients with one index, the speculative loop's hot path."""
    cache = adapter.__dict__.setdefault("_tables_on", {})
    key = (id(table), device, ndim)
    hit = cache.get(key)
    if hit is None or hit[0] is not table:  # the id of a replaced table may be reused
        hit = cache[key] = (table, table.to(device).view(-1, *[1] * (ndim - 1)))
    return hit[1]


def _gather(table: Tensor, step: Tensor) -> Tensor:
    return table[step if step.device == table.device else step.to(table.device)]


# -- re-parameterising the prediction a frozen drafter freezes ------------------------------

FROZEN_PREDICTIONS = ("sample", "model_output", "epsilon", "v_prediction")


def _vp(adapter: SchedulerAdapter, x: Tensor, step: Tensor):
    """``(alpha, sigma, alpha_bar, sigma_bar, x_bar)``: the signal/noise scales and their
    variance-preserving normalisation, in which v-prediction is defined."""
    alpha, sigma = adapter.signal_and_noise(step, x)
    norm = (alpha.square() + sigma.square()).sqrt()
    return alpha, sigma, alpha / norm, sigma / norm, x / norm


def output_to(adapter: SchedulerAdapter, kind: str, output: Tensor, x: Tensor, step: Tensor) -> Tensor:
    """Convert a model output (of the scheduler's ``prediction_type``) at ``x`` to ``kind``."""
    if kind == adapter.prediction_type:
        return output
    work = torch.promote_types(x.dtype, torch.float32)
    output, x = output.to(work), x.to(work)
    alpha, sigma, a, s, xb = _vp(adapter, x, step)
    kind_in = adapter.prediction_type
    if kind_in == "epsilon":
        x0, eps = (x - sigma * output) / alpha, output
    elif kind_in == "sample":
        x0, eps = output, (x - alpha * output) / sigma
    else:  # v_prediction
        x0, eps = a * xb - s * output, s * xb + a * output
    if kind == "sample":
        return x0
    if kind == "epsilon":
        return eps
    return a * eps - s * x0  # v


def output_from(adapter: SchedulerAdapter, kind: str, value: Tensor, x: Tensor, step: Tensor) -> Tensor:
    """Inverse of :func:`output_to`: the model output that ``value`` (of ``kind``) stands for at ``x``."""
    if kind == adapter.prediction_type:
        return value
    work = torch.promote_types(x.dtype, torch.float32)
    value, x = value.to(work), x.to(work)
    alpha, sigma, a, s, xb = _vp(adapter, x, step)
    if kind == "sample":
        x0, eps = value, (x - alpha * value) / sigma
    elif kind == "epsilon":
        x0, eps = (x - sigma * value) / alpha, value
    else:  # v: x_bar = a x0 + s eps, v = a eps - s x0
        x0, eps = a * xb - s * value, s * xb + a * value
    kind_out = adapter.prediction_type
    if kind_out == "epsilon":
        return eps
    if kind_out == "sample":
        return x0
    return a * eps - s * x0


class SchedulerChain:
    """A :class:`specdiff.GaussianChain` made of a scheduler adapter and a model function.

    ``predict`` runs ``model_fn(scale_model_input(x), timesteps)`` on a batch of rows at
    their own steps; ``transition`` is the adapter's Gaussian step.

    ``frozen_prediction`` chooses what the chain carries between steps, hence what the
    frozen drafter freezes: ``"sample"`` (the predicted x0, before clipping; the default,
    it freezes best on the models we measured), ``"model_output"`` (whatever the network
    predicts), ``"epsilon"`` or ``"v_prediction"``. The chain's law does not depend on it,
    only acceptance does. ``"model_output"``, and ``"sample"`` for DDPM, Euler ancestral
    and DPM-Solver++, reproduce the scheduler's ``step()`` bit for bit; the other
    combinations convert between parameterisations and agree with it to float rounding.
    DPM-Solver++ always carries x0 (its next step needs the previous one).
    """

    kernel = GaussianKernel

    def __init__(self, adapter: SchedulerAdapter, model_fn: ModelFn, frozen_prediction: str = "sample"):
        if frozen_prediction not in FROZEN_PREDICTIONS:
            raise ValueError(f"frozen_prediction must be one of {FROZEN_PREDICTIONS}; got {frozen_prediction!r}")
        if adapter.native_prediction != "model_output":
            if frozen_prediction not in ("model_output", adapter.native_prediction):
                raise ValueError(
                    f"{adapter.scheduler_name} carries the {adapter.native_prediction!r} prediction between steps "
                    f"(its next step needs the previous one), so frozen_prediction must be "
                    f"{adapter.native_prediction!r}; got {frozen_prediction!r}"
                )
            self._mode = "native"
        elif frozen_prediction in ("model_output", adapter.prediction_type):
            self._mode = "native"
        elif frozen_prediction == "sample" and hasattr(adapter, "transition_from_x0"):
            self._mode = "x0"  # the adapter steps from x0 directly: no round trip through the model output
        else:
            self._mode = "convert"
        self.adapter = adapter
        self.model_fn = model_fn
        self.frozen_prediction = frozen_prediction
        self.num_steps = adapter.num_steps
        self.uses_previous_prediction = adapter.uses_previous_prediction
        self.uses_sample_index = takes_sample(model_fn)
        # The mean is shift + scale * x with an x-free shift (DDPM stepping from x0): see transition_affine.
        self.affine = self._mode == "x0" and hasattr(adapter, "affine_from_x0")

    def predict_with(self, model_fn: ModelFn, x: Tensor, step: Tensor, sample: Tensor | None = None) -> Tensor:
        """The chain's prediction at ``(x, step)`` computed by ``model_fn`` (the target's or a drafter's);
        ``sample`` (the batch index of each row) is passed on to a model function that takes it."""
        adapter = self.adapter
        extra = {"sample": sample} if sample is not None and takes_sample(model_fn) else {}
        output = model_fn(adapter.scale_model_input(x, step), adapter.model_timesteps(step, x.device), **extra)
        if self._mode == "x0":
            return adapter.x0_from_output(output, x, step)
        prediction = adapter.prediction(output, x, step)
        if self._mode == "convert":
            prediction = output_to(adapter, self.frozen_prediction, prediction, x, step)
        return prediction

    def predict(self, x: Tensor, step: Tensor, sample: Tensor | None = None) -> Tensor:
        return self.predict_with(self.model_fn, x, step, sample)

    def drafter(self, draft_model_fn: ModelFn) -> Callable[..., Tensor]:
        """A drafter ``predict(x, step, sample=None)`` from an independent (cheaper) model with the
        same schedule and ``model_fn``'s signature."""

        def predict(x: Tensor, step: Tensor, sample: Tensor | None = None) -> Tensor:
            return self.predict_with(draft_model_fn, x, step, sample)

        return predict

    def transition_affine(self, step: Tensor, prediction: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(shift, scale, std)`` with ``transition(x, step, prediction) == (shift + scale * x, std)``
        bit for bit, for a chain whose ``affine`` is True: the state-free part of many steps at once
        (the Gaussian kernel's ``draft_window``)."""
        return self.adapter.affine_from_x0(step, prediction)

    def transition(self, x: Tensor, step: Tensor, prediction: Tensor, previous: Tensor | None = None):
        if self._mode == "x0":
            return self.adapter.transition_from_x0(x, step, prediction)
        if self._mode == "convert":
            prediction = output_from(self.adapter, self.frozen_prediction, prediction, x, step)
        return self.adapter.transition(x, step, prediction, previous)

    def __repr__(self) -> str:
        return f"SchedulerChain({self.adapter!r}, frozen_prediction={self.frozen_prediction!r})"
