"""SpeculativeStableDiffusionPipeline: same images as StableDiffusionPipeline at window=1,
same law at window > 1, with classifier-free guidance folded into the verification batch.

Every component is tiny and randomly initialised here (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel from a CLIPTextConfig, and a CLIPTokenizer built from an in-memory
letter vocabulary), so nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from specdiff.pipelines import SpeculativeStableDiffusionPipeline, SpeculativeStableDiffusionPipelineOutput
from specdiff.schedulers import SpeculativeScheduler
from specdiff.testing import assert_same_law

MAX_TOKENS = 12


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single letters (no merges): enough for any lower-case prompt."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)


def tiny_unet(seed: int, channels=(8, 16)) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
    ).eval()  # fmt: skip


def sd_components(scheduler) -> dict:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=8,
    )  # fmt: skip
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
            max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16,
        )
    )  # fmt: skip
    return dict(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=tiny_unet(0), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def ddpm_scheduler():
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
    )


def euler_scheduler():
    return EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )


SCHEDULERS = {"ddpm": ddpm_scheduler, "euler-ancestral": euler_scheduler}


def sd_pipe(scheduler) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(**sd_components(scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def speculative(pipe, **options) -> SpeculativeStableDiffusionPipeline:
    spec = SpeculativeStableDiffusionPipeline.from_pipe(pipe, **options)
    spec.set_progress_bar_config(disable=True)
    return spec


# -- window = 1: StableDiffusionPipeline's images -------------------------------------------------------


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_window_one_gives_stable_diffusion_images_batch_one(scheduler):
    base = sd_pipe(SCHEDULERS[scheduler]())
    kwargs = dict(prompt="a red fox", num_inference_steps=6, guidance_scale=7.5, output_type="np")
    want = base(generator=torch.Generator().manual_seed(0), **kwargs).images
    out = speculative(base)(generator=torch.Generator().manual_seed(0), window=1, **kwargs)
    assert isinstance(out, SpeculativeStableDiffusionPipelineOutput) and out.nsfw_content_detected is None
    np.testing.assert_array_equal(out.images, want)
    assert out.stats.num_steps == 6


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_window_one_gives_stable_diffusion_images_with_a_generator_list(scheduler):
    base = sd_pipe(SCHEDULERS[scheduler]())

    def gens():
        return [torch.Generator().manual_seed(s) for s in (1, 2, 3)]

    kwargs = dict(
        prompt="a red fox", negative_prompt="blur", num_images_per_prompt=3, num_inference_steps=5, output_type="np"
    )
    want = base(generator=gens(), **kwargs).images
    got = speculative(base)(generator=gens(), window=1, **kwargs).images
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("per_sample_generators", [False, True])
def test_different_prompts_in_one_batch_give_stable_diffusion_images(per_sample_generators):
    base = sd_pipe(ddpm_scheduler())
    if per_sample_generators:
        def gens():
            return [torch.Generator().manual_seed(s) for s in (4, 5, 6, 7)]
    else:
        def gens():
            return torch.Generator().manual_seed(4)
    kwargs = dict(
        prompt=["a cat", "a dog"], negative_prompt=["blur", "dark"], num_images_per_prompt=2,
        num_inference_steps=5, output_type="np",
    )  # fmt: skip
    want = base(generator=gens(), **kwargs).images
    out = speculative(base)(generator=gens(), window=1, **kwargs)
    np.testing.assert_array_equal(out.images, want)  # one run at batch 4, as the plain pipeline's
    assert out.stats.batch_size == 4 and out.stats.target_calls == 5


def test_a_batch_of_different_prompts_is_one_speculative_run():
    """8 different prompts cost about the target calls of 8 copies of one prompt (one run each),
    not 8 runs."""
    base = sd_pipe(euler_scheduler())
    with torch.no_grad():
        base.unet.conv_out.weight.mul_(0.1)  # a smoother model, so that drafts get accepted
    spec = speculative(base, window=4, frozen_prediction="model_output")
    common = dict(num_inference_steps=12, guidance_scale=4.0, output_type="latent")
    prompts = ["a cat", "a dog", "a fox", "an owl", "a red car", "blue sky", "green tea", "a ship"]
    mixed = spec(prompt=prompts, generator=torch.Generator().manual_seed(0), **common).stats
    same = spec(prompt=["a cat"] * 8, generator=torch.Generator().manual_seed(0), **common).stats
    assert mixed.batch_size == same.batch_size == 8
    assert mixed.accepted > 0 and same.accepted > 0
    assert mixed.target_calls <= same.target_calls + 1 < 12  # one run per prompt would cost 8 x 3 at least
    plain = spec(prompt=prompts, generator=torch.Generator().manual_seed(0), window=1, **common).stats
    assert plain.target_calls == 12


def test_a_draft_unet_conditions_each_row_on_its_own_prompt():
    """The target's own UNet as draft model, with different prompts: every drafted step has
    Delta ~ 0 (batch-size rounding only), so is accepted, which holds only if each drafted row got
    its own prompt; the images are the plain pipeline's up to that rounding."""
    base = sd_pipe(ddpm_scheduler())
    kwargs = dict(prompt=["a cat", "a dog", "a fox"], num_inference_steps=6, output_type="np", guidance_scale=3.0)
    want = base(generator=torch.Generator().manual_seed(2), **kwargs).images
    out = speculative(base, window=3)(generator=torch.Generator().manual_seed(2), draft_unet=base.unet, **kwargs)
    assert out.stats.proposed > 0 and out.stats.accepted == out.stats.proposed
    np.testing.assert_allclose(out.images, want, atol=1e-5)


