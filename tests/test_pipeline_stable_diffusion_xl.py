"""SpeculativeStableDiffusionXLPipeline: same images as StableDiffusionXLPipeline at window=1 (a
batch of different prompts included), same law at window > 1.

Tiny randomly initialised UNet (SDXL's text_time added conditioning) and VAE; the prompts are
given as embeddings (``prompt_embeds`` / ``pooled_prompt_embeds``), so no text encoder or
tokenizer is needed and nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from specdiff.pipelines import SpeculativeStableDiffusionXLPipeline
from specdiff.schedulers import SpeculativeScheduler
from specdiff.testing import assert_same_law

TOKENS, HIDDEN, POOLED, TIME_DIM = 5, 16, 8, 4


def tiny_unet(seed=0, channels=(8, 16)):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=HIDDEN, attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
    ).eval()  # fmt: skip


def xl_pipe(scheduler) -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=8,
    )  # fmt: skip
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=tiny_unet(),
        scheduler=scheduler, add_watermarker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def euler():
    return EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )


def embeds(n: int, seed: int) -> dict:
    """``n`` different 'prompts' (and negative prompts) as embeddings."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    return dict(
        prompt_embeds=rand(n, TOKENS, HIDDEN), pooled_prompt_embeds=rand(n, POOLED),
        negative_prompt_embeds=rand(n, TOKENS, HIDDEN), negative_pooled_prompt_embeds=rand(n, POOLED),
    )  # fmt: skip


def speculative(pipe, **options):
    spec = SpeculativeStableDiffusionXLPipeline.from_pipe(pipe, **options)
    spec.set_progress_bar_config(disable=True)
    return spec


@pytest.mark.parametrize("scheduler", ["ddpm", "euler-ancestral"])
def test_window_one_gives_sdxl_images_for_a_batch_of_different_prompts(scheduler):
    make = {"ddpm": lambda: DDPMScheduler(clip_sample=False, steps_offset=1), "euler-ancestral": euler}[scheduler]
    base = xl_pipe(make())
    kwargs = dict(num_inference_steps=5, guidance_scale=5.0, output_type="np", **embeds(3, seed=1))
    want = base(generator=torch.Generator().manual_seed(0), **kwargs).images
    out = speculative(base)(generator=torch.Generator().manual_seed(0), window=1, **kwargs)
    np.testing.assert_array_equal(out.images, want)
    assert out.stats.batch_size == 3 and out.stats.target_calls == 5


def test_window_one_gives_sdxl_images_with_size_conditioning_and_generator_list():
    base = xl_pipe(euler())
    kwargs = dict(
        num_inference_steps=4, output_type="np", original_size=(32, 24), crops_coords_top_left=(4, 0),
        target_size=(16, 16), **embeds(2, seed=2),
    )  # fmt: skip

    def gens():
        return [torch.Generator().manual_seed(s) for s in (5, 6)]

    want = base(generator=gens(), **kwargs).images
    got = speculative(base)(generator=gens(), window=1, **kwargs).images
    np.testing.assert_array_equal(got, want)


def test_speculative_latents_have_the_law_of_sdxl():
    """A smoke test of the law: this tiny SDXL rejects every drafted step (measured 0% accepted),
    so its samples come from the reflection only; pathwise checks of the reflection are in
    tests/test_coupling.py, the coupling's power on analytic models in tests/test_sampler.py."""
    base = xl_pipe(euler())
    n = 400
    one = embeds(1, seed=3)
    batch = {k: v.expand(n, *v.shape[1:]) for k, v in one.items()}
    kwargs = dict(num_inference_steps=6, guidance_scale=3.0, output_type="latent", **batch)
    want = base(generator=torch.Generator().manual_seed(10), **kwargs).images
    out = speculative(base, window=3)(generator=torch.Generator().manual_seed(20), **kwargs)
    assert out.images.shape == want.shape == (n, 4, 8, 8)
    assert_same_law(out.images, want, alpha=1e-3)  # family-wise level (KS on 20 projections, Bonferroni)
    rejected = out.stats.proposed - out.stats.accepted
    assert rejected >= 0.05 * out.stats.proposed > 0, (
        f"too few reflections to exercise the coupling: {out.stats.summary()}"
    )


def test_from_pipe_shares_the_unet_in_its_dtype_and_wraps_the_scheduler():
    base = xl_pipe(euler()).to(dtype=torch.bfloat16)
    spec = speculative(base, window=4)
    assert spec.unet is base.unet and spec.unet.dtype == torch.bfloat16
    assert isinstance(spec.scheduler, SpeculativeScheduler) and spec.scheduler.config.window == 4
    half = {k: v.to(torch.bfloat16) for k, v in embeds(1, 4).items()}
    out = spec(num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0), **half)
    assert np.isfinite(out.images).all() and out.images.dtype == np.float32
