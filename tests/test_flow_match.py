"""Flow matching: our FlowMatchSDEScheduler's law, and speculative sampling of every flow scheduler.

Data are Gaussian (``x0 ~ N(mu, s^2)`` per coordinate), so the exact velocity
``v(x, t) = E[eps | x_t] - E[x0 | x_t]`` is known in closed form and the tests need no network.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LTXEulerAncestralRFScheduler

from specdiff.schedulers import FlowMatchSDEScheduler, SpeculativeScheduler
from specdiff.testing import assert_same_law

MU, S = 0.7, 0.4  # the data law, per coordinate
DIM = 6


def gaussian_velocity(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The exact flow velocity for x0 ~ N(MU, S^2) and x_t = (1 - t) x0 + t eps."""
    t = (timesteps.float() / 1000).view(-1, *[1] * (x.ndim - 1))
    var = (1 - t) ** 2 * S**2 + t**2
    centred = x - (1 - t) * MU
    return t * centred / var - (MU + (1 - t) * S**2 * centred / var)


def plain_loop(scheduler, x, generator, num_inference_steps):
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        x = scheduler.step(gaussian_velocity(x, t.expand(x.shape[0])), t, x, generator=generator).prev_sample
    return x


def test_churn_zero_is_the_flow_match_euler_ode_bit_for_bit():
    x = torch.randn(8, DIM, generator=torch.Generator().manual_seed(0))
    ode = plain_loop(FlowMatchEulerDiscreteScheduler(shift=3.0), x, None, 12)
    sde = plain_loop(FlowMatchSDEScheduler(shift=3.0, churn=0.0), x, torch.Generator().manual_seed(1), 12)
    assert torch.equal(ode, sde)


@pytest.mark.parametrize("churn", [0.5, 2.0])
def test_flow_sde_samples_the_data_law(churn):
    """With the exact velocity, the Euler-Maruyama chain lands on N(MU, S^2) (up to its
    discretisation error, invisible at 100 steps and 4000 samples)."""
    n = 4000
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(2))
    out = plain_loop(FlowMatchSDEScheduler(churn=churn), x, torch.Generator().manual_seed(3), 100)
    exact = MU + S * torch.randn(n, DIM, generator=torch.Generator().manual_seed(4))
    assert_same_law(out, exact, alpha=1e-3)


def test_flow_sde_scheduler_converts_from_a_flow_pipeline_config_and_reloads(tmp_path):
    base = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.4)
    sde = FlowMatchSDEScheduler.from_config(base.config, churn=0.8)
    assert sde.config.shift == 3.0 and sde.config.base_shift == 0.4 and sde.config.churn == 0.8
    spec = SpeculativeScheduler.from_scheduler(sde, window=4)
    spec.save_pretrained(tmp_path)
    loaded = SpeculativeScheduler.from_pretrained(tmp_path)
    assert isinstance(loaded.base_scheduler, FlowMatchSDEScheduler) and loaded.base_scheduler.config.churn == 0.8


SCHEDULERS = {
    "flow-euler-stochastic": lambda: FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=2.0),
    "ltx-euler-ancestral-rf": lambda: LTXEulerAncestralRFScheduler(eta=1.0),
    "flow-sde": lambda: FlowMatchSDEScheduler(churn=1.0, shift=2.0),
}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_speculative_flow_sampler_has_the_law_of_the_plain_one(name):
    spec = SpeculativeScheduler.from_scheduler(SCHEDULERS[name](), window=4)
    n = 2000
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(5))
    # A draft velocity that is off, so that rejections (reflections) happen.
    draft = lambda x, t: 1.1 * gaussian_velocity(x, t) + 0.05
    out = spec.sample(gaussian_velocity, x, num_inference_steps=20, drafter=draft, generator=torch.Generator().manual_seed(6))
    plain = spec.sample_baseline(gaussian_velocity, x, num_inference_steps=20, generator=torch.Generator().manual_seed(7))
    assert 0 < out.stats.acceptance_rate < 1 and out.stats.target_calls < 20
    assert_same_law(out.sample, plain, alpha=1e-3)
    window_one = spec.sample(gaussian_velocity, x, num_inference_steps=20, window=1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(window_one.sample, plain)