def test_prompt_embeds_are_accepted_in_place_of_prompts():
    spec = speculative(sd_pipe(ddpm_scheduler()), window=3)
    embeds, negative = spec.encode_prompt("a red fox", "cpu", 1, True, "blur")
    common = dict(num_inference_steps=5, output_type="np", guidance_scale=5.0)
    a = spec(prompt="a red fox", negative_prompt="blur", generator=torch.Generator().manual_seed(0), **common).images
    b = spec(
        prompt_embeds=embeds, negative_prompt_embeds=negative, generator=torch.Generator().manual_seed(0), **common
    ).images
    np.testing.assert_array_equal(a, b)


# -- window > 1: the law of StableDiffusionPipeline ------------------------------------------------------


ALPHA = 1e-3  # family-wise level of each two-sample test (KS on 20 projections, Bonferroni)
MIN_REJECTED = 0.05  # a law test must see at least this share of drafted steps reflected
N_LAW, LAW_OPTIONS = 500, dict(prompt="a red fox", num_inference_steps=6, guidance_scale=4.0, output_type="latent")


@pytest.fixture(scope="module")
def sd_law_reference():
    base = sd_pipe(euler_scheduler())
    return base, base(num_images_per_prompt=N_LAW, generator=torch.Generator().manual_seed(10), **LAW_OPTIONS).images


def sd_law_run(base, drafter):
    extra = {"draft_unet": tiny_unet(1, channels=(4, 4))} if drafter == "draft_unet" else {"drafter": drafter}
    spec = speculative(base, window=3)
    return spec(num_images_per_prompt=N_LAW, generator=torch.Generator().manual_seed(20), **LAW_OPTIONS, **extra)


@pytest.mark.parametrize("drafter", ["frozen", "picard", "draft_unet"])
def test_speculative_latents_have_the_law_of_stable_diffusion(sd_law_reference, drafter):
    """A smoke test of the law: this tiny SD rejects nearly every drafted step (Euler ancestral,
    6 steps, 256-d latents: measured 0% accepted for frozen, picard and the draft UNet), so the
    samples come from the reflection and the classic bug (a fresh target draw on rejection) has
    no bias to detect here (measured: not detected, min p 0.04). The reflection is checked
    pathwise in tests/test_coupling.py and the coupling's power on analytic models."""
    base, want = sd_law_reference
    out = sd_law_run(base, drafter)
    assert out.images.shape == want.shape == (N_LAW, 4, 8, 8)
    assert_same_law(out.images, want, alpha=ALPHA)
    rejected = out.stats.proposed - out.stats.accepted
    assert rejected >= MIN_REJECTED * out.stats.proposed, (
        f"too few reflections to exercise the coupling: {out.stats.summary()}"
    )
    assert (out.stats.draft_calls > 0) == (drafter == "draft_unet")


