"""``SpeculativeScheduler``: a diffusers scheduler that samples speculatively.

It wraps a supported stochastic diffusers scheduler (DDPM, DDIM with eta > 0, Euler
ancestral, DPM-Solver++ SDE) and keeps the wrapped scheduler's class name and config in
its own config, so a pipeline holding it saves and reloads offline with
``save_pretrained`` / ``from_pretrained``.

Speculation needs the whole trajectory at once (several steps per network call), so it
does not fit diffusers' one-step-at-a-time ``step()``. The wrapper therefore offers both:

* :meth:`SpeculativeScheduler.sample` owns the speculative loop: give it the model as a
  function ``model_fn(model_input, timesteps) -> model_output`` (one timestep per row) and
  the initial latents; it returns ``SpeculativeOutput(sample, stats)``. Its output has
  exactly the law of the wrapped scheduler's plain loop.
* ``set_timesteps``, ``timesteps``, ``init_noise_sigma``, ``scale_model_input``,
  ``add_noise`` and ``step`` delegate to the wrapped scheduler, so the wrapper stays a
  drop-in in a plain diffusers loop: plain sequential sampling, no speculation, exactly the
  wrapped scheduler's images (``step`` shows the wrapped ``step``'s signature, so diffusers'
  pipelines pass it their ``generator`` and ``eta``). The first ``step`` call warns
  (:class:`PlainStepWarning`) and names the speculative pipeline to use.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import ClassVar

import diffusers
import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from ..block import check_verify
from ..drafters import Drafter
from ..kernels import COUPLINGS
from ..noise import GeneratorArg
from ..sampler import SpeculativeOutput, sample_baseline, speculative_sample
from ..window import window_error
from .base import FROZEN_PREDICTIONS, ModelFn, SchedulerChain, adapter_class_for, check_scheduler_name, step_options


def _json_safe(value):
    """A scheduler config value as plain JSON data (it is stored inside our own config)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _scheduler_class(name: str | None):
    """A scheduler class by name: diffusers' own, or one that specdiff ships (FlowMatchSDEScheduler)."""
    from . import flow_match

    return getattr(diffusers, name, None) or getattr(flow_match, name, None) if name else None


def _scheduler_config(scheduler) -> dict:
    return {k: _json_safe(v) for k, v in dict(scheduler.config).items() if not k.startswith("_")}


class PlainStepWarning(UserWarning):
    """``SpeculativeScheduler.step()`` was called: a plain loop runs the wrapped scheduler one step at
    a time, without speculation (said once per scheduler)."""


# The speculative pipeline (in specdiff.pipelines) to use in place of each plain diffusers pipeline.
SPECULATIVE_PIPELINES = {
    "DDPMPipeline": "SpeculativeDDPMPipeline",
    "DDIMPipeline": "SpeculativeDDPMPipeline",
    "StableDiffusionPipeline": "SpeculativeStableDiffusionPipeline",
    "StableDiffusionXLPipeline": "SpeculativeStableDiffusionXLPipeline",
    "StableDiffusion3Pipeline": "SpeculativeStableDiffusion3Pipeline",
    "FluxPipeline": "SpeculativeFluxPipeline",
}


def _plain_step_message(base: str, caller) -> str:
    """What :class:`PlainStepWarning` says: the loop calling ``step()`` (``caller``: the ``self`` of
    the calling frame, a pipeline or anything else) gets no speculation; which pipeline to use."""
    names = [k.__name__ for k in type(caller).__mro__] if caller is not None else []
    plain = next((n for n in names if n in SPECULATIVE_PIPELINES), None)
    if plain is None:
        where = "a plain loop"
        use = ("a pipeline of specdiff.pipelines (SpeculativeDDPMPipeline, SpeculativeStableDiffusionPipeline, ...) "
               "or SpeculativeScheduler.sample(model_fn, latents)")
    else:
        where = f"{names[0]}'s loop"
        use = f"specdiff.pipelines.{SPECULATIVE_PIPELINES[plain]}.from_pipe(pipe, window=...)"
    return (f"SpeculativeScheduler.step() runs the wrapped {base} one step at a time: no speculation and no stats "
            f"in {where} (the images are the plain {base}'s). Speculation needs the whole trajectory: use {use}")


