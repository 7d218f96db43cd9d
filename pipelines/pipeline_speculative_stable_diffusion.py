"""SpeculativeStableDiffusionPipeline: text-to-image Stable Diffusion with speculative sampling.

A subclass of diffusers' ``StableDiffusionPipeline``: prompt encoding, latent preparation,
VAE decoding, the safety checker and the image processor are the parent's; only the
denoising loop is replaced by the speculative sampler of a :class:`SpeculativeScheduler`.
Classifier-free guidance is folded into the verification batch: every drafted state is
duplicated (unconditional, conditional) inside the model function and guided per row, with
one timestep per row. The images have exactly the law of ``StableDiffusionPipeline``'s with
the same (stochastic) scheduler; with ``window=1`` they are the same images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer

from specdiff.pipelines.speculative_utils import run_speculative, speculative_from_pipe
from specdiff.schedulers import SpeculativeScheduler
from specdiff.stats import SpeculativeStats


@dataclass
class SpeculativeStableDiffusionPipelineOutput(BaseOutput):
    """``StableDiffusionPipelineOutput`` plus the run's :class:`specdiff.SpeculativeStats`."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None
    stats: SpeculativeStats | None = None


class SpeculativeStableDiffusionPipeline(StableDiffusionPipeline):
    r"""Text-to-image generation with Stable Diffusion and speculative sampling.

    Same components as [`StableDiffusionPipeline`], plus an optional ``draft_unet`` (a cheaper
    ``UNet2DConditionModel`` trained on the same schedule and text encoder). ``scheduler`` is a
    [`SpeculativeScheduler`] or a supported stochastic diffusers scheduler (DDPM, DDIM with
    eta > 0, Euler ancestral, DPM-Solver++ SDE), which is wrapped.
    """

    _optional_components: ClassVar[list[str]] = ["safety_checker", "feature_extractor", "image_encoder", "draft_unet"]
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents", "steps"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        safety_checker: Any,
        feature_extractor: CLIPImageProcessor,
        image_encoder: Any = None,
        requires_safety_checker: bool = True,
        draft_unet: UNet2DConditionModel | None = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        if not isinstance(self.scheduler, SpeculativeScheduler):
            self.register_modules(scheduler=SpeculativeScheduler.from_scheduler(self.scheduler))
        self.register_modules(draft_unet=draft_unet)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """From a ``StableDiffusionPipeline``, sharing its components (in their own dtypes).
        Scheduler options (``window``, ``frozen_prediction``, ``eta``) may be passed."""
        return speculative_from_pipe(super().from_pipe, pipeline, kwargs)

    def guidance_inputs(self, unet, prompt_embeds, negative_prompt_embeds, timestep_cond) -> dict:
        """Arguments of :func:`guided_model` for ``unet``: each row gets its sample's prompt
        embeddings; with guidance, rows are duplicated (unconditional, conditional) inside ONE
        network call and guided, as ``StableDiffusionPipeline`` guides its batch."""

        def network(latent_input, t, encoder_hidden_states, timestep_cond):
            return unet(
                latent_input, t, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
                cross_attention_kwargs=self.cross_attention_kwargs, return_dict=False,
            )[0]  # fmt: skip

        def rescale(guided, uncond, cond):
            if self.guidance_rescale > 0.0:
                return rescale_noise_cfg(guided, cond, guidance_rescale=self.guidance_rescale)
            return guided

        cond = {"encoder_hidden_states": prompt_embeds, "timestep_cond": timestep_cond}
        uncond = None
        if self.do_classifier_free_guidance:
            uncond = {"encoder_hidden_states": negative_prompt_embeds, "timestep_cond": timestep_cond}
        return {"network": network, "cond": cond, "uncond": uncond, "guidance_scale": self.guidance_scale,
                "combine": rescale}

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        window: int | None = None,
        drafter: str | Callable | None = None,
        draft_unet: UNet2DConditionModel | None = None,
        max_rows: int | str | None = "auto",
        verify: str | None = None,
        coupling: str | None = None,
    ) -> SpeculativeStableDiffusionPipelineOutput | tuple:
        r"""Generate images from text. Arguments as in ``StableDiffusionPipeline.__call__``
        (IP-Adapter inputs are not supported), plus:

        Args:
            eta: DDIM's eta for this call (default: the scheduler's; must be > 0).
            window: steps drafted per round (default: the scheduler's); 1 is the plain sampler.
            drafter: ``"picard"`` (default), ``"frozen"``, or a draft model function
                ``drafter(latent_input, timesteps) -> noise_pred`` (guidance already applied).
            draft_unet: a cheaper ``UNet2DConditionModel`` as independent drafter (guided like
                the target; defaults to the pipeline's ``draft_unet`` component, if any).
            callback_on_step_end: called after every speculative round as
                ``callback(pipe, step_index, timestep, {"latents": ..., "steps": ...})``; setting
                ``pipe._interrupt = True`` there stops the run after the round (the latents are then
                the states committed so far, each sample at its own step).
            max_rows: the most states per network call (a verify call holds up to batch x window
                states, each doubled inside the call for classifier-free guidance); larger calls run
                as exact micro-batches: the same images, less memory. ``"auto"``: no cap on CPU,
                fitted to free memory on CUDA; ``None``: no cap.
            verify: ``"step"`` (each drafted step tested in order) or ``"block"`` (block verification,
                the window cut jointly; see docs/block-verification.md); default: the scheduler's.
            coupling: ``"reflection"`` or ``"maximal"`` (Γ-maximal) for the Gaussian steps; default: the
                scheduler's. Like ``verify``, it changes acceptance only, never the images' law.

        Returns:
            ``SpeculativeStableDiffusionPipelineOutput(images, nsfw_content_detected, stats)``
            or the tuple ``(images, nsfw_content_detected, stats)``.

        A batch of different prompts is ONE speculative run (each row of a verification call is
        conditioned on its own sample's prompt), so ``window=1`` reproduces
        ``StableDiffusionPipeline``'s images for any batch and generator(s).
        """
        if not height or not width:
            size = self.unet.config.sample_size
            height, width = (size, size) if isinstance(size, int) else size
            height, width = height * self.vae_scale_factor, width * self.vae_scale_factor
        self.check_inputs(
            prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
            None, None, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None:
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device

        # 1. Text conditioning, exactly as the parent pipeline computes it.
        lora_scale = self.cross_attention_kwargs.get("scale", None) if self.cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale, clip_skip=self.clip_skip,
        )  # fmt: skip

        # 2. Timesteps and initial latents (scaled by init_noise_sigma), as the parent does.
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        self._num_timesteps = len(timesteps)
        total = batch_size * num_images_per_prompt
        latents = self.prepare_latents(
            total, self.unet.config.in_channels, height, width, prompt_embeds.dtype, device, generator, latents
        )
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(total)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        # 3. The speculative sampler: ONE run for the whole batch, each row conditioned on its sample.
        if draft_unet is None and drafter is None:
            draft_unet = self.draft_unet  # the pipeline's own draft model, if it has one
        output = run_speculative(
            self, lambda unet: self.guidance_inputs(unet, prompt_embeds, negative_prompt_embeds, timestep_cond),
            self.unet, latents, generator=generator, window=window, drafter=drafter, draft_network=draft_unet,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, timesteps=timesteps, eta=eta,
            max_rows=max_rows, verify=verify, coupling=coupling,
        )  # fmt: skip
        latents, stats = output.sample, output.stats

        # 4. Decode, safety check and post-process, as the parent does.
        if output_type != "latent":
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
        else:
            image, has_nsfw_concept = latents, None
        do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not n for n in has_nsfw_concept]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, has_nsfw_concept, stats)
        return SpeculativeStableDiffusionPipelineOutput(
            images=image, nsfw_content_detected=has_nsfw_concept, stats=stats
        )