# -- construction, from_pipe, save / load, errors ---------------------------------------------------------


def test_from_pipe_shares_components_and_wraps_the_scheduler():
    base = sd_pipe(ddpm_scheduler())
    spec = SpeculativeStableDiffusionPipeline.from_pipe(base, window=4)
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        assert getattr(spec, name) is getattr(base, name)
    assert isinstance(spec.scheduler, SpeculativeScheduler) and spec.scheduler.config.window == 4
    assert isinstance(base.scheduler, DDPMScheduler)


def test_deterministic_scheduler_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match=r"PNDMScheduler cannot be sampled speculatively.*deterministic"):
        SpeculativeStableDiffusionPipeline(**sd_components(PNDMScheduler()))


def test_tiny_tokenizer_tokenizes_letters():
    ids = tiny_tokenizer()("a fox").input_ids
    assert ids == [0, 28, 7, 16, 51, 1]  # <start> a</w> f o x</w> <end>


def test_save_pretrained_round_trips_offline(tmp_path):
    spec = speculative(sd_pipe(euler_scheduler()), window=2)
    spec.save_pretrained(tmp_path)
    loaded = SpeculativeStableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.tokenizer("a red fox").input_ids == spec.tokenizer("a red fox").input_ids
    assert isinstance(loaded.scheduler, SpeculativeScheduler) and loaded.scheduler.config.window == 2
    assert isinstance(loaded.scheduler.base_scheduler, EulerAncestralDiscreteScheduler)
    kwargs = dict(prompt="a red fox", num_inference_steps=4, output_type="np")
    a = spec(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = loaded(generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(a, b, atol=1e-5)  # reloaded modules: same weights, may differ in the last bit


def test_pil_output_and_tuple_return():
    spec = speculative(sd_pipe(ddpm_scheduler()), window=2)
    out = spec(prompt="a fox", num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (8, 8)
    images, nsfw, stats = spec(prompt="a fox", num_inference_steps=3, output_type="np", return_dict=False)
    assert images.shape == (1, 8, 8, 3) and nsfw is None and stats.num_steps == 3


def test_loads_as_a_diffusers_custom_pipeline_by_file_path(tmp_path, monkeypatch):
    from pathlib import Path

    import diffusers.utils.dynamic_modules_utils as dynamic
    from diffusers import DiffusionPipeline

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # keep the copy local
    sd_pipe(ddpm_scheduler()).save_pretrained(tmp_path / "sd")
    path = Path(__file__).resolve().parents[1] / "pipelines" / "pipeline_speculative_stable_diffusion.py"
    pipe = DiffusionPipeline.from_pretrained(
        tmp_path / "sd", custom_pipeline=str(path), trust_remote_code=True, local_files_only=True
    )
    assert type(pipe).__name__ == "SpeculativeStableDiffusionPipeline"
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a fox", num_inference_steps=3, output_type="np", window=2, generator=torch.Generator().manual_seed(0))
    assert np.isfinite(out.images).all() and out.stats.num_steps == 3


# -- dtypes and scheduler options through from_pipe ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_from_pipe_keeps_half_precision_and_decodes_to_every_output_type(dtype):
    base = sd_pipe(ddpm_scheduler()).to(dtype=dtype)
    spec = speculative(base, window=2)
    assert spec.unet.dtype == base.unet.dtype == dtype and spec.vae.dtype == dtype  # nothing cast to float32
    kwargs = dict(prompt="a fox", num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert spec(output_type="np", **kwargs).images.dtype == np.float32
    assert spec(output_type="pil", **kwargs).images[0].size == (8, 8)


def test_from_pipe_honours_eta_for_ddim():
    from diffusers import DDIMScheduler

    base = sd_pipe(DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1))
    spec = speculative(base, eta=1.0)
    assert spec.scheduler.config.eta == 1.0
    out = spec(prompt="a fox", num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0))
    assert np.isfinite(out.images).all()
