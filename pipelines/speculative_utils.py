"""What the speculative pipelines share: from_pipe, the progress bar, the round callback, image
output, and for the text-to-image pipelines per-sample conditioning and guidance. No pipeline file
imports another: each imports what it shares from here.

A speculative verification call holds rows of several samples, each at its own step. The
sampler tells a model function which sample each row belongs to (``sample=``, a
``LongTensor[rows]``), so the model function indexes every per-sample conditioning tensor
(prompt embeddings, pooled embeddings, SDXL's time ids, ...) by it, and a batch of
different prompts is ONE speculative run. Classifier-free guidance is folded into the same
network call: the rows are duplicated (unconditional, conditional), as diffusers'
pipelines do for their batch, and guided per row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from diffusers.utils import logging as diffusers_logging
from torch import Tensor
from tqdm.auto import tqdm

from specdiff.block import check_verify
from specdiff.kernels import COUPLINGS
from specdiff.sampler import SpeculativeOutput
from specdiff.schedulers import SpeculativeScheduler
from specdiff.stats import SpeculativeStats


@dataclass
class SpeculativeFlowPipelineOutput(BaseOutput):
    """A text-to-image pipeline's ``images`` and the run's :class:`specdiff.SpeculativeStats`."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    stats: SpeculativeStats | None = None