class SpeculativeScheduler(SchedulerMixin, ConfigMixin):
    """Speculative sampling (De Bortoli et al. 2025) around a stochastic diffusers scheduler.

    Build it with :meth:`from_scheduler`::

        pipe.scheduler = SpeculativeScheduler.from_scheduler(pipe.scheduler, window=8)

    Args:
        base_scheduler_class: name of the wrapped diffusers scheduler class.
        base_scheduler_config: its config (a plain dict).
        window: steps drafted per round (L); 1 is the plain sampler; ``"auto"`` (the default)
            chooses it before every round from the measured batch latency and the acceptance so far
            (:class:`specdiff.window.AutoWindow`).
        drafter: ``"picard"`` (the default: the target's last prediction, or its prediction at the
            drafted step from the last verify call where there is one; no network call) or
            ``"frozen"`` (the last prediction only). An independent draft model is passed at call
            time (:meth:`sample`'s ``drafter``).
        frozen_prediction: what the frozen drafter freezes: ``"sample"`` (predicted x0, the
            default), ``"model_output"``, ``"epsilon"`` or ``"v_prediction"``. Changes acceptance
            only, never the law (see :class:`~specdiff.schedulers.base.SchedulerChain`).
        eta, use_clipped_model_output: ``step()`` arguments that an adapter declares in its
            ``options`` (DDIM's; ``eta > 0`` required). They are the config's copy of
            :func:`~specdiff.schedulers.base.step_options`; a test keeps the two equal.
        coupling: ``"reflection"`` or ``"maximal"`` (see :mod:`specdiff.kernels`); ``None``: the chain's
            own (reflection, or maximal for a learned variance). Changes acceptance only, never the law.
        verify: ``"step"`` (each drafted step tested in order) or ``"block"`` (block verification: the
            window cut jointly). Changes acceptance only, never the law.
    """

    config_name = "scheduler_config.json"
    order = 1
    _compatibles: ClassVar[list[str]] = []

    @register_to_config
    def __init__(
        self,
        base_scheduler_class: str = "DDPMScheduler",
        base_scheduler_config: dict | None = None,
        window: int | str = "auto",
        drafter: str = "picard",
        frozen_prediction: str = "sample",
        eta: float | None = None,
        use_clipped_model_output: bool | None = None,
        coupling: str | None = None,
        verify: str = "step",
    ):
        adapter_cls = check_scheduler_name(base_scheduler_class)  # before instantiating (torchsde etc.)
        base_cls = _scheduler_class(base_scheduler_class)
        if base_cls is None or not issubclass(base_cls, SchedulerMixin):
            raise ValueError(f"{base_scheduler_class!r} is not a diffusers scheduler class")
        if window != "auto" and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
            raise ValueError(f"{window_error(window)} (the scheduler's config stores an integer or 'auto': pass a "
                             "list or a policy to sample(window=...) or to the pipeline call)")
        if drafter not in ("frozen", "picard"):
            raise ValueError(
                f"drafter={drafter!r}: the scheduler config stores 'picard' or 'frozen'; pass a draft model to "
                "sample(..., drafter=draft_model_fn) or to the pipeline (draft_unet=...)"
            )
        if frozen_prediction not in FROZEN_PREDICTIONS:
            raise ValueError(f"frozen_prediction must be one of {FROZEN_PREDICTIONS}; got {frozen_prediction!r}")
        if coupling not in (None, *COUPLINGS):
            raise ValueError(f"coupling must be one of {COUPLINGS} or None (the chain's own); got {coupling!r}")
        check_verify(verify)
        self._base = base_cls.from_config(dict(base_scheduler_config or {}))
        self._said_plain_step = False
        adapter_cls.check(self._base, **adapter_cls.accepted_options(self._step_options()))

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_scheduler(cls, scheduler, **options) -> SpeculativeScheduler:
        """Wrap a diffusers scheduler (a copy of it, built from its config; the original is not
        touched). ``options`` are this class's config arguments (:meth:`options`: ``window``,
        ``drafter``, ``frozen_prediction`` and the adapters' step options such as DDIM's ``eta``).
        Wrapping a ``SpeculativeScheduler`` returns a new one with the options updated."""
        if isinstance(scheduler, SpeculativeScheduler):
            merged = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
            merged.update(options)
            return cls(**merged)
        unknown = sorted(set(options) - set(cls.options()))
        if unknown:
            raise TypeError(f"unknown SpeculativeScheduler option(s): {', '.join(unknown)}")
        adapter_class_for(scheduler)  # a clear error for unsupported classes, before anything else
        return cls(
            base_scheduler_class=type(scheduler).__name__, base_scheduler_config=_scheduler_config(scheduler), **options
        )

    @classmethod
    def wrap_pipeline_scheduler(cls, kwargs: dict, pipeline=None):
        """For a pipeline's ``from_pipe``: pop this class's :meth:`options` from ``kwargs`` and,
        if any were given, re-wrap ``pipe.scheduler`` with them; returns a callable doing that
        to the new pipeline. Given the source ``pipeline``, the scheduler is wrapped up front
        (``kwargs["scheduler"]``), so options the new pipeline's constructor needs (DDIM's
        ``eta``) reach it."""
        options = {k: kwargs.pop(k) for k in cls.options() if k in kwargs}
        if options and pipeline is not None:
            kwargs["scheduler"] = cls.from_scheduler(kwargs.get("scheduler", pipeline.scheduler), **options)
            options = {}

        def apply(new_pipe):
            if options:
                new_pipe.scheduler = cls.from_scheduler(new_pipe.scheduler, **options)
            return new_pipe

        return apply

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The options a user sets on the wrapper (``window``, ``drafter``, ``frozen_prediction``,
        and the step options the adapters declare), i.e. the config minus the wrapped scheduler."""
        names = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        return tuple(p for p in names if not p.startswith("base_scheduler_"))

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Load a SpeculativeScheduler config; a saved config of a plain diffusers scheduler
        (``_class_name`` set) is wrapped. A live plain config has no class name: use
        :meth:`from_scheduler` for it."""
        if isinstance(config, Mapping):
            name = config.get("_class_name")
            if name not in (None, cls.__name__) and _scheduler_class(name) is not None:
                options = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.options()}
                base = _scheduler_class(name).from_config(config, **kwargs)
                wrapped = cls.from_scheduler(base, **options)
                return (wrapped, {}) if return_unused_kwargs else wrapped
            foreign = name is None and "base_scheduler_class" not in config and "base_scheduler_config" not in config
            if foreign and any(not k.startswith("_") for k in config):
                raise ValueError(
                    "SpeculativeScheduler.from_config got the config of another scheduler; wrap the scheduler "
                    "itself instead: SpeculativeScheduler.from_scheduler(pipe.scheduler, window=...)"
                )
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # -- the wrapped scheduler ----------------------------------------------------------------

    @property
    def base_scheduler(self):
        """The wrapped diffusers scheduler (live: ``set_timesteps`` acts on it)."""
        return self._base

    def _step_options(self, **overrides) -> dict:
        options = {k: self.config[k] for k in step_options()}
        options.update({k: v for k, v in overrides.items() if v is not None})
        return options

    def __getattr__(self, name: str):
        # Config attributes first (ConfigMixin's deprecated access), then the wrapped scheduler's
        # attributes (sigmas, alphas_cumprod, step_index, ...), so the wrapper stays a drop-in.
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_base")
            if base is None or name.startswith("__"):
                raise
            return getattr(base, name)

    def __len__(self) -> int:
        return len(self._base)

    @property
    def timesteps(self) -> Tensor:
        return self._base.timesteps

    @property
    def num_inference_steps(self) -> int | None:
        return self._base.num_inference_steps

    @property
    def init_noise_sigma(self):
        return getattr(self._base, "init_noise_sigma", 1.0)  # flow-matching schedulers have none (N(0, I) prior)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None, **kwargs):
        """The wrapped scheduler's ``set_timesteps`` (custom ``timesteps``/``sigmas`` if it accepts them)."""
        if timesteps is not None:
            kwargs["timesteps"] = timesteps
        if sigmas is not None:
            kwargs["sigmas"] = sigmas
        if num_inference_steps is not None:
            kwargs["num_inference_steps"] = num_inference_steps
        return self._base.set_timesteps(device=device, **kwargs)

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        if not hasattr(self._base, "scale_model_input"):  # flow-matching schedulers: the input is unscaled
            return sample
        return self._base.scale_model_input(sample, timestep)

    @property
    def step(self) -> Callable:
        """The wrapped scheduler's ``step``, for a plain diffusers loop (one step per call, no
        speculation: :meth:`sample` speculates). It has the wrapped ``step``'s signature, because
        diffusers' pipelines pass ``generator=`` and ``eta=`` only to a ``step`` that names them;
        every argument reaches the wrapped ``step`` as given, and the wrapper's step options
        (DDIM's ``eta``) fill those the call leaves out. The first call warns
        (:class:`PlainStepWarning`), naming the speculative pipeline to use."""
        base_step = self._base.step
        signature = inspect.signature(base_step)

        def step(*args, **kwargs):
            given = signature.bind_partial(*args, **kwargs).arguments  # the wrapped step's TypeError for bad ones
            if not self._said_plain_step:
                self._said_plain_step = True
                caller = inspect.currentframe().f_back.f_locals.get("self")
                message = _plain_step_message(self.config.base_scheduler_class, caller)
                warnings.warn(message, PlainStepWarning, stacklevel=2)
            for name in step_options():
                if name in signature.parameters and name not in given and self.config[name] is not None:
                    kwargs[name] = self.config[name]
            return base_step(*args, **kwargs)

        step.__signature__ = signature
        return step

    # -- speculative sampling -----------------------------------------------------------------

    def adapter(self, **step_options):
        """The Gaussian-step adapter of the wrapped scheduler at its current timesteps. Its per-step
        tables take 2-500 ms to build at 1000 steps, and a pipeline asks for them on every call: the
        last one is kept while the config, the options and the timesteps (and sigmas) are the same."""
        adapter_cls = adapter_class_for(self._base)
        options = adapter_cls.accepted_options(self._step_options(**step_options))
        sigmas = getattr(self._base, "sigmas", None)
        key = (adapter_cls, repr(sorted(options.items())), repr(sorted(dict(self._base.config).items())),
               self._base.timesteps.tolist(), sigmas.tolist() if isinstance(sigmas, torch.Tensor) else None)
        kept = getattr(self, "_kept_adapter", None)
        if kept is not None and kept[0] == key:
            return kept[1]
        adapter_cls.check(self._base, **options)
        adapter = adapter_cls(self._base, **options)
        self._kept_adapter = (key, adapter)
        return adapter

    def chain(self, model_fn: ModelFn, frozen_prediction: str | None = None, **step_options) -> SchedulerChain:
        """The :class:`specdiff.GaussianChain` of the wrapped scheduler driven by ``model_fn``
        (for :func:`specdiff.sample_baseline` / :func:`specdiff.speculative_sample`)."""
        frozen = frozen_prediction if frozen_prediction is not None else self.config.frozen_prediction
        return SchedulerChain(self.adapter(**step_options), model_fn, frozen_prediction=frozen)

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        latents: Tensor,
        *,
        num_inference_steps: int | None = None,
        generator: GeneratorArg = None,
        window: int | None = None,
        drafter: str | ModelFn | Drafter | None = None,
        frozen_prediction: str | None = None,
        max_rows: int | str | None = "auto",
        progress: bool | Callable = False,
        callback: Callable[[dict], None] | None = None,
        coupling: str | None = None,
        verify: str | None = None,
        **step_options,
    ) -> SpeculativeOutput:
        """Run the whole sampler speculatively from ``latents`` (already scaled by
        ``init_noise_sigma``); returns ``SpeculativeOutput(sample, stats)``.

        Args:
            model_fn: ``model_fn(model_input, timesteps) -> model_output``, batched, one timestep
                per row; it receives ``scale_model_input`` of the state.
            num_inference_steps: if given, ``set_timesteps(num_inference_steps)`` first.
            generator: one ``torch.Generator`` for the batch or a list, one per sample; the
                step noise is drawn as the wrapped scheduler draws it, so ``window=1`` reproduces
                its plain loop (in float32 or wider: fp16/bf16 latents get float32 noise, rounded
                after the step, where diffusers draws it in the latents' dtype).
            window: steps per round (default: the config's).
            drafter: ``"picard"``/``"frozen"`` (default: the config's), a draft model function with ``model_fn``'s
                signature (an independent cheaper model with the same schedule), or a :class:`specdiff.Drafter`
                working on the chain's predictions.
            max_rows: the most states per network call (larger verify batches run as exact
                micro-batches); ``"auto"``: no cap on CPU, fitted to free memory on CUDA.
            progress: ``True`` for a tqdm bar, or ``progress(total=) -> tqdm``-like.
            callback: called after every round with ``{"round", "x", "step", "stats"}``.
            coupling, verify: for this call (default: the config's; see the class's arguments).
            step_options: DDIM's ``eta`` / ``use_clipped_model_output`` for this call.
        """
        if num_inference_steps is not None:
            self.set_timesteps(num_inference_steps, device=latents.device)
        chain = self.chain(model_fn, frozen_prediction=frozen_prediction, **step_options)
        drafter = self.config.drafter if drafter is None else drafter
        if drafter not in ("frozen", "picard") and not isinstance(drafter, Drafter):
            if not callable(drafter):
                raise TypeError(
                    f"drafter must be 'picard', 'frozen', a model function or a specdiff.Drafter; got {drafter!r}"
                )
            drafter = chain.drafter(drafter)
        return speculative_sample(
            chain,
            latents,
            window=self.config.window if window is None else window,
            drafter=drafter,
            generator=generator,
            max_rows=max_rows,
            progress=progress,
            callback=callback,
            coupling=self.config.coupling if coupling is None else coupling,
            verify=self.config.get("verify", "step") if verify is None else verify,
        )

    @torch.no_grad()
    def sample_baseline(
        self,
        model_fn: ModelFn,
        latents: Tensor,
        *,
        num_inference_steps: int | None = None,
        generator: GeneratorArg = None,
        progress: bool | Callable = False,
        **step_options,
    ) -> Tensor:
        """The plain sequential sampler through the same adapter (one network call per step)."""
        if num_inference_steps is not None:
            self.set_timesteps(num_inference_steps, device=latents.device)
        return sample_baseline(self.chain(model_fn, **step_options), latents, generator=generator, progress=progress)

    def __repr__(self) -> str:
        return (
            f"SpeculativeScheduler({self.config.base_scheduler_class}, window={self.config.window}, "
            f"drafter={self.config.drafter!r})\n{self.to_json_string()}"
        )
