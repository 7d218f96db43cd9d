"""A ``SpeculativeScheduler`` driven by a PLAIN diffusers pipeline's ``step()`` loop.

``pipe.scheduler = SpeculativeScheduler.from_scheduler(pipe.scheduler, window=8)`` on a plain
pipeline, or a saved speculative folder loaded with the plain pipeline class, cannot speculate
(the loop asks for one step at a time). It must then be exactly the wrapped scheduler: diffusers
passes ``generator=`` (and ``eta=``) to ``scheduler.step`` only where the step's signature names
them, so the wrapper's ``step`` shows the wrapped scheduler's signature and forwards them. The
same seed gives the same images, bit for bit those of the plain scheduler, and the wrapper says
once (a warning) which speculative pipeline to use.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, StableDiffusionPipeline
from test_pipeline_stable_diffusion import ddpm_scheduler, sd_components
from test_pipelines_ddpm import tiny_unet

from specdiff.schedulers import PlainStepWarning, SpeculativeScheduler


def plain_sd(scheduler) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(**sd_components(scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


SD_CALL = {"prompt": "a red fox", "num_inference_steps": 4, "guidance_scale": 7.5, "output_type": "np"}


def run_recording(pipe, **kwargs):
    """``pipe(**kwargs).images`` and the ``PlainStepWarning``s the run raised (all of them: "always")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = pipe(**kwargs).images
    return images, [w for w in caught if issubclass(w.category, PlainStepWarning)]


def test_a_swapped_in_wrapper_keeps_the_generator_in_stable_diffusions_loop():
    want = plain_sd(ddpm_scheduler())(generator=torch.Generator().manual_seed(0), **SD_CALL).images
    pipe = plain_sd(ddpm_scheduler())
    pipe.scheduler = SpeculativeScheduler.from_scheduler(pipe.scheduler, window=8)
    first, said = run_recording(pipe, generator=torch.Generator().manual_seed(0), **SD_CALL)
    second, said_again = run_recording(pipe, generator=torch.Generator().manual_seed(0), **SD_CALL)
    np.testing.assert_array_equal(first, second)  # the seed decides the images
    np.testing.assert_array_equal(first, want)  # bit for bit the wrapped scheduler's
    assert len(said) == 1 and not said_again, "said once per scheduler"
    message = str(said[0].message)
    assert "SpeculativeStableDiffusionPipeline" in message and "no speculation" in message


def test_a_saved_speculative_folder_loaded_by_the_plain_class_is_the_plain_sampler(tmp_path):
    from specdiff.pipelines import SpeculativeStableDiffusionPipeline

    base = plain_sd(ddpm_scheduler())
    SpeculativeStableDiffusionPipeline.from_pipe(base, window=4).save_pretrained(tmp_path)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, SpeculativeScheduler)
    plain = StableDiffusionPipeline(**{**loaded.components, "scheduler": loaded.scheduler.base_scheduler})
    plain.set_progress_bar_config(disable=True)
    want = plain(generator=torch.Generator().manual_seed(3), **SD_CALL).images
    got, said = run_recording(loaded, generator=torch.Generator().manual_seed(3), **SD_CALL)
    np.testing.assert_array_equal(got, want)
    assert len(said) == 1


def test_a_swapped_in_wrapper_in_ddpm_pipeline_is_ddpm_bit_for_bit():
    call = {"batch_size": 2, "num_inference_steps": 6, "output_type": "np"}
    pipe = DDPMPipeline(unet=tiny_unet(0), scheduler=DDPMScheduler(num_train_timesteps=100))
    pipe.set_progress_bar_config(disable=True)
    want = pipe(generator=torch.Generator().manual_seed(5), **call).images
    pipe.scheduler = SpeculativeScheduler.from_scheduler(pipe.scheduler, window=8)
    got, said = run_recording(pipe, generator=torch.Generator().manual_seed(5), **call)
    np.testing.assert_array_equal(got, want)
    assert len(said) == 1 and "SpeculativeDDPMPipeline" in str(said[0].message)


def test_the_wrappers_step_shows_the_wrapped_steps_signature_and_forwards_eta():
    """diffusers' ``prepare_extra_step_kwargs`` looks for ``eta`` and ``generator`` in the signature;
    an explicit ``eta`` wins over the wrapper's, as it would reach the wrapped DDIM."""
    base = DDIMScheduler(clip_sample=False)
    spec = SpeculativeScheduler.from_scheduler(base, eta=1.0)
    assert inspect.signature(spec.step).parameters.keys() == inspect.signature(base.step).parameters.keys()
    assert "eta" not in inspect.signature(SpeculativeScheduler.from_scheduler(DDPMScheduler()).step).parameters
    base.set_timesteps(5)
    spec.set_timesteps(5)
    x, out, t = torch.randn(2, 4), torch.randn(2, 4), base.timesteps[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlainStepWarning)
        for eta in (0.0, 0.5):  # the explicit eta, as keyword and positionally
            want = base.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(1)).prev_sample
            got = spec.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(1)).prev_sample
            assert torch.equal(got, want)
            got = spec.step(out, t, x, eta, generator=torch.Generator().manual_seed(1)).prev_sample
            assert torch.equal(got, want)
        want = base.step(out, t, x, eta=1.0, generator=torch.Generator().manual_seed(1)).prev_sample
        got = spec.step(out, t, x, generator=torch.Generator().manual_seed(1)).prev_sample  # the wrapper's eta
        assert torch.equal(got, want)


def test_a_wrong_step_argument_is_the_wrapped_schedulers_error():
    spec = SpeculativeScheduler.from_scheduler(DDPMScheduler())
    spec.set_timesteps(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlainStepWarning)
        with pytest.raises(TypeError, match="eta"):
            spec.step(torch.randn(1, 4), spec.timesteps[0], torch.randn(1, 4), eta=0.5)