def _dtype_key() -> str:
    """diffusers' loaders take ``dtype`` since it deprecated ``torch_dtype`` (which older versions need)."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


DTYPE_KEY = _dtype_key()


def speculative_from_pipe(from_pipe: Callable, pipeline, kwargs: dict):
    """diffusers' ``from_pipe`` (bound to the new class) with the scheduler options honoured
    (``window``, ``eta``, ...: the scheduler is wrapped before the new pipeline is built) and
    the shared modules left in their own dtypes: diffusers would cast them, the user's own
    modules, in place, to float32 unless a dtype is passed."""
    kwargs = dict(kwargs)
    rewrap = SpeculativeScheduler.wrap_pipeline_scheduler(kwargs, pipeline)
    if "dtype" in kwargs or "torch_dtype" in kwargs:
        return rewrap(from_pipe(pipeline, **kwargs))
    # diffusers casts every module to one dtype (the pipeline's) in place. Keep each floating tensor
    # it would change (a float32 VAE beside a bf16 transformer, T5's float32 `wo` layers in a float16
    # encoder) and put the very tensors back: no rounding round trip, no dtype flattened.
    target = pipeline.dtype

    def cast(t):
        return t is not None and t.is_floating_point() and t.dtype != target

    owners = [owner for module in pipeline.components.values() if isinstance(module, torch.nn.Module)
              for owner in module.modules()]
    params = [(owner, name, p, p.data) for owner in owners for name, p in owner._parameters.items() if cast(p)]
    buffers = [(owner, name, b) for owner in owners for name, b in owner._buffers.items() if cast(b)]
    log = diffusers_logging.get_logger("diffusers.models.modeling_utils")
    level = log.level
    log.setLevel(diffusers_logging.ERROR)  # the cast below is undone at once: its warning is noise
    try:
        new = from_pipe(pipeline, **{DTYPE_KEY: target}, **kwargs)
    finally:
        for owner, name, param, data in params:  # the same Parameter object, with its original storage
            param.data = data
            owner._parameters[name] = param
        for owner, name, buffer in buffers:  # a cast buffer is a new tensor: put the original back
            owner._buffers[name] = buffer
        log.setLevel(level)
    return rewrap(new)


def check_cache_option(cache: bool, window) -> None:
    """``cache=True`` belongs to the plain masked-diffusion loop; refuse it beside a window."""
    if cache and window is not None:
        raise ValueError("cache=True is an option of the plain sampler: pass window=None with it (the speculative "
                         "sampler already skips the network for unchanged states)")


def rule_options(verify: str | None = None, coupling: str | None = None, *, plain: bool = False) -> dict:
    """A pipeline call's ``verify`` (``"step"`` / ``"block"``) and ``coupling`` (``"reflection"`` /
    ``"maximal"``), checked before any work: the options to pass on to the sampler (``None``: left out,
    so the scheduler's config decides). ``plain``: the call runs the plain loop (``window=None``),
    which verifies nothing, so block verification is refused there."""
    if verify is not None:
        check_verify(verify)
    if coupling is not None and coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {COUPLINGS} (or None: the scheduler's); got {coupling!r}")
    if plain and verify not in (None, "step"):
        raise ValueError(f"verify={verify!r} is an option of the speculative sampler; the plain sampler "
                         "(window=None) verifies nothing: pass a window with it")
    return {k: v for k, v in (("verify", verify), ("coupling", coupling)) if v is not None}


def check_max_rows_option(max_rows, window) -> None:
    """``max_rows`` caps the speculative sampler's network calls; refuse a cap beside the plain loop."""
    if window is None and max_rows not in ("auto", None):
        raise ValueError(f"max_rows={max_rows!r} caps the speculative sampler's network calls; the plain sampler "
                         "(window=None) calls the network once per step on the whole batch: pass a smaller batch, "
                         "or a window with max_rows")


Conditioning = Mapping[str, "Tensor | Conditioning | None"]


def pick_rows(conditioning: Conditioning, sample: Tensor) -> dict:
    """Every tensor of ``conditioning`` (nested mappings included) indexed by ``sample`` on dim 0."""
    return {
        k: (pick_rows(v, sample) if isinstance(v, Mapping) else None if v is None else v[sample.to(v.device)])
        for k, v in conditioning.items()
    }


def cat_rows(first: Conditioning, second: Conditioning) -> dict:
    """``torch.cat([first, second])`` key by key (nested mappings included)."""
    return {
        k: (cat_rows(v, second[k]) if isinstance(v, Mapping) else None if v is None else torch.cat([v, second[k]]))
        for k, v in first.items()
    }


def guided_model(
    network: Callable[..., Tensor],
    cond: Conditioning,
    uncond: Conditioning | None = None,
    guidance_scale: float = 1.0,
    combine: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
) -> Callable:
    """``model_fn(model_input, timesteps, sample=None)`` for :class:`SpeculativeScheduler`.

    ``network(model_input, timesteps, **conditioning)`` is the raw network call. ``cond`` and
    ``uncond`` hold per-sample tensors (first dimension = the pipeline's batch); each row
    gets those of its ``sample`` (``None``: the rows are the batch, in order). With ``uncond``
    the rows are duplicated (unconditional first, as diffusers does) in ONE call and guided:
    ``u + guidance_scale * (c - u)``, or ``combine(guided, u, c)`` to post-process it
    (e.g. guidance rescale).
    """

    def model_fn(model_input: Tensor, timesteps: Tensor, sample: Tensor | None = None) -> Tensor:
        if sample is None:
            sample = torch.arange(model_input.shape[0], device=model_input.device)
        rows = pick_rows(cond, sample)
        if uncond is None:
            return network(model_input, timesteps, **rows)
        both = cat_rows(pick_rows(uncond, sample), rows)
        out = network(torch.cat([model_input] * 2), torch.cat([timesteps] * 2), **both)
        out_uncond, out_cond = out.chunk(2)
        guided = out_uncond + guidance_scale * (out_cond - out_uncond)
        return guided if combine is None else combine(guided, out_uncond, out_cond)

    return model_fn


def draft_model(
    network: Callable[..., Tensor] | None,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    guidance_scale: float = 1.0,
    combine: Callable | None = None,
) -> Callable | None:
    """The guided model function of an independent draft network, or ``None`` without one; like
    the target's, it conditions each row on its own sample's prompt (``sample=``)."""
    if network is None:
        return None
    return guided_model(network, cond, uncond, guidance_scale, combine)


class _Interrupted(Exception):
    """Raised after a round whose callback set ``pipe._interrupt``; carries the round's ``info``."""

    def __init__(self, info: dict):
        super().__init__("interrupted from callback_on_step_end")
        self.info = info


def round_callback(pipe, callback_on_step_end, tensor_inputs, timesteps):
    """Adapt diffusers' ``callback_on_step_end(pipe, step_index, timestep, kwargs)`` to the
    speculative sampler's per-round callback. It runs after every round (one sequential
    network call) with the slowest sample's last committed step; ``latents`` are the
    committed states and ``steps`` each sample's committed step count. Changing tensors
    from the callback is refused: it would break exactness. Setting ``pipe._interrupt = True``
    stops the run after the round (:func:`sample_rounds`)."""
    if callback_on_step_end is None:
        return None
    if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
        tensor_inputs = callback_on_step_end.tensor_inputs
    tensor_inputs = tensor_inputs or ["latents"]
    unknown = [k for k in tensor_inputs if k not in pipe._callback_tensor_inputs]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {pipe._callback_tensor_inputs}")

    def callback(info: dict) -> None:
        index = max(int(info["step"].min()) - 1, 0)
        available = {"latents": info["x"], "steps": info["step"]}
        # Copies: ``info["x"]`` is the sampler's own state, so an in-place edit would slip past the check.
        kwargs = {k: available[k].clone() for k in tensor_inputs}
        returned = callback_on_step_end(pipe, index, timesteps[index], kwargs) or {}
        for name, given in kwargs.items():
            if not torch.equal(returned.get(name, given), available[name]):
                raise ValueError(
                    f"callback_on_step_end changed {name!r}: speculative sampling cannot take modified tensors "
                    "mid-trajectory (the drafted and verified steps would no longer be the sampler's)"
                )
        if getattr(pipe, "_interrupt", False) and int(info["step"].min()) < len(timesteps):
            raise _Interrupted(info)  # (after the last round the run ends as it would anyway)

    return callback


def sample_rounds(
    pipe,
    model_fn: Callable,
    latents: Tensor,
    *,
    timesteps,
    callback_on_step_end=None,
    callback_on_step_end_tensor_inputs=None,
    verify: str | None = None,
    coupling: str | None = None,
    **options,
) -> SpeculativeOutput:
    """``pipe.scheduler.sample(model_fn, latents, **options)`` under the pipeline's progress bar
    (steps per image out of ``len(timesteps)``) and its ``callback_on_step_end``; the call's ``verify``
    and ``coupling`` (:func:`rule_options`; ``None``: the scheduler's config).

    A callback that sets ``pipe._interrupt = True`` stops the run after its round, as diffusers'
    loops skip the steps left once it is set: the output is the states the run had committed
    (each sample at its own step, ``info["step"]``; what the callback saw as ``latents``) and the
    stats of the rounds that ran."""
    options.update(rule_options(verify, coupling))
    pipe._interrupt = False
    started = time.perf_counter()
    callback = round_callback(pipe, callback_on_step_end, callback_on_step_end_tensor_inputs, timesteps)
    try:
        return pipe.scheduler.sample(
            model_fn, latents, progress=progress_for(pipe, len(timesteps)), callback=callback, **options
        )
    except _Interrupted as stop:
        stats = stop.info["stats"]
        stats.wall_clock = time.perf_counter() - started
        return SpeculativeOutput(sample=stop.info["x"], stats=stats)


class _StepBar:
    """A tqdm bar counting denoising steps per image: the samplers report sample-steps
    (``batch x steps`` in all), which would count differently from a plain loop's bar."""

    def __init__(self, bar, per_step: float):
        self.bar, self.per_step, self.done = bar, per_step, 0

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(int(self.done // self.per_step) - self.bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def __getattr__(self, name):
        return getattr(self.bar, name)


def progress_for(pipe, num_steps: int | None = None, desc: str = "speculative sampling") -> Callable:
    """The pipeline's tqdm bar (honours ``set_progress_bar_config``, including ``disable`` and
    ``desc``), labelled, counting denoising steps per image (the batch's mean) out of
    ``num_steps``, as a plain sampler's bar does."""

    def open_bar(total: int, desc: str = desc, unit: str | None = None):
        if unit is not None:  # another count than the steps (the window's calibration: network calls)
            return tqdm(total=total, **{"desc": desc, "unit": unit, **getattr(pipe, "_progress_bar_config", {})})
        steps = num_steps or total
        config = {"desc": desc, "unit": "step", **getattr(pipe, "_progress_bar_config", {})}
        return _StepBar(tqdm(total=steps, **config), per_step=total / steps)

    return open_bar


def check_generators(generator, batch_size: int) -> None:
    """One clear error for a generator list that does not give one generator per image."""
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(
            f"got a list of {len(generator)} generators for a batch of {batch_size} images: pass one "
            "torch.Generator per image, or a single generator for the whole batch"
        )


def images_from_samples(
    samples: torch.Tensor, output_type: str, pipe
) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
    """Samples in [-1, 1] (NCHW) to ``output_type``: ``"pt"`` (NCHW in [0, 1], the samples' dtype),
    ``"np"`` (NHWC float32: numpy has no bfloat16) or ``"pil"``."""
    if output_type not in ("pil", "np", "pt"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt'; got {output_type!r}")
    images = (samples / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    images = images.cpu().permute(0, 2, 3, 1).float().numpy()
    return pipe.numpy_to_pil(images) if output_type == "pil" else images


def run_speculative(
    pipe,
    guidance: Callable[..., dict],
    network,
    latents: Tensor,
    *,
    generator=None,
    window: int | None = None,
    drafter=None,
    draft_network=None,
    callback_on_step_end=None,
    callback_on_step_end_tensor_inputs=None,
    timesteps=None,
    **options,
) -> SpeculativeOutput:
    """The speculative denoising loop of a text-to-image pipeline: ONE run of ``pipe.scheduler``
    for the whole batch (:func:`sample_rounds`). ``guidance(network)`` returns :func:`guided_model`'s
    arguments for the target ``network`` or a ``draft_network`` (an independent drafter; exclusive
    with ``drafter``, a draft model function or ``"frozen"``). ``options``: the rest of
    :meth:`SpeculativeScheduler.sample`'s (``max_rows``, DDIM's ``eta``, :func:`rule_options`' ``verify`` and
    ``coupling``)."""
    if draft_network is not None and drafter is not None:
        raise ValueError("pass either drafter= or a draft network (draft_unet= / draft_transformer=), not both")
    if draft_network is not None:
        drafter = draft_model(**guidance(draft_network))
    return sample_rounds(
        pipe, guided_model(**guidance(network)), latents, timesteps=timesteps, generator=generator, window=window,
        drafter=drafter, callback_on_step_end=callback_on_step_end,
        callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, **options,
    )  # fmt: skip
