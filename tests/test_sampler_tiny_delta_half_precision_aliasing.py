"""Regression tests for three ways the law once broke (tiny Δ, half precision, aliasing).

Each test here failed on the code before its fix: the coupling accepted every step with
0 < ‖Δ‖ <= sqrt(eps) in float32; half-precision runs compared a rounded draft mean with a
float32 target mean (so even window=1 reflected steps); and a model returning its own input
had the committed state overwritten in place.
"""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from specdiff import (
    Drafter,
    SpeculativeScheduler,
    acceptance_probability,
    reflection_coupling,
    sample_baseline,
    speculative_sample,
)
from specdiff.testing import GaussianMixtureDDPM, two_sample_test

# Each two-sample test is at family-wise ALPHA over its projections (Bonferroni). The rejection
# count check uses Z_SE = 5 standard errors: two-sided level 2(1 - Phi(5)) = 5.7e-7.
ALPHA = 1e-3
Z_SE = 5.0
HALF = [torch.float16, torch.bfloat16]


# -- 1. small non-zero Δ is tested, not waved through -------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_tiny_delta_is_rejected_when_the_uniform_says_so(dtype):
    # ‖Δ‖ = 3e-4 along the first axis, z = 3: log r = -9e-4 - 4.5e-8. u = 0.9999 has
    # log u = -1e-4 > log r, so the step must be reflected; u = 0.999 (log u = -1.0005e-3) accepts.
    m_d = torch.tensor([[3e-4, 0.0]], dtype=dtype)
    m_t = torch.zeros(1, 2, dtype=dtype)
    z = torch.tensor([[3.0, 0.5]], dtype=dtype)
    x_d = m_d + z
    x, ok = reflection_coupling(x_d, m_d, m_t, 1.0, torch.tensor([0.9999]), noise=z)
    assert not ok.item()
    assert torch.allclose(x, torch.tensor([[-3.0, 0.5]], dtype=dtype), atol=1e-6)  # z reflected on axis 0
    x, ok = reflection_coupling(x_d, m_d, m_t, 1.0, torch.tensor([0.999]), noise=z)
    assert ok.item() and torch.equal(x, x_d)


def test_tiny_delta_acceptance_matches_theory_in_float32():
    # 1M rows at ‖Δ‖ = 3e-4 (float32): theory rejects 1 - 2Φ(-1.5e-4) ≈ 1.2e-4 of them (~120);
    # the old shortcut rejected none. Accept |observed - expected| <= Z_SE standard errors.
    n, delta = 1_000_000, 3e-4
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 1, generator=g)
    m_d = torch.full((n, 1), delta)
    m_t = torch.zeros(n, 1)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    _, ok = reflection_coupling(m_d + z, m_d, m_t, 1.0, u, noise=z)
    p_reject = 1 - float(acceptance_probability(m_d[:1].double(), m_t[:1].double(), 1.0))
    expected, se = n * p_reject, math.sqrt(n * p_reject * (1 - p_reject))
    rejected = int((~ok).sum())
    assert abs(rejected - expected) <= Z_SE * se, (rejected, expected)


def test_equal_means_always_accept_without_dividing_by_zero():
    z = torch.randn(64, 5, generator=torch.Generator().manual_seed(1))
    m = torch.randn(64, 5, generator=torch.Generator().manual_seed(2))
    x, ok = reflection_coupling(m + 0.3 * z, m, m.clone(), 0.3, torch.full((64,), 1 - 1e-12), noise=z)
    assert ok.all() and torch.isfinite(x).all()


# -- 2. half precision: the coupling sees the very means that produced the drafts -----------------


def ddpm(num_steps=20):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    wrapped = SpeculativeScheduler.from_scheduler(scheduler)
    wrapped.set_timesteps(num_steps)
    return wrapped


