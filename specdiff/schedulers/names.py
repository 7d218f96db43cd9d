"""Samplers by name (``specdiff generate --scheduler NAME``), and the stochastic sibling of a
deterministic scheduler (``--stochastic``).

A name stands for a diffusers scheduler class and the config overrides that make it that
sampler; the scheduler is built the diffusers way, from the model's own scheduler config:
``Class.from_config(pipe.scheduler.config, **overrides)``, so the noise schedule (betas,
timestep spacing, prediction type, shift) stays the model's. Names of deterministic solvers
are known too, and refused with the name of their stochastic sibling.

The stochastic sibling of a deterministic scheduler (Euler -> Euler ancestral, DPM++ 2M -> DPM++
2M SDE, PNDM -> DDPM, DDIM eta=0 -> DDIM eta=1, flow-matching Euler -> its stochastic sampling) is a
**different sampler**: it draws fresh noise at every step, so its images do not have the law of
the deterministic sampler's (which is a deterministic function of the initial noise). Both
approximate the model's distribution; speculation then samples the sibling's law exactly.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import diffusers

from .base import SWITCH, adapter_class_for

__all__ = [
    "SAMPLERS",
    "SWITCH",
    "Sampler",
    "StochasticSibling",
    "sampler",
    "sampler_table",
    "scheduler_from_name",
    "sibling_table",
    "stochastic_sibling",
]


@dataclass(frozen=True)
class Sampler:
    """One ``--scheduler`` name: a scheduler class and the overrides that make it this sampler."""

    name: str
    class_name: str
    overrides: dict
    title: str  # what users call it
    family: str  # "diffusion" (a noise-level model: DDPM, SD, SDXL) or "flow" (flow matching: SD3, FLUX)
    step_options: tuple[str, ...] = ()  # step() arguments it needs (DDIM's eta), not config entries

    @property
    def scheduler_class(self):
        from .speculative import _scheduler_class  # diffusers' classes and specdiff's own

        return _scheduler_class(self.class_name)


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("ddpm", "DDPMScheduler", {}, "DDPM ancestral sampling", "diffusion"),
        Sampler("ddim", "DDIMScheduler", {}, "DDIM with eta > 0", "diffusion", ("eta",)),
        Sampler("euler-a", "EulerAncestralDiscreteScheduler", {}, "Euler ancestral", "diffusion"),
        Sampler("dpmpp-2m-sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
                "DPM++ 2M SDE", "diffusion"),
        Sampler("flow-euler-stochastic", "FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True},
                "flow-matching Euler with stochastic_sampling", "flow"),
        Sampler("flow-sde", "FlowMatchSDEScheduler", {}, "specdiff's flow-matching SDE (Euler-Maruyama, churn)",
                "flow"),
    )
}

# Names of deterministic (or otherwise unsupported) samplers -> the stochastic name to use instead.
DETERMINISTIC: dict[str, str] = {
    "euler": "euler-a",
    "heun": "euler-a",
    "lms": "euler-a",
    "dpm2": "euler-a",
    "dpm2-a": "euler-a",
    "pndm": "ddpm",
    "dpmpp-2m": "dpmpp-2m-sde",
    "dpmpp-sde": "dpmpp-2m-sde",  # diffusers' DPMSolverSDEScheduler: Brownian-tree noise, correlated across steps
    "dpmpp-2s": "dpmpp-2m-sde",
    "unipc": "dpmpp-2m-sde",
    "deis": "dpmpp-2m-sde",
    "flow-euler": "flow-euler-stochastic",
    "flow-heun": "flow-euler-stochastic",
}

# Config entries a user may set on top of a name (the command line's --karras-sigmas, --churn).
CONFIG_OPTIONS = ("use_karras_sigmas", "churn")

# Deterministic scheduler class -> the name of its stochastic sibling.
_SIBLINGS = {
    "EulerDiscreteScheduler": "euler-a",
    "HeunDiscreteScheduler": "euler-a",
    "LMSDiscreteScheduler": "euler-a",
    "KDPM2DiscreteScheduler": "euler-a",
    "KDPM2AncestralDiscreteScheduler": "euler-a",
    "PNDMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "DDIMParallelScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpmpp-2m-sde",
    "DPMSolverSinglestepScheduler": "dpmpp-2m-sde",
    "DPMSolverSDEScheduler": "dpmpp-2m-sde",
    "UniPCMultistepScheduler": "dpmpp-2m-sde",
    "DEISMultistepScheduler": "dpmpp-2m-sde",
    "FlowMatchEulerDiscreteScheduler": "flow-euler-stochastic",
    "FlowMatchHeunDiscreteScheduler": "flow-euler-stochastic",
}

# Flow-matching schedulers (the network predicts a velocity) by class-name prefix.
_FLOW_PREFIXES = ("FlowMatch", "LTXEulerAncestralRF")


def sampler(name: str) -> Sampler:
    """The :class:`Sampler` called ``name``; a clear ``ValueError`` naming the choices otherwise."""
    if name in SAMPLERS:
        return SAMPLERS[name]
    choices = ", ".join(SAMPLERS)
    if name in DETERMINISTIC:
        raise ValueError(
            f"{name} is a deterministic solver (or draws correlated noise): speculative sampling needs a stochastic "
            f"one. Its stochastic sibling is {DETERMINISTIC[name]} (a different sampler); the samplers: {choices}"
        )
    raise ValueError(f"unknown sampler {name!r}; the samplers: {choices}")


def family_of(scheduler) -> str:
    """``"flow"`` for a flow-matching scheduler (the model predicts a velocity), else ``"diffusion"``."""
    scheduler = _unwrapped(scheduler)
    name = type(scheduler).__name__
    if name.startswith(_FLOW_PREFIXES) or scheduler.config.get("use_flow_sigmas", False):
        return "flow"
    return "diffusion"


def config_options(name: str) -> tuple[str, ...]:
    """The :data:`CONFIG_OPTIONS` that sampler ``name``'s scheduler class takes."""
    params = inspect.signature(sampler(name).scheduler_class.__init__).parameters
    return tuple(option for option in CONFIG_OPTIONS if option in params)


