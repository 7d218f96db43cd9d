"""``verify`` and ``coupling`` in every speculative pipeline's ``__call__``: the call's value overrides
the scheduler's config (the run is bit for bit the run of a scheduler configured so), a bad value is
one clear error naming the choices, and ``window=1`` with ``verify="block"`` is the plain pipeline bit
for bit. Block verification's exactness itself is tests/test_block_verification.py's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from test_pipeline_max_rows import PIPELINES, decisions, output
from test_pipeline_score_sde_ve import STEPS as SDE_STEPS
from test_pipeline_score_sde_ve import pipes as sde_pipes
from test_pipelines_ddpm import tiny_unet

import specdiff.round
from specdiff.pipelines import SpeculativeDDPMPipeline
from specdiff.schedulers import SpeculativeScheduler

SCHEDULED = ["ddpm", "stable-diffusion", "stable-diffusion-xl", "sd3", "flux"]  # config: SpeculativeScheduler's
DISCRETE = ["masked", "text", "text-blocks"]  # no scheduler config: the call's verify, "step" by default


@pytest.fixture
def block_calls(monkeypatch):
    """How many rounds ran the block rule (``specdiff.round.accept_block``)."""
    calls = []
    real = specdiff.round.accept_block

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(specdiff.round, "accept_block", spy)
    return calls


def run(pipe, call, window=4, seeds=(1, 2), **options):
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=[torch.Generator().manual_seed(s) for s in seeds], window=window, **call, **options)


def reconfigured(pipe, **config):
    pipe.scheduler = SpeculativeScheduler.from_scheduler(pipe.scheduler, **config)
    return pipe


def same_run(a, b) -> None:
    assert decisions(a.stats) == decisions(b.stats)
    assert torch.equal(torch.as_tensor(output(a)), torch.as_tensor(output(b)))


def different_runs(a, b) -> None:
    """The two rules must differ here (decisions, or the draws at a cut), else the tests show nothing."""
    assert decisions(a.stats) != decisions(b.stats) or not torch.equal(torch.as_tensor(output(a)),
                                                                       torch.as_tensor(output(b)))


@pytest.mark.parametrize("name", SCHEDULED)
def test_the_call_verify_overrides_the_scheduler_config(name, block_calls):
    pipe, call = PIPELINES[name]()
    assert pipe.scheduler.config.verify == "step"
    by_call = run(pipe, call, verify="block")
    assert block_calls, "verify='block' in the call must run the block rule"
    plain_step = run(pipe, call)
    blocked = reconfigured(pipe, verify="block")
    block_calls.clear()
    by_config = run(blocked, call)
    assert block_calls
    same_run(by_call, by_config)
    different_runs(by_call, plain_step)
    block_calls.clear()
    stepped = run(blocked, call, verify="step")  # and the other way round
    assert not block_calls
    same_run(stepped, plain_step)


@pytest.mark.parametrize("name", ["ddpm", "stable-diffusion", "sd3"])
def test_the_call_coupling_overrides_the_scheduler_config(name, monkeypatch):
    used = []
    real = specdiff.sampler.kernel_for

    def spy(chain, x, coupling=None):
        kernel = real(chain, x, coupling)
        used.append(kernel.__name__)
        return kernel

    monkeypatch.setattr(specdiff.sampler, "kernel_for", spy)
    pipe, call = PIPELINES[name]()
    by_call = run(pipe, call, coupling="maximal")
    by_config = run(reconfigured(pipe, coupling="maximal"), call)
    reflected = run(pipe, call, coupling="reflection")
    assert used == ["MaximalKernel", "MaximalKernel", "GaussianKernel"]
    same_run(by_call, by_config)
    same_run(reflected, run(reconfigured(pipe, coupling="reflection"), call))


@pytest.mark.parametrize("name", DISCRETE)
def test_the_discrete_pipelines_take_verify(name, block_calls):
    pipe, call = PIPELINES[name]()
    step = run(pipe, call, window=8)
    assert not block_calls, "verify defaults to 'step'"
    block = run(pipe, call, window=8, verify="block")
    assert block_calls
    different_runs(block, step)
    same_run(block, run(pipe, call, window=8, verify="block"))  # reproducible


@pytest.mark.parametrize("name", SCHEDULED + DISCRETE)
def test_a_bad_verify_is_one_clear_error_naming_the_choices(name, block_calls):
    pipe, call = PIPELINES[name]()
    with pytest.raises(ValueError, match=r"verify must be one of \('step', 'block'\).*got 'blocks'"):
        run(pipe, call, verify="blocks")


@pytest.mark.parametrize("name", SCHEDULED)
def test_a_bad_coupling_is_one_clear_error_naming_the_choices(name):
    pipe, call = PIPELINES[name]()
    with pytest.raises(ValueError, match=r"coupling must be one of \('reflection', 'maximal'\).*got 'maximum'"):
        run(pipe, call, coupling="maximum")


def test_block_verification_with_the_maximal_coupling_is_one_clear_error():
    pipe, call = PIPELINES["ddpm"]()
    with pytest.raises(ValueError, match="pass verify='step' with it, or coupling='reflection'"):
        run(pipe, call, verify="block", coupling="maximal")


@pytest.mark.parametrize("name", ["masked", "text"])
def test_block_verification_beside_the_plain_sampler_is_refused(name):
    pipe, call = PIPELINES[name]()
    with pytest.raises(ValueError, match="verify='block'.*window=None"):
        run(pipe, call, window=None, verify="block")


def test_window_one_block_is_ddpm_pipeline_bit_for_bit(block_calls):
    unet = tiny_unet(0)
    plain = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100))
    plain.set_progress_bar_config(disable=True)
    fast = SpeculativeDDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100))
    fast.set_progress_bar_config(disable=True)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4, 5)]  # noqa: E731
    want = plain(batch_size=3, num_inference_steps=10, generator=gens(), output_type="np").images
    got = fast(batch_size=3, num_inference_steps=10, generator=gens(), output_type="np", window=1, verify="block")
    assert block_calls and np.array_equal(got.images, want)
    assert 0 < want.std()


@pytest.mark.parametrize("name", SCHEDULED + ["masked", "text", "text-blocks"])
def test_window_one_block_is_the_plain_pipeline_bit_for_bit(name, block_calls):
    """``window=1`` + ``verify="step"`` is each pipeline's plain loop (their own tests); block too."""
    pipe, call = PIPELINES[name]()
    block = run(pipe, call, window=1, verify="block")
    assert block_calls
    plain = run(pipe, call, window=None if name in DISCRETE else 1)
    assert torch.equal(torch.as_tensor(output(block)), torch.as_tensor(output(plain)))


def test_score_sde_ve_takes_verify_and_coupling(block_calls):
    plain, fast = sde_pipes()
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    want = plain(batch_size=2, num_inference_steps=SDE_STEPS, generator=gens(), output_type="np").images
    for options in ({"verify": "block"}, {"coupling": "maximal"}):
        got = fast(batch_size=2, num_inference_steps=SDE_STEPS, generator=gens(), output_type="np", window=1,
                   **options)
        assert np.array_equal(got.images, want)
    assert block_calls
    step = fast(batch_size=2, num_inference_steps=SDE_STEPS, generator=gens(), output_type="np", window=4)
    block = fast(batch_size=2, num_inference_steps=SDE_STEPS, generator=gens(), output_type="np", window=4,
                 verify="block")
    assert step.stats.accepted != block.stats.accepted or step.stats.target_calls != block.stats.target_calls
    with pytest.raises(ValueError, match="verify must be one of"):
        fast(batch_size=2, num_inference_steps=SDE_STEPS, window=4, verify="nope")
