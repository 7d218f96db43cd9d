"""The scheduler adapters and pipelines against the three classes of bug once
fixed in the sampler (acceptance thresholds, dtype casts between draft and verify, writes into
tensors the sampler does not own).

The regression tests named after a defect failed before its fix:

* Euler ancestral handed the network a float32 input for half-precision latents (diffusers
  keeps the latents' dtype), so a half-precision network refused it;
* DPM-Solver++ with ``prediction_type="sample"`` carried the network's own output tensor as the
  next step's D1, so a network reusing its output buffer silently made the plain sampler
  first order (D1 = D0) and window=1 no longer reproduced it;
* ``callback_on_step_end`` received the sampler's live state, so an in-place edit of ``latents``
  slipped past the "modified tensors are refused" check and changed the trajectory.

The half-precision coverage checks, for every adapter family, that fp16/bf16 latents give a
draft with the target's prediction exactly the target's law (Δ = 0: every step accepted) and
that window=1 is the plain sampler bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    UNet2DModel,
)

from specdiff.pipelines import SpeculativeDDPMPipeline
from specdiff.schedulers import SpeculativeScheduler

HALF = [torch.float16, torch.bfloat16]
FAMILIES = {
    "ddpm-clip": (lambda: DDPMScheduler(clip_sample=True), {}),
    "ddim-eta-0.7-clip": (lambda: DDIMScheduler(clip_sample=True), {"eta": 0.7}),
    "euler-ancestral": (lambda: EulerAncestralDiscreteScheduler(), {}),
    "dpm++-2m-sde-thresholding": (
        lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2, thresholding=True),
        {},
    ),
}


def wrapped(family: str, steps: int = 12, **options) -> SpeculativeScheduler:
    factory, step_kwargs = FAMILIES[family]
    spec = SpeculativeScheduler.from_scheduler(factory(), **step_kwargs, **options)
    spec.set_timesteps(steps)
    return spec


def strict_model(dtype):
    """An eps-model that, like a half-precision network, refuses input in any other dtype."""

    def model(x, t):
        if x.dtype != dtype:
            raise TypeError(f"the network got {x.dtype} input; its weights are {dtype}")
        scale = (t.float() / 1000).view(-1, *[1] * (x.ndim - 1))
        return (0.6 * x.float() * scale + 0.1 * torch.tanh(x.float().roll(1, -1))).to(dtype)

    return model


def latents(spec, dtype, n=8):
    x = torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * spec.init_noise_sigma
    return x.to(dtype)


# -- half precision through every adapter family --------------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("family", FAMILIES)
def test_window_one_reproduces_sample_baseline_bit_for_bit_in_half_precision(family, dtype):
    spec, model = wrapped(family), strict_model(dtype)
    x = latents(spec, dtype)
    plain = spec.sample_baseline(model, x, generator=torch.Generator().manual_seed(1))
    out = spec.sample(model, x, window=1, generator=torch.Generator().manual_seed(1))
    assert out.sample.dtype == dtype
    assert torch.equal(out.sample, plain)


@pytest.mark.parametrize("frozen", ["sample", "model_output"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_drafter_equal_to_the_target_is_accepted_at_every_step_in_half_precision(family, dtype, frozen):
    spec, model = wrapped(family, frozen_prediction=frozen), strict_model(dtype)
    x = latents(spec, dtype)
    same = strict_model(dtype)  # another function computing the same predictions: Δ must be exactly 0
    out = spec.sample(model, x, window=4, drafter=same, generator=torch.Generator().manual_seed(1))
    plain = spec.sample_baseline(model, x, generator=torch.Generator().manual_seed(1))
    assert out.stats.proposed > 0
    assert out.stats.accepted == out.stats.proposed
    assert torch.equal(out.sample, plain)


# -- Euler ancestral: the network sees the latents' dtype -------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
def test_euler_ancestral_model_input_is_diffusers_scale_model_input_in_half_precision(dtype):
    spec = wrapped("euler-ancestral")
    base, adapter = spec.base_scheduler, spec.adapter()
    x = latents(spec, dtype)
    for k, t in enumerate(base.timesteps):
        base._step_index = k
        want = base.scale_model_input(x, t)
        got = adapter.scale_model_input(x, torch.full((x.shape[0],), k))
        assert got.dtype == want.dtype == dtype
        assert torch.equal(got, want)


def test_euler_ancestral_runs_a_bfloat16_network():
    weight = torch.randn(48, 48, generator=torch.Generator().manual_seed(2)).div(48**0.5).to(torch.bfloat16)

    def network(x, t):  # F.linear refuses an input whose dtype differs from its weights'
        return F.linear(x.flatten(1), weight).view_as(x) * (t.to(x.dtype) / 1000).view(-1, 1, 1, 1)

    spec = wrapped("euler-ancestral")
    x = latents(spec, torch.bfloat16)
    plain = spec.sample_baseline(network, x, generator=torch.Generator().manual_seed(1))
    out = spec.sample(network, x, window=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.sample, plain)


# -- DPM-Solver++: the previous data prediction outlives the next network call ---------------------


class BufferedNetwork:
    """A network writing every output into one preallocated buffer (as CUDA graphs or static-IO
    runtimes do): the tensor it returned last time is overwritten by the next call."""

    def __init__(self):
        self.buffers = {}

    def __call__(self, x, t):
        out = self.buffers.setdefault(x.shape, torch.empty_like(x))
        return out.copy_(fresh_network(x, t))


def fresh_network(x, t):
    return 0.5 * x + 0.1 * x.roll(1, -1)


def test_dpm_solver_sample_prediction_survives_a_network_reusing_its_output_buffer():
    base = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2, prediction_type="sample")
    spec = SpeculativeScheduler.from_scheduler(base)
    spec.set_timesteps(20)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    want = spec.sample_baseline(fresh_network, x, generator=torch.Generator().manual_seed(1))
    plain = spec.sample_baseline(BufferedNetwork(), x, generator=torch.Generator().manual_seed(1))
    out = spec.sample(BufferedNetwork(), x, window=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain, want)  # second-order steps used the previous x0, not the current one
    assert torch.equal(out.sample, want)


# -- callback_on_step_end cannot edit the sampler's state in place -----------------------------------


def test_an_in_place_edit_of_latents_in_callback_on_step_end_is_refused():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False,
    ).eval()  # fmt: skip
    pipe = SpeculativeDDPMPipeline.from_pipe(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()), window=3)
    pipe.set_progress_bar_config(disable=True)

    def in_place(pipe, i, t, kwargs):
        kwargs["latents"].add_(1.0)
        return kwargs

    with pytest.raises(ValueError, match="cannot take modified tensors"):
        pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=4,
             callback_on_step_end=in_place, output_type="np")  # fmt: skip