def scheduler_from_name(name: str, scheduler, **options):
    """Sampler ``name`` built from ``scheduler``'s config (the model's own scheduler, which is not
    touched): ``Class.from_config(scheduler.config, **overrides, **options)``.

    ``options`` are config entries among :data:`CONFIG_OPTIONS` that the class takes
    (``use_karras_sigmas``, ``churn``); ``None`` means unset. Step options (DDIM's ``eta``) are
    not config: pass them to ``SpeculativeScheduler.from_scheduler`` or the pipeline. A schedule
    without ``clip_sample`` in its config never clipped, so a DDPM/DDIM built from it does not
    either (their own default clips)."""
    entry = sampler(name)
    base = _unwrapped(scheduler)
    if family_of(base) != entry.family:
        fitting = ", ".join(n for n, s in SAMPLERS.items() if s.family == family_of(base))
        kind = "flow-matching" if entry.family == "flow" else "noise-level (DDPM-style)"
        raise ValueError(
            f"{name} is a sampler for {kind} models, and this model's scheduler is {type(base).__name__}; "
            f"its samplers: {fitting}"
        )
    given = {k: v for k, v in options.items() if v is not None}
    allowed = config_options(name)
    extra = sorted(set(given) - set(allowed))
    if extra:
        raise ValueError(f"{', '.join(extra)} does not apply to {name} ({entry.class_name}; its options: "
                         f"{', '.join(allowed) or 'none'})")
    overrides = dict(entry.overrides)
    params = inspect.signature(entry.scheduler_class.__init__).parameters
    if "clip_sample" in params and "clip_sample" not in base.config:
        overrides["clip_sample"] = False
    return entry.scheduler_class.from_config(base.config, **overrides, **given)


def sampler_table() -> str:
    """The samplers as a markdown table (docs/cli-schedulers.md; a test keeps the page equal to it)."""
    rows = ["| `--scheduler` | sampler | built as | options | models |", "| --- | --- | --- | --- | --- |"]
    flags = {"eta": "`--eta` (required, in (0, 1])", "use_karras_sigmas": "`--karras-sigmas`", "churn": "`--churn`"}
    for name, entry in SAMPLERS.items():
        overrides = "".join(f", {k}={v!r}" for k, v in entry.overrides.items())
        options = [flags[o] for o in (*entry.step_options, *config_options(name))]
        models = "flow matching (SD3, FLUX)" if entry.family == "flow" else "noise-level (DDPM, SD, SDXL)"
        rows.append(f"| `{name}` | {entry.title} | `{entry.class_name}.from_config(config{overrides})` | "
                    f"{', '.join(options) or '-'} | {models} |")
    return "\n".join(rows)


def sibling_table() -> str:
    """The stochastic siblings as a markdown table (docs/cli-schedulers.md)."""
    rows = ["| deterministic scheduler | `--stochastic` runs |", "| --- | --- |"]
    for name, target in _SIBLINGS.items():
        runs = "the same scheduler with `eta=1.0` (or `--eta`)" if target == "ddim" else (
            f"`{target}`: `{SAMPLERS[target].class_name}`")
        rows.append(f"| `{name}` | {runs} |")
    return "\n".join(rows)


