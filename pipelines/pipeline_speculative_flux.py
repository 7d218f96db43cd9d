"""SpeculativeFluxPipeline: FLUX (rectified flow, packed latents) text-to-image with speculative sampling.

A subclass of diffusers' ``FluxPipeline``: prompt encoding (CLIP + T5), the packed latents
and their position ids, the resolution-dependent shift and VAE decoding are the parent's;
only the denoising loop is replaced. The scheduler must be stochastic (FLUX's default
``FlowMatchEulerDiscreteScheduler`` is an ODE solver and is refused with a message naming
the fix). FLUX-dev's distilled guidance is an input of the transformer (``guidance``), so it
costs nothing; true CFG (``true_cfg_scale > 1`` with a negative prompt) is folded into the
verification call as rows (unconditional, conditional).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from specdiff.pipelines.speculative_utils import SpeculativeFlowPipelineOutput, run_speculative, speculative_from_pipe
from specdiff.schedulers import SpeculativeScheduler


class SpeculativeFluxPipeline(FluxPipeline):
    r"""Text-to-image generation with FLUX and speculative sampling.

    Same components as [`FluxPipeline`]; ``scheduler`` is a [`SpeculativeScheduler`] or a
    supported stochastic flow scheduler, which is wrapped.
    """

    _callback_tensor_inputs: ClassVar[list[str]] = ["latents", "steps"]

    def __init__(
        self,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: FluxTransformer2DModel,
        image_encoder: Any = None,
        feature_extractor: Any = None,
    ):
        super().__init__(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
            image_encoder=image_encoder, feature_extractor=feature_extractor,
        )  # fmt: skip
        if not isinstance(self.scheduler, SpeculativeScheduler):
            self.register_modules(scheduler=SpeculativeScheduler.from_scheduler(self.scheduler))

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """From a ``FluxPipeline``, sharing its components (in their own dtypes). Scheduler
        options (``window``, ``frozen_prediction``) may be passed."""
        return speculative_from_pipe(super().from_pipe, pipeline, kwargs)

    def guidance_inputs(
        self, transformer, cond: dict, uncond: dict | None, true_cfg_scale: float, static: dict
    ) -> dict:
        def network(latents, t, encoder_hidden_states, pooled_projections, guidance):
            return transformer(
                hidden_states=latents, timestep=t.to(latents.dtype) / 1000, guidance=guidance,
                pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                joint_attention_kwargs=self.joint_attention_kwargs, return_dict=False, **static,
            )[0]  # fmt: skip

        return {"network": network, "cond": cond, "uncond": uncond, "guidance_scale": true_cfg_scale}

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int = 512,
        window: int | None = None,
        drafter: str | Callable | None = None,
        draft_transformer=None,
        max_rows: int | str | None = "auto",
        verify: str | None = None,
        coupling: str | None = None,
    ) -> SpeculativeFlowPipelineOutput | tuple:
        r"""Generate images from text. Arguments as in ``FluxPipeline.__call__`` (IP-Adapter inputs
        are not supported), plus ``window``, ``drafter``, ``draft_transformer``, ``max_rows``, ``verify`` and
        ``coupling`` as in ``SpeculativeStableDiffusion3Pipeline``; so is ``pipe._interrupt``.

        With ``true_cfg_scale > 1`` the conditional and unconditional rows share one network call
        (diffusers makes two), so ``window=1`` matches ``FluxPipeline`` to float rounding there and
        bit for bit otherwise.

        Returns ``SpeculativeFlowPipelineOutput(images, stats)`` or ``(images, stats)``.
        """
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(
            prompt, prompt_2, height, width, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )  # fmt: skip
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs or {}
        self._current_timestep = None
        self._interrupt = False
        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device
        total = batch_size * num_images_per_prompt

        # 1. Text conditioning, as the parent computes it, kept per sample.
        lora_scale = self.joint_attention_kwargs.get("scale", None)
        encode = {"device": device, "num_images_per_prompt": num_images_per_prompt,
                  "max_sequence_length": max_sequence_length, "lora_scale": lora_scale}
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            **encode,
        )  # fmt: skip
        has_negative = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None
        )
        uncond = None
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([total], guidance_scale, device=device, dtype=torch.float32)
        cond = {
            "encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_prompt_embeds, "guidance": guidance
        }
        if true_cfg_scale > 1 and has_negative:
            negative_prompt_embeds, negative_pooled_prompt_embeds, _ = self.encode_prompt(
                prompt=negative_prompt, prompt_2=negative_prompt_2, prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=negative_pooled_prompt_embeds, **encode,
            )  # fmt: skip
            uncond = {**cond, "encoder_hidden_states": negative_prompt_embeds,
                      "pooled_projections": negative_pooled_prompt_embeds}  # fmt: skip

        # 2. Packed latents, their ids and the shifted timesteps, as the parent does (the shift
        #    reads the wrapped scheduler's config).
        latents, latent_image_ids = self.prepare_latents(
            total, self.transformer.config.in_channels // 4, height, width, prompt_embeds.dtype, device, generator,
            latents,
        )  # fmt: skip
        config = self.scheduler.base_scheduler.config
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        if config.get("use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            latents.shape[1], config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.15),
        )  # fmt: skip
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu
        )
        self._num_timesteps = len(timesteps)

        # 3. The speculative sampler: ONE run for the whole batch, each row conditioned on its sample.
        static = {"txt_ids": text_ids, "img_ids": latent_image_ids}
        output = run_speculative(
            self, lambda transformer: self.guidance_inputs(transformer, cond, uncond, true_cfg_scale, static),
            self.transformer, latents, generator=generator, window=window, drafter=drafter,
            draft_network=draft_transformer, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, timesteps=timesteps,
            max_rows=max_rows, verify=verify, coupling=coupling,
        )  # fmt: skip

        # 4. Unpack and decode, as the parent does.
        latents = output.sample
        if output_type == "latent":
            image = latents
        else:
            latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, output.stats)
        return SpeculativeFlowPipelineOutput(images=image, stats=output.stats)
