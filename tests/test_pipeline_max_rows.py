"""``max_rows`` in every speculative pipeline's ``__call__``: it caps the states per network call
(a verify call holds up to batch x window states) and only splits calls: the run takes the same
decisions and gives the same images as without it, and the stats show no call above the cap.

"The same images" is up to the float rounding of a network evaluated at another batch size: CPU
kernels are not batch-invariant (measured here: at most 1e-5 of the largest value). With a network
that gives a row the same result in any batch the output is bit for bit the same
(tests/test_speculative_scheduler.py, the generator-list test)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from test_pipeline_flow import PIPES as FLOW_PIPES
from test_pipeline_flow import embeds as flow_embeds
from test_pipeline_flow import stochastic_flow
from test_pipeline_stable_diffusion import ddpm_scheduler, sd_components
from test_pipeline_stable_diffusion_xl import embeds as xl_embeds
from test_pipeline_stable_diffusion_xl import euler, xl_pipe
from test_pipelines_ddpm import tiny_unet

from specdiff.discrete import MaskedDiffusionScheduler
from specdiff.discrete.model import MaskedDiffusionTransformer
from specdiff.pipelines import (
    SpeculativeDDPMPipeline,
    SpeculativeMaskedDiffusionPipeline,
    SpeculativeStableDiffusionPipeline,
    SpeculativeStableDiffusionXLPipeline,
)
from specdiff.schedulers import PlainStepWarning

CAP = 3  # below the batch x window of every run here


def ddpm():
    pipe = SpeculativeDDPMPipeline(unet=tiny_unet(0), scheduler=DDPMScheduler(num_train_timesteps=100))
    return pipe, {"batch_size": 2, "num_inference_steps": 8, "output_type": "pt"}


def stable_diffusion():
    pipe = SpeculativeStableDiffusionPipeline(**sd_components(ddpm_scheduler()))
    return pipe, {"prompt": ["a fox", "an owl"], "num_inference_steps": 6, "output_type": "latent"}


def stable_diffusion_xl():
    pipe = SpeculativeStableDiffusionXLPipeline.from_pipe(xl_pipe(euler()))
    return pipe, {"num_inference_steps": 6, "guidance_scale": 5.0, "output_type": "latent", **xl_embeds(2, seed=1)}


def flow(name):
    make, cls, options = FLOW_PIPES[name]
    pipe = cls.from_pipe(make(stochastic_flow()))
    call = {"num_inference_steps": 6, "height": 8, "width": 8, "output_type": "latent", **options,
            **flow_embeds(2, seed=1, negative=name == "sd3")}
    return pipe, call


def masked():
    torch.manual_seed(0)
    transformer = MaskedDiffusionTransformer(vocab_size=4, sample_size=4, hidden_size=16, num_layers=1, num_heads=2)
    pipe = SpeculativeMaskedDiffusionPipeline(transformer.eval(), MaskedDiffusionScheduler(vocab_size=4))
    return pipe, {"batch_size": 2, "num_inference_steps": 12, "output_type": "latent"}


def text(block_size=None):
    from test_text_pipeline import tiny_bert

    from specdiff.pipelines import SpeculativeTextDiffusionPipeline
    from specdiff.text import char_tokenizer

    tokenizer = char_tokenizer("abc de")
    scheduler = MaskedDiffusionScheduler(vocab_size=len(tokenizer))
    pipe = SpeculativeTextDiffusionPipeline(tiny_bert(tokenizer), tokenizer, scheduler)
    return pipe, {"prompt": "ab", "num_samples": 2, "length": 8, "num_inference_steps": 12, "block_size": block_size}


PIPELINES = {
    "ddpm": ddpm,
    "stable-diffusion": stable_diffusion,
    "stable-diffusion-xl": stable_diffusion_xl,
    "sd3": lambda: flow("sd3"),
    "flux": lambda: flow("flux"),
    "masked": masked,
    "text": text,
    "text-blocks": lambda: text(block_size=4),
}


def decisions(stats):
    return stats.target_calls, stats.rounds, stats.proposed, stats.accepted, stats.chosen_windows


def output(out):
    return out.sequences if hasattr(out, "sequences") else out.images


@pytest.mark.parametrize("name", PIPELINES)
def test_max_rows_splits_the_calls_and_keeps_the_images(name):
    pipe, call = PIPELINES[name]()
    pipe.set_progress_bar_config(disable=True)
    runs = {cap: pipe(generator=[torch.Generator().manual_seed(s) for s in (1, 2)], window=4, max_rows=cap, **call)
            for cap in ("auto", CAP)}
    capped, free = runs[CAP].stats, runs["auto"].stats
    assert free.peak_rows > CAP, "the run without a cap must need more rows than the cap"
    assert capped.peak_rows <= CAP and capped.max_rows == CAP
    assert decisions(capped) == decisions(free), "the cap only splits calls"
    want = output(runs["auto"]).float()
    torch.testing.assert_close(output(runs[CAP]).float(), want, rtol=0, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("name", ["ddpm", "masked"])
def test_a_bad_max_rows_is_one_clear_error(name):
    pipe, call = PIPELINES[name]()
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="max_rows must be a positive integer"):
        pipe(window=4, max_rows=0, **call)


@pytest.mark.parametrize("name", ["masked", "text"])
def test_max_rows_beside_the_plain_sampler_is_refused(name):
    pipe, call = PIPELINES[name]()
    with pytest.raises(ValueError, match="max_rows"):
        pipe(window=None, max_rows=CAP, **call)


def test_the_cli_passes_max_rows_to_the_pipeline_and_its_plain_loop_says_nothing(tmp_path):
    import json
    import warnings

    from test_cli import tiny_pipeline

    from specdiff.cli import main

    model, out = tiny_pipeline(tmp_path / "model"), tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["generate", "--model", str(model), "--num-images", "2", "--steps", "8", "--window", "4",
                     "--max-rows", str(CAP), "--out", str(out), "--compare", "--no-progress"]) == 0
    batch = json.loads((out / "stats.json").read_text())["speculative"]["batches"][0]
    assert batch["max_rows"] == CAP and 0 < batch["peak_rows"] <= CAP
    assert not [w for w in caught if issubclass(w.category, PlainStepWarning)], "the plain baseline is on purpose"
