"""SpeculativeStableDiffusion3Pipeline: SD3 (rectified flow) text-to-image with speculative sampling.

A subclass of diffusers' ``StableDiffusion3Pipeline``: prompt encoding (CLIP x2 + T5),
latent preparation, the timestep shift and VAE decoding are the parent's; only the
denoising loop is replaced. The scheduler must be stochastic: SD3's default
``FlowMatchEulerDiscreteScheduler`` is an ODE solver and is refused with a message naming
the fix (``stochastic_sampling=True``, or ``FlowMatchSDEScheduler``). Each row of a
verification call is conditioned on its own sample (``prompt_embeds``,
``pooled_prompt_embeds``); classifier-free guidance is folded into the same call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from specdiff.pipelines.speculative_utils import SpeculativeFlowPipelineOutput, run_speculative, speculative_from_pipe
from specdiff.schedulers import SpeculativeScheduler


class SpeculativeStableDiffusion3Pipeline(StableDiffusion3Pipeline):
    r"""Text-to-image generation with Stable Diffusion 3 and speculative sampling.

    Same components as [`StableDiffusion3Pipeline`]; ``scheduler`` is a [`SpeculativeScheduler`]
    or a supported stochastic flow scheduler, which is wrapped.
    """

    _callback_tensor_inputs: ClassVar[list[str]] = ["latents", "steps"]

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel,
        tokenizer_3: T5TokenizerFast,
        image_encoder: Any = None,
        feature_extractor: Any = None,
    ):
        super().__init__(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3, image_encoder=image_encoder, feature_extractor=feature_extractor,
        )  # fmt: skip
        if not isinstance(self.scheduler, SpeculativeScheduler):
            self.register_modules(scheduler=SpeculativeScheduler.from_scheduler(self.scheduler))

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """From a ``StableDiffusion3Pipeline``, sharing its components (in their own dtypes).
        Scheduler options (``window``, ``frozen_prediction``) may be passed."""
        return speculative_from_pipe(super().from_pipe, pipeline, kwargs)

    def guidance_inputs(self, transformer, cond: dict, uncond: dict | None) -> dict:
        def network(latent_input, t, encoder_hidden_states, pooled_projections):
            return transformer(
                hidden_states=latent_input, timestep=t, encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections, joint_attention_kwargs=self.joint_attention_kwargs,
                return_dict=False,
            )[0]  # fmt: skip

        return {"network": network, "cond": cond, "uncond": uncond, "guidance_scale": self.guidance_scale}

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int = 256,
        mu: float | None = None,
        window: int | None = None,
        drafter: str | Callable | None = None,
        draft_transformer=None,
        max_rows: int | str | None = "auto",
        verify: str | None = None,
        coupling: str | None = None,
    ) -> SpeculativeFlowPipelineOutput | tuple:
        r"""Generate images from text. Arguments as in ``StableDiffusion3Pipeline.__call__``
        (IP-Adapter and skip-layer guidance are not supported), plus ``window``, ``drafter``
        (``"frozen"`` or a guided draft model function), ``draft_transformer`` (an independent
        draft transformer on the same schedule and conditioning) and ``max_rows`` (the most states
        per network call: larger calls run as exact micro-batches, the same images), ``verify`` and
        ``coupling`` (block verification, the Γ-maximal coupling; default: the scheduler's); as in
        ``SpeculativeStableDiffusionPipeline``, ``pipe._interrupt`` set from ``callback_on_step_end``
        stops the run after the round.

        Returns ``SpeculativeFlowPipelineOutput(images, stats)`` or ``(images, stats)``.
        """
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(
            prompt, prompt_2, prompt_3, height, width, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )  # fmt: skip
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False
        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device

        # 1. Text conditioning, as the parent computes it, kept per sample.
        lora_scale = self.joint_attention_kwargs.get("scale", None) if self.joint_attention_kwargs else None
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = (
            self.encode_prompt(
                prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
                do_classifier_free_guidance=self.do_classifier_free_guidance, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, device=device, clip_skip=self.clip_skip,
                num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
                lora_scale=lora_scale,
            )
        )  # fmt: skip
        cond = {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_prompt_embeds}
        uncond = None
        if self.do_classifier_free_guidance:
            uncond = {
                "encoder_hidden_states": negative_prompt_embeds, "pooled_projections": negative_pooled_prompt_embeds
            }

        # 2. Latents and (shifted) timesteps, as the parent does; the shift reads the wrapped scheduler's config.
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt, self.transformer.config.in_channels, height, width,
            prompt_embeds.dtype, device, generator, latents,
        )  # fmt: skip
        config = self.scheduler.base_scheduler.config
        if config.get("use_dynamic_shifting", None) and mu is None:
            patch = self.transformer.config.patch_size
            mu = calculate_shift(
                (latents.shape[2] // patch) * (latents.shape[3] // patch), config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5), config.get("max_shift", 1.16),
            )  # fmt: skip
        extra = {} if mu is None else {"mu": mu}
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, sigmas=sigmas, **extra
        )
        self._num_timesteps = len(timesteps)

        # 3. The speculative sampler: ONE run for the whole batch, each row conditioned on its sample.
        output = run_speculative(
            self, lambda transformer: self.guidance_inputs(transformer, cond, uncond), self.transformer, latents,
            generator=generator, window=window, drafter=drafter, draft_network=draft_transformer,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, timesteps=timesteps,
            max_rows=max_rows, verify=verify, coupling=coupling,
        )  # fmt: skip

        # 4. Decode, as the parent does.
        latents = output.sample
        if output_type == "latent":
            image = latents
        else:
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, output.stats)
        return SpeculativeFlowPipelineOutput(images=image, stats=output.stats)
