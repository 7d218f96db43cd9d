"""SpeculativeStableDiffusionXLPipeline: SDXL text-to-image with speculative sampling.

A subclass of diffusers' ``StableDiffusionXLPipeline``: prompt encoding (both text
encoders, pooled embeddings), the added time ids, latent preparation and VAE decoding are
the parent's; only the denoising loop is replaced by the speculative sampler of a
:class:`SpeculativeScheduler`. Each row of a verification call is conditioned on its own
sample (``prompt_embeds``, ``add_text_embeds``, ``add_time_ids``), and classifier-free
guidance is folded into the same call. The images have exactly the law of
``StableDiffusionXLPipeline``'s with the same (stochastic) scheduler; with ``window=1`` they
are the same images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg, retrieve_timesteps
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from specdiff.pipelines.speculative_utils import run_speculative, speculative_from_pipe
from specdiff.schedulers import SpeculativeScheduler
from specdiff.stats import SpeculativeStats


@dataclass
class SpeculativeStableDiffusionXLPipelineOutput(BaseOutput):
    """``StableDiffusionXLPipelineOutput`` plus the run's :class:`specdiff.SpeculativeStats`."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    stats: SpeculativeStats | None = None


class SpeculativeStableDiffusionXLPipeline(StableDiffusionXLPipeline):
    r"""Text-to-image generation with Stable Diffusion XL and speculative sampling.

    Same components as [`StableDiffusionXLPipeline`], plus an optional ``draft_unet`` (a
    cheaper SDXL UNet on the same schedule and conditioning). ``scheduler`` is a
    [`SpeculativeScheduler`] or a supported stochastic diffusers scheduler, which is wrapped.
    """

    _optional_components = StableDiffusionXLPipeline._optional_components + ["draft_unet"]
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents", "steps"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        image_encoder: Any = None,
        feature_extractor: Any = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        draft_unet: UNet2DConditionModel | None = None,
    ):
        super().__init__(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=image_encoder,
            feature_extractor=feature_extractor, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )  # fmt: skip
        if not isinstance(self.scheduler, SpeculativeScheduler):
            self.register_modules(scheduler=SpeculativeScheduler.from_scheduler(self.scheduler))
        self.register_modules(draft_unet=draft_unet)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """From a ``StableDiffusionXLPipeline``, sharing its components (in their own dtypes).
        Scheduler options (``window``, ``frozen_prediction``, ``eta``) may be passed."""
        return speculative_from_pipe(super().from_pipe, pipeline, kwargs)

    def guidance_inputs(self, unet, cond: dict, uncond: dict | None, timestep_cond) -> dict:
        """Arguments of ``guided_model`` for ``unet``: per-sample text embeddings and added
        conditioning (``text_embeds``, ``time_ids``), guided as the parent pipeline guides."""

        def network(latent_input, t, encoder_hidden_states, text_embeds, time_ids, timestep_cond):
            return unet(
                latent_input, t, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
                cross_attention_kwargs=self.cross_attention_kwargs,
                added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False,
            )[0]  # fmt: skip

        def rescale(guided, out_uncond, out_cond):
            if self.guidance_rescale > 0.0:
                return rescale_noise_cfg(guided, out_cond, guidance_rescale=self.guidance_rescale)
            return guided

        cond = {**cond, "timestep_cond": timestep_cond}
        uncond = None if uncond is None else {**uncond, "timestep_cond": timestep_cond}
        return {"network": network, "cond": cond, "uncond": uncond, "guidance_scale": self.guidance_scale,
                "combine": rescale}

    def latents_to_images(self, latents: torch.Tensor, output_type: str):
        """Latents to images, as ``StableDiffusionXLPipeline`` decodes them (fp16 VAE upcast,
        latents mean/std, watermark)."""
        if output_type == "latent":
            return latents
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.upcast_vae()
            latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(self.vae.config, "latents_mean", None), getattr(self.vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / self.vae.config.scaling_factor + mean
        else:
            latents = latents / self.vae.config.scaling_factor
        image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type=output_type)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        window: int | None = None,
        drafter: str | Callable | None = None,
        draft_unet: UNet2DConditionModel | None = None,
        max_rows: int | str | None = "auto",
        verify: str | None = None,
        coupling: str | None = None,
    ) -> SpeculativeStableDiffusionXLPipelineOutput | tuple:
        r"""Generate images from text. Arguments as in ``StableDiffusionXLPipeline.__call__``
        (IP-Adapter inputs and ``denoising_end`` are not supported), plus ``window``, ``drafter``
        (``"frozen"`` or a guided draft model function), ``draft_unet`` (an independent draft
        UNet), ``max_rows`` (the most states per network call), ``verify`` and ``coupling`` (default: the
        scheduler's), as in ``SpeculativeStableDiffusionPipeline``; ``pipe._interrupt`` set from
        ``callback_on_step_end`` stops the run after the round.

        Returns ``SpeculativeStableDiffusionXLPipelineOutput(images, stats)`` or ``(images, stats)``.
        """
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        self.check_inputs(
            prompt, prompt_2, height, width, None, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, None, None,
            callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = None
        self._interrupt = False
        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device
        total = batch_size * num_images_per_prompt

        # 1. Text conditioning and added time ids, exactly as the parent computes them, kept per sample.
        lora_scale = self.cross_attention_kwargs.get("scale", None) if self.cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = (
            self.encode_prompt(
                prompt=prompt, prompt_2=prompt_2, device=device, num_images_per_prompt=num_images_per_prompt,
                do_classifier_free_guidance=self.do_classifier_free_guidance, negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, lora_scale=lora_scale,
                clip_skip=self.clip_skip,
            )
        )  # fmt: skip
        if self.text_encoder_2 is None:
            projection_dim = int(pooled_prompt_embeds.shape[-1])
        else:
            projection_dim = self.text_encoder_2.config.projection_dim

        def time_ids(size, crop, target):
            return self._get_add_time_ids(
                size, crop, target, dtype=prompt_embeds.dtype, text_encoder_projection_dim=projection_dim
            ).to(device).repeat(total, 1)

        add_time_ids = time_ids(original_size, crops_coords_top_left, target_size)
        negative_add_time_ids = add_time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_add_time_ids = time_ids(
                negative_original_size, negative_crops_coords_top_left, negative_target_size
            )
        cond = {"encoder_hidden_states": prompt_embeds, "text_embeds": pooled_prompt_embeds, "time_ids": add_time_ids}
        uncond = None
        if self.do_classifier_free_guidance:
            uncond = {
                "encoder_hidden_states": negative_prompt_embeds,
                "text_embeds": negative_pooled_prompt_embeds,
                "time_ids": negative_add_time_ids,
            }

        # 2. Timesteps and initial latents, as the parent does.
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        self._num_timesteps = len(timesteps)
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
            draft_unet = self.draft_unet
        output = run_speculative(
            self, lambda unet: self.guidance_inputs(unet, cond, uncond, timestep_cond), self.unet, latents,
            generator=generator, window=window, drafter=drafter, draft_network=draft_unet,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, timesteps=timesteps, eta=eta,
            max_rows=max_rows, verify=verify, coupling=coupling,
        )  # fmt: skip

        # 4. Decode and post-process, as the parent does.
        image = self.latents_to_images(output.sample, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, output.stats)
        return SpeculativeStableDiffusionXLPipelineOutput(images=image, stats=output.stats)