@dataclass(frozen=True)
class StochasticSibling:
    """A stochastic scheduler standing in for a deterministic one: ``scheduler`` (new, built from
    the original's config), the step ``options`` to sample it with (DDIM's ``eta``), its
    ``--scheduler`` ``name`` and a one-sentence ``note`` on what changed."""

    scheduler: object
    options: dict = field(default_factory=dict)
    name: str | None = None
    note: str = ""

    def speculative(self, **options):
        """``SpeculativeScheduler.from_scheduler(self.scheduler, **self.options, **options)``."""
        from .speculative import SpeculativeScheduler

        return SpeculativeScheduler.from_scheduler(self.scheduler, **{**self.options, **options})


def stochastic_sibling(scheduler, *, eta: float = 1.0) -> StochasticSibling:
    """The stochastic sibling of a deterministic diffusers scheduler, which speculative sampling can run.

    Euler, Heun, LMS, KDPM2 -> Euler ancestral; DPM++ 2M (``DPMSolverMultistepScheduler``
    with ``algorithm_type="dpmsolver++"``), DPM-Solver singlestep, the Brownian-tree DPM++ SDE,
    UniPC, DEIS -> DPM++ 2M SDE (``algorithm_type="sde-dpmsolver++"``, solver order at most 2);
    PNDM -> DDPM on the same timesteps; DDIM with ``eta=0`` -> DDIM with ``eta`` (default 1.0:
    DDPM's posterior noise on the DDIM timesteps), returned in ``options`` since ``eta`` is a
    ``step()`` argument; flow-matching Euler/Heun -> ``FlowMatchEulerDiscreteScheduler`` with
    ``stochastic_sampling=True`` (specdiff's ``FlowMatchSDEScheduler`` where the installed diffusers
    lacks it). The noise schedule is the original's. A scheduler that is already supported comes
    back unchanged (a copy).

    **The sibling is a different sampler**: its images do not have the deterministic sampler's
    law (see the module docstring). ``sibling.speculative(window=8)`` wraps it.
    """
    from .speculative import SpeculativeScheduler

    if not 0 < eta <= 1:
        raise ValueError(f"eta must be in (0, 1] (1.0 = DDPM's posterior noise); got {eta}")
    if isinstance(scheduler, SpeculativeScheduler):
        if scheduler.config.get("eta"):
            eta = scheduler.config["eta"]
        scheduler = scheduler.base_scheduler
    name = type(scheduler).__name__
    copy = type(scheduler).from_config(scheduler.config)
    if "DDIM" in name and name in _SIBLINGS:
        return StochasticSibling(copy, {"eta": eta}, "ddim", (
            f"{name} with eta={eta} instead of eta=0: fresh noise at every step (eta=1.0 is DDPM's posterior "
            "noise on the DDIM timesteps); a different sampler from deterministic DDIM"))
    try:
        adapter_class_for(scheduler).check(scheduler)
        return StochasticSibling(copy, {}, None, f"{name} is already stochastic: unchanged")
    except ValueError:
        if name not in _SIBLINGS:
            raise ValueError(f"{name} has no stochastic sibling here; choose a sampler by name: "
                             f"{', '.join(SAMPLERS)}") from None
    target = _SIBLINGS[name]
    extra, lost = {}, []
    if target == "flow-euler-stochastic" and "stochastic_sampling" not in inspect.signature(
        diffusers.FlowMatchEulerDiscreteScheduler.__init__
    ).parameters:
        target = "flow-sde"  # an older diffusers: specdiff's own flow SDE
    if target == "dpmpp-2m-sde":
        extra["solver_order"] = min(int(scheduler.config.get("solver_order", 2)), 2)
    if scheduler.config.get("use_karras_sigmas") and "use_karras_sigmas" not in config_options(target):
        lost.append("Karras sigmas (the sibling has none here; it keeps its own sigma schedule)")
    sibling = scheduler_from_name(target, scheduler)
    if extra:
        sibling = type(sibling).from_config(sibling.config, **extra)
    note = (f"{type(sibling).__name__} ({SAMPLERS[target].title}), the stochastic sibling of {name}: fresh noise at "
            f"every step, a different sampler whose images do not have the deterministic sampler's law")
    return StochasticSibling(sibling, {}, target, note + (f"; not carried over: {', '.join(lost)}" if lost else ""))


def _unwrapped(scheduler):
    """The scheduler a SpeculativeScheduler wraps (any other scheduler: itself)."""
    return getattr(scheduler, "base_scheduler", scheduler)
