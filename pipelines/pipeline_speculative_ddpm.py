"""SpeculativeDDPMPipeline: a drop-in ``DDPMPipeline`` that samples speculatively.

Same constructor and call as diffusers' ``DDPMPipeline``, plus ``window`` and a drafter;
the images have exactly the law of ``DDPMPipeline``'s (and with ``window=1`` they are the
same images for the same generator). Usable as ``specdiff.pipelines.SpeculativeDDPMPipeline``
or as a diffusers custom pipeline by file path::

    DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/pipeline_speculative_ddpm.py",
                                      trust_remote_code=True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from specdiff.pipelines.speculative_utils import speculative_from_pipe
from specdiff.schedulers import SpeculativeScheduler
from specdiff.stats import SpeculativeStats


@dataclass
class SpeculativeImagePipelineOutput(BaseOutput):
    """``images`` as ``DDPMPipeline`` returns them, and the run's :class:`specdiff.SpeculativeStats`."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    stats: SpeculativeStats | None = None


def round_callback(pipe, callback_on_step_end, tensor_inputs, timesteps):
    """Adapt diffusers' ``callback_on_step_end(pipe, step_index, timestep, kwargs)`` to the
    speculative sampler's per-round callback. It runs after every round (one sequential
    network call) with the slowest sample's last committed step; ``latents`` are the
    committed states and ``steps`` each sample's committed step count. Changing tensors
    from the callback is refused: it would break exactness."""
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
        for name in kwargs:
            value = returned.get(name, kwargs[name])
            if not torch.equal(value, available[name]):
                raise ValueError(
                    f"callback_on_step_end changed {name!r}: speculative sampling cannot take modified tensors "
                    "mid-trajectory (the drafted and verified steps would no longer be the sampler's)"
                )

    return callback


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

    def open_bar(total: int):
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


def images_from_samples(samples: torch.Tensor, output_type: str, pipe) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
    """Samples in [-1, 1] (NCHW) to ``output_type``: ``"pt"`` (NCHW in [0, 1], the samples' dtype),
    ``"np"`` (NHWC float32: numpy has no bfloat16) or ``"pil"``."""
    if output_type not in ("pil", "np", "pt"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt'; got {output_type!r}")
    images = (samples / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    images = images.cpu().permute(0, 2, 3, 1).float().numpy()
    return pipe.numpy_to_pil(images) if output_type == "pil" else images


class SpeculativeDDPMPipeline(DiffusionPipeline):
    r"""Unconditional image generation with speculative sampling (De Bortoli et al. 2025).

    Args:
        unet ([`UNet2DModel`]): the denoiser (the *target*).
        scheduler: a [`SpeculativeScheduler`], or a supported diffusers scheduler (DDPM,
            DDIM with eta > 0, Euler ancestral, DPM-Solver++ SDE), which is wrapped.
        draft_unet ([`UNet2DModel`], *optional*): a cheaper denoiser trained on the same schedule,
            used as an independent drafter. Without it the scheduler's drafter is used (Picard by default).
    """

    model_cpu_offload_seq = "unet"
    _optional_components = ["draft_unet"]
    _callback_tensor_inputs = ["latents", "steps"]

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, draft_unet: UNet2DModel | None = None):
        super().__init__()
        if not isinstance(scheduler, SpeculativeScheduler):
            scheduler = SpeculativeScheduler.from_scheduler(scheduler)
        self.register_modules(unet=unet, scheduler=scheduler, draft_unet=draft_unet)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """From a ``DDPMPipeline`` (or any pipeline with ``unet`` and ``scheduler``), sharing its
        components in their dtype. Scheduler options (``window``, ``frozen_prediction``, ``eta``)
        may be passed."""
        return speculative_from_pipe(super().from_pipe, pipeline, kwargs)

    def _drafter(self, drafter, draft_unet):
        if draft_unet is not None and drafter is not None:
            raise ValueError("pass either drafter= or draft_unet=, not both")
        if draft_unet is None and drafter is None:
            draft_unet = self.draft_unet  # the pipeline's own draft model, if it has one
        if draft_unet is not None:
            return lambda x, t: draft_unet(x, t).sample
        return drafter  # None (the scheduler's default: picard), "frozen", "picard", a model function or a Drafter

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        window: int | None = None,
        drafter: str | Callable | None = None,
        draft_unet: UNet2DModel | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> SpeculativeImagePipelineOutput | tuple:
        r"""Generate images.

        Args:
            batch_size, generator, num_inference_steps, output_type ("pil", "np" or "pt"),
            return_dict: as in ``DDPMPipeline``. A list of generators gives each image its own
                noise, independent of the batch.
            window: steps drafted per round (default: the scheduler's); 1 is the plain sampler.
            drafter: ``"frozen"`` (reuse the target's last prediction), or a draft model function
                ``drafter(model_input, timesteps) -> model_output``.
            draft_unet: a smaller ``UNet2DModel`` on the same schedule, as an independent drafter
                (defaults to the pipeline's ``draft_unet`` component, if any).
            callback_on_step_end: called after every speculative round as
                ``callback(pipe, step_index, timestep, {"latents": ..., "steps": ...})``.

        Returns:
            ``SpeculativeImagePipelineOutput(images, stats)``, or ``(images, stats)``.
        """
        if isinstance(self.unet.config.sample_size, int):
            shape = (
                batch_size,
                self.unet.config.in_channels,
                self.unet.config.sample_size,
                self.unet.config.sample_size,
            )
        else:
            shape = (batch_size, self.unet.config.in_channels, *self.unet.config.sample_size)
        check_generators(generator, batch_size)
        device = self._execution_device
        # The initial noise exactly as DDPMPipeline draws it (same generator, same order).
        if device.type == "mps":
            image = randn_tensor(shape, generator=generator, dtype=self.unet.dtype).to(device)
        else:
            image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)

        self.scheduler.set_timesteps(num_inference_steps)
        # DDPMPipeline omits this; it is 1.0 for DDPM/DDIM (a no-op) and makes Euler-type schedulers correct.
        image = image * self.scheduler.init_noise_sigma
        output = self.scheduler.sample(
            lambda x, t: self.unet(x, t).sample,
            image,
            generator=generator,
            window=window,
            drafter=self._drafter(drafter, draft_unet),
            progress=progress_for(self, len(self.scheduler.timesteps)),
            callback=round_callback(
                self, callback_on_step_end, callback_on_step_end_tensor_inputs, self.scheduler.timesteps
            ),
        )

        image = images_from_samples(output.sample, output_type, self)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, output.stats)
        return SpeculativeImagePipelineOutput(images=image, stats=output.stats)