def toy_model(x, t):
    """A smooth eps-model, in the latents' dtype (like a half-precision UNet)."""
    scale = (t.float() / 1000).view(-1, *[1] * (x.ndim - 1))
    return (0.6 * x.float() * scale + 0.1 * torch.tanh(x.float().roll(1, -1))).to(x.dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_window_one_reproduces_the_plain_sampler_bit_for_bit_in_half_precision(dtype):
    scheduler = ddpm()
    x = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    plain = scheduler.sample_baseline(toy_model, x, generator=torch.Generator().manual_seed(1))
    out = scheduler.sample(toy_model, x, window=1, generator=torch.Generator().manual_seed(1))
    assert out.sample.dtype == dtype
    assert torch.equal(out.sample, plain)
    assert out.stats.proposed == 0  # every step was exact (fresh): nothing was put to the test


@pytest.mark.parametrize("dtype", HALF)
def test_fresh_steps_are_never_rejected_in_half_precision(dtype):
    scheduler = ddpm()
    x = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = scheduler.sample(toy_model, x, window=4, generator=torch.Generator().manual_seed(1),
                           drafter=toy_model)  # a draft model equal to the target: Δ = 0 everywhere
    plain = scheduler.sample_baseline(toy_model, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.sample, plain)
    assert out.stats.accepted == out.stats.proposed


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("window", [4, 16])
def test_whole_sampler_law_in_half_precision(dtype, window):
    chain = GaussianMixtureDDPM.random(dim=4, num_steps=100)
    n = 1500
    x = chain.sample_prior(n, torch.Generator().manual_seed(0)).to(dtype)
    plain = sample_baseline(chain, x, torch.Generator().manual_seed(1))
    spec = speculative_sample(chain, x, window=window, generator=torch.Generator().manual_seed(2)).sample
    assert spec.dtype == dtype
    result = two_sample_test(spec.double(), plain.double(), alpha=ALPHA)
    assert result.passed, str(result)


# -- 3. a prediction that shares memory with the state ---------------------------------------------


class IdentityX0Chain:
    """A chain whose network returns its input as the x0 prediction (aliases the state)."""

    def __init__(self, num_steps=40):
        self.inner = GaussianMixtureDDPM.random(dim=3, num_steps=num_steps, prediction_type="sample")
        self.num_steps = num_steps

    def predict(self, x, step):
        return x

    def transition(self, x, step, prediction):
        return self.inner.transition(x, step, prediction)


@pytest.mark.parametrize("window", [1, 4])
def test_a_model_returning_its_input_does_not_corrupt_the_state(window):
    chain = IdentityX0Chain()
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    before = x.clone()
    plain = sample_baseline(chain, x, torch.Generator().manual_seed(1))
    spec = speculative_sample(chain, x, window=window, generator=torch.Generator().manual_seed(1)).sample
    assert torch.equal(x, before)  # the caller's latents are never written
    if window == 1:
        assert torch.equal(spec, plain)
    else:
        big_plain = sample_baseline(chain, torch.cat([x] * 4), torch.Generator().manual_seed(5))
        big_spec = speculative_sample(chain, torch.cat([x] * 4), window=window,
                                      generator=torch.Generator().manual_seed(6)).sample
        result = two_sample_test(big_spec, big_plain, alpha=ALPHA)
        assert result.passed, str(result)


def identity(x, t):
    return x


def identity_ddpm():
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample", clip_sample=False)
    wrapped = SpeculativeScheduler.from_scheduler(scheduler)
    wrapped.set_timesteps(20)
    return wrapped


def diffusers_identity_loop(x, generator):
    """diffusers' own loop, written out: a fresh DDPMScheduler, step(identity(x, t), t, x, generator=...)."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample", clip_sample=False)
    scheduler.set_timesteps(20)
    for t in scheduler.timesteps:
        x = scheduler.step(identity(x, t), t, x, generator=generator).prev_sample
    return x


def test_ddpm_sample_prediction_with_an_identity_model_at_window_one_is_diffusers_loop_bit_for_bit():
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    want = diffusers_identity_loop(x.clone(), torch.Generator().manual_seed(1))
    got = identity_ddpm().sample(identity, x.clone(), window=1, generator=torch.Generator().manual_seed(1)).sample
    assert torch.equal(got, want)


def test_ddpm_sample_prediction_with_an_identity_model_has_the_law_of_diffusers_loop():
    """The model returns its input (aliasing); at window 4 the output has the law of diffusers'
    loop (ALPHA, family-wise over the projections) and of the plain sampler, with rejections."""
    wrapped = identity_ddpm()
    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    reference = diffusers_identity_loop(x.clone(), torch.Generator().manual_seed(1))
    plain = wrapped.sample_baseline(identity, x.clone(), generator=torch.Generator().manual_seed(1))
    out = wrapped.sample(identity, x.clone(), window=4, generator=torch.Generator().manual_seed(2))
    for want in (reference, plain):
        result = two_sample_test(out.sample.double(), want.double(), alpha=ALPHA)
        assert result.passed, str(result)
    assert out.stats.proposed - out.stats.accepted >= 1000, out.stats.summary()


def test_model_outputs_are_never_written_in_place():
    chain = GaussianMixtureDDPM.random(dim=3, num_steps=30)
    seen = []

    class Recording(GaussianMixtureDDPM):
        def predict(self, x, step):
            out = super().predict(x, step)
            seen.append((out, out._version))
            return out

    rec = Recording(chain.means, chain.scale, chain.weights, chain.num_steps, chain.prediction_type)
    x = chain.sample_prior(50, torch.Generator().manual_seed(0))
    speculative_sample(rec, x, window=6, generator=torch.Generator().manual_seed(1))
    assert seen and all(out._version == version for out, version in seen)


# -- a drafter with the wrong shape ------------------------------------------------------------------


class WrongShape(Drafter):
    def predict(self, x, step, memory):
        return memory.prediction[..., :1]


def test_a_drafter_of_the_wrong_shape_is_named_in_the_error():
    chain = GaussianMixtureDDPM.random(dim=3, num_steps=10)
    x = chain.sample_prior(4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"WrongShape.*shape"):
        speculative_sample(chain, x, window=3, drafter=WrongShape(), generator=torch.Generator().manual_seed(1))
