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
from typing import ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from specdiff.pipelines.speculative_utils import (
    check_generators,
    images_from_samples,
    sample_rounds,
    speculative_from_pipe,
)
from specdiff.schedulers import SpeculativeScheduler
from specdiff.stats import SpeculativeStats


@dataclass
class SpeculativeImagePipelineOutput(BaseOutput):
    """``images`` as ``DDPMPipeline`` returns them, and the run's :class:`specdiff.SpeculativeStats`."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    stats: SpeculativeStats | None = None


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
    _optional_components: ClassVar[list[str]] = ["draft_unet"]
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents", "steps"]

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
        max_rows: int | str | None = "auto",
        verify: str | None = None,
        coupling: str | None = None,
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
                ``callback(pipe, step_index, timestep, {"latents": ..., "steps": ...})``; setting
                ``pipe._interrupt = True`` there stops the run after the round (the images are then
                the states committed so far, each sample at its own step).
            max_rows: the most states per network call (a verify call holds up to batch x window);
                larger calls run as exact micro-batches: the same images, less memory. ``"auto"``
                (the default): no cap on CPU, fitted to free memory on CUDA; ``None``: no cap.
            verify: ``"step"`` (each drafted step tested in order) or ``"block"`` (block verification,
                the window cut jointly; see docs/block-verification.md); default: the scheduler's.
            coupling: ``"reflection"`` or ``"maximal"`` (Γ-maximal) for the Gaussian steps; default: the
                scheduler's. Like ``verify``, it changes acceptance only, never the images' law.

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
        output = sample_rounds(
            self, lambda x, t: self.unet(x, t).sample, image, timesteps=self.scheduler.timesteps,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, generator=generator,
            window=window, drafter=self._drafter(drafter, draft_unet), max_rows=max_rows,
            verify=verify, coupling=coupling,
        )  # fmt: skip

        image = images_from_samples(output.sample, output_type, self)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, output.stats)
        return SpeculativeImagePipelineOutput(images=image, stats=output.stats)
