"""SpeculativeDDPMPipeline is a drop-in DDPMPipeline with the same law.

Tiny randomly initialised UNets (no download): ``window=1`` gives DDPMPipeline's images
bit for bit; ``window > 1`` passes a two-sample test against DDPMPipeline, with the frozen
drafter and with a smaller draft UNet; the pipeline saves, reloads and loads as a diffusers
custom pipeline offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, EulerAncestralDiscreteScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

import specdiff
from specdiff.pipelines import SpeculativeDDPMPipeline, SpeculativeImagePipelineOutput
from specdiff.schedulers import SpeculativeScheduler
from specdiff.testing import assert_same_law

ROOT = Path(__file__).resolve().parents[1]


def tiny_unet(seed: int = 0, channels=(8, 16)) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False,
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def ddpm_pipe():
    pipe = DDPMPipeline(unet=tiny_unet(0), scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def spec_from(pipe, **options) -> SpeculativeDDPMPipeline:
    spec = SpeculativeDDPMPipeline.from_pipe(pipe, **options)
    spec.set_progress_bar_config(disable=True)
    return spec


# -- window = 1: the same images as DDPMPipeline -----------------------------------------------------


@pytest.mark.parametrize("output_type", ["np", "pt"])
def test_window_one_gives_ddpm_pipeline_images_batch_one(ddpm_pipe, output_type):
    want = ddpm_pipe(
        batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=10, output_type=output_type
    ).images
    got = spec_from(ddpm_pipe)(
        batch_size=1,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=10,
        output_type=output_type,
        window=1,
    ).images
    assert type(got) is type(want) and got.shape == want.shape
    assert (got == want).all(), "bit-identical images expected"


def test_window_one_gives_ddpm_pipeline_images_with_a_generator_list(ddpm_pipe):
    def gens():
        return [torch.Generator().manual_seed(s) for s in (3, 4, 5)]

    want = ddpm_pipe(batch_size=3, generator=gens(), num_inference_steps=10, output_type="np").images
    got = spec_from(ddpm_pipe)(
        batch_size=3, generator=gens(), num_inference_steps=10, output_type="np", window=1
    ).images
    np.testing.assert_array_equal(got, want)


def test_window_one_gives_ddpm_pipeline_images_with_one_generator_for_a_batch(ddpm_pipe):
    want = ddpm_pipe(
        batch_size=4, generator=torch.Generator().manual_seed(7), num_inference_steps=10, output_type="np"
    ).images
    got = spec_from(ddpm_pipe)(
        batch_size=4, generator=torch.Generator().manual_seed(7), num_inference_steps=10, output_type="np", window=1
    ).images
    np.testing.assert_array_equal(got, want)


def test_pil_output_and_tuple_return(ddpm_pipe):
    spec = spec_from(ddpm_pipe, window=3)
    out = spec(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=6)
    assert isinstance(out, SpeculativeImagePipelineOutput)
    assert len(out.images) == 2 and out.images[0].size == (8, 8)
    assert isinstance(out.stats, specdiff.SpeculativeStats) and out.stats.num_steps == 6
    images, stats = spec(
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=6,
        output_type="np",
        return_dict=False,
    )
    np.testing.assert_array_equal(
        (images * 255).round().astype("uint8"), np.stack([np.asarray(im) for im in out.images])
    )
    assert stats.target_calls == out.stats.target_calls


# -- window > 1: the law of DDPMPipeline ---------------------------------------------------------------

N_LAW = 2000
STEPS_LAW = 10
ALPHA = 1e-3  # family-wise level of each two-sample test (KS on 20 projections, Bonferroni)
MIN_REJECTED = 0.05  # a law test must see at least this share of drafted steps reflected


@pytest.fixture(scope="module")
def ddpm_samples(ddpm_pipe):
    return ddpm_pipe(
        batch_size=N_LAW, generator=torch.Generator().manual_seed(100), num_inference_steps=STEPS_LAW, output_type="pt"
    ).images


def law_run(ddpm_pipe, drafter):
    spec = spec_from(ddpm_pipe, window=3)
    kwargs = {"draft_unet": tiny_unet(1, channels=(4, 8))} if drafter == "draft_unet" else {"drafter": drafter}
    return spec(
        batch_size=N_LAW,
        generator=torch.Generator().manual_seed(200),
        num_inference_steps=STEPS_LAW,
        output_type="pt",
        **kwargs,
    )


@pytest.mark.parametrize("drafter", ["frozen", "draft_unet"])
def test_speculative_images_have_the_law_of_ddpm_pipeline(ddpm_pipe, ddpm_samples, drafter):
    """A smoke test of the law, not a proof: at 10 steps the frozen drafter accepts ~10% of its
    steps, and the classic bug (a fresh target draw on rejection) is NOT detected at this n
    (measured min p 2.4e-3 against the threshold 5e-5). The coupling's power is shown on
    analytic models (tests/test_sampler.py, tests/test_coupling.py) and on the SD, SDXL and flow
    pipelines, whose negative controls fail at their n."""
    out = law_run(ddpm_pipe, drafter)
    assert out.images.shape == ddpm_samples.shape
    assert_same_law(out.images, ddpm_samples, alpha=ALPHA)
    stats = out.stats
    rejected = stats.proposed - stats.accepted
    assert rejected >= MIN_REJECTED * stats.proposed, f"too few reflections to exercise the coupling: {stats.summary()}"
    assert (stats.draft_calls > 0) == (drafter == "draft_unet")


# -- construction, from_pipe, save / load, custom pipeline ---------------------------------------------


def test_constructor_wraps_a_plain_scheduler_and_accepts_a_speculative_one():
    unet = tiny_unet(0)
    pipe = SpeculativeDDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type="fixed_large"))
    assert isinstance(pipe.scheduler, SpeculativeScheduler)
    assert pipe.scheduler.base_scheduler.config.variance_type == "fixed_large"
    spec = SpeculativeScheduler.from_scheduler(DDPMScheduler(), window=2)
    assert SpeculativeDDPMPipeline(unet=unet, scheduler=spec).scheduler is spec


def test_from_pipe_shares_the_unet_and_sets_scheduler_options(ddpm_pipe):
    spec = SpeculativeDDPMPipeline.from_pipe(ddpm_pipe, window=5)
    assert spec.unet is ddpm_pipe.unet
    assert isinstance(spec.scheduler, SpeculativeScheduler) and spec.scheduler.config.window == 5
    assert isinstance(ddpm_pipe.scheduler, DDPMScheduler), "the original pipeline is untouched"


def test_unsupported_scheduler_is_refused_with_a_clear_error():
    from diffusers import PNDMScheduler

    with pytest.raises(ValueError, match="deterministic"):
        SpeculativeDDPMPipeline(unet=tiny_unet(0), scheduler=PNDMScheduler())


def test_save_pretrained_round_trips_offline(tmp_path, ddpm_pipe):
    spec = spec_from(ddpm_pipe, window=4)
    spec.register_modules(draft_unet=tiny_unet(1, channels=(4, 8)))
    spec.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["specdiff.schedulers.speculative", "SpeculativeScheduler"]
    assert (tmp_path / "draft_unet" / "config.json").exists()

    loaded = SpeculativeDDPMPipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.window == 4 and isinstance(loaded.draft_unet, UNet2DModel)
    kwargs = dict(batch_size=2, num_inference_steps=5, output_type="np")
    a = spec(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = loaded(generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(a, b, atol=1e-5)  # reloaded UNet: same weights, may differ in the last bit


def test_loads_as_a_diffusers_custom_pipeline_by_file_path(tmp_path, ddpm_pipe, monkeypatch):
    import diffusers.utils.dynamic_modules_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # keep the copy local
    ddpm_pipe.save_pretrained(tmp_path / "ddpm")
    pipe = DiffusionPipeline.from_pretrained(
        tmp_path / "ddpm",
        custom_pipeline=str(ROOT / "pipelines" / "pipeline_speculative_ddpm.py"),
        trust_remote_code=True,
        local_files_only=True,
    )
    assert type(pipe).__name__ == "SpeculativeDDPMPipeline"
    assert type(pipe.scheduler).__name__ == "SpeculativeScheduler"
    pipe.set_progress_bar_config(disable=True)
    # Compare with DDPMPipeline loaded from the same files: a UNet reloaded from disk can differ
    # from the in-memory one in the last bit (same weights, different conv kernels picked).
    plain = DDPMPipeline.from_pretrained(tmp_path / "ddpm", local_files_only=True)
    plain.set_progress_bar_config(disable=True)
    want = plain(generator=torch.Generator().manual_seed(1), num_inference_steps=5, output_type="np").images
    got = pipe(generator=torch.Generator().manual_seed(1), num_inference_steps=5, output_type="np", window=1).images
    np.testing.assert_array_equal(got, want)


# -- progress bar, callbacks, drafters, other schedulers -------------------------------------------


def test_progress_bar_is_silenced_by_set_progress_bar_config(ddpm_pipe, capsys):
    spec = SpeculativeDDPMPipeline.from_pipe(ddpm_pipe, window=3)
    spec.set_progress_bar_config(disable=True)
    spec(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5, output_type="np")
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    spec.set_progress_bar_config(disable=False)
    spec(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5, output_type="np")
    err = capsys.readouterr().err
    assert "speculative sampling" in err and "5/5" in err  # labelled, counted in steps per image, as DDPMPipeline


def test_callback_on_step_end_sees_every_round_and_cannot_change_latents(ddpm_pipe):
    spec = spec_from(ddpm_pipe, window=3)
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append((i, int(t), kwargs["latents"].shape, kwargs["steps"].tolist()))
        return kwargs

    out = spec(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=6, output_type="np",
               callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "steps"])  # fmt: skip
    assert len(seen) == out.stats.rounds
    assert seen[-1][0] == 5 and seen[-1][3] == [6, 6] and seen[0][2] == (2, 3, 8, 8)

    def meddler(pipe, i, t, kwargs):
        return {"latents": kwargs["latents"] + 1}

    with pytest.raises(ValueError, match="cannot take modified tensors"):
        spec(
            batch_size=1,
            generator=torch.Generator().manual_seed(0),
            num_inference_steps=4,
            callback_on_step_end=meddler,
        )


def test_drafter_can_be_a_model_function(ddpm_pipe):
    spec = spec_from(ddpm_pipe, window=3)
    calls = []
    draft = tiny_unet(2, channels=(4, 8))

    def drafter(x, t):
        calls.append(x.shape[0])
        return draft(x, t).sample

    out = spec(
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=6,
        output_type="np",
        drafter=drafter,
    )
    assert calls and out.stats.draft_calls == len(calls)


def euler_ancestral_loop(unet, batch_size, generator, num_inference_steps):
    """diffusers' own sampling loop for an Euler-ancestral scheduler, written out: noise times
    init_noise_sigma, then scale_model_input, the UNet and step(generator=...) at every timestep;
    images in [0, 1] as output_type="pt"."""
    scheduler = EulerAncestralDiscreteScheduler()
    scheduler.set_timesteps(num_inference_steps)
    shape = (batch_size, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = randn_tensor(shape, generator=generator, dtype=unet.dtype) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("per_sample", [False, True])
def test_euler_ancestral_at_window_one_is_the_diffusers_loop_bit_for_bit(per_sample):
    unet = tiny_unet(0)
    make = (lambda: [torch.Generator().manual_seed(s) for s in (3, 4, 5)]) if per_sample else (
        lambda: torch.Generator().manual_seed(7))
    want = euler_ancestral_loop(unet, 3, make(), 6)
    pipe = SpeculativeDDPMPipeline(unet=unet, scheduler=EulerAncestralDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=3, generator=make(), num_inference_steps=6, output_type="pt", window=1)
    assert torch.equal(out.images, want), "window=1 must be diffusers' Euler-ancestral loop bit for bit"
    assert out.stats.target_calls == 6


def test_euler_ancestral_at_window_three_has_the_law_of_the_diffusers_loop():
    """At window 3 (frozen drafter) the images have the law of diffusers' loop, at ALPHA
    (family-wise over the projections), and the coupling was exercised (>= 5% reflected). With
    this tiny random UNet every drafted step is reflected (measured 0% accepted), so this checks
    the reflection path in law only; resample-on-reject has no bias to detect here."""
    unet, n = tiny_unet(0), 1000
    want = euler_ancestral_loop(unet, n, torch.Generator().manual_seed(100), 8)
    pipe = SpeculativeDDPMPipeline(unet=unet, scheduler=EulerAncestralDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=n, generator=torch.Generator().manual_seed(200), num_inference_steps=8, output_type="pt",
               window=3, drafter="frozen")
    assert_same_law(out.images, want, alpha=ALPHA)
    rejected = out.stats.proposed - out.stats.accepted
    assert rejected >= MIN_REJECTED * out.stats.proposed > 0, f"too few reflections: {out.stats.summary()}"


def test_the_default_settings_repeat_a_seeds_images(ddpm_pipe):
    """No window given: the automatic window, from a cached calibration and the run's own counts,
    so the same seed gives the same images (the pipeline builds a new chain per call)."""
    spec = spec_from(ddpm_pipe)
    runs = [spec(batch_size=2, num_inference_steps=60, generator=torch.Generator().manual_seed(7), output_type="pt")
            for _ in range(2)]
    assert runs[0].stats.window_choice.startswith("auto window") and runs[0].stats.rounds < 60
    assert torch.equal(runs[0].images, runs[1].images)
    assert runs[0].stats.chosen_windows == runs[1].stats.chosen_windows
