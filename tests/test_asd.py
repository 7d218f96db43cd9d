"""ASD (autospeculative decoding, Hu et al. 2025; specdiff.workbench.asd) is exact: its drafts are
the paper's stochastic-localisation increments, speculation length 1 is the plain sampler bit for
bit, accepted drafts are kept, a rejected one becomes its reflection, and the whole sampler has the
plain sampler's law (two-sample tests, family-wise alpha 1e-3 over this file)."""

import pytest
import torch

from specdiff import sample_baseline
from specdiff.kernels.gaussian import reflect
from specdiff.noise import NoiseStreams
from specdiff.testing import GaussianMixtureDDPM, assert_same_law
from specdiff.workbench.asd import asd_draft, asd_sample

LAW_TESTS = 2  # two-sample tests below; each runs at 1e-3 / LAW_TESTS


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_drafts_are_the_localisation_increments_with_the_anchor_x0_as_drift():
    """In y = sqrt(a)/(1-a) x, s = a/(1-a), a drafted DDPM step is y' = y + (s'-s) x0_hat + sqrt(s'-s) z."""
    chain = GaussianMixtureDDPM.random(dim=3, num_steps=40, prediction_type="sample")
    x = chain.sample_prior(5, gen(0))
    n, L = 3, 30  # drafted steps stay before the deterministic last one (s = infinity there)
    k = torch.arange(n, n + L + 1)[:, None].expand(L + 1, 5)
    x0_hat = chain.predict(x, k[0])
    z = torch.randn(L, 5, 3, generator=gen(1), dtype=torch.float64)
    y, _ = asd_draft(chain, x, k, x0_hat, z)

    a = chain.alphas_cumprod[chain.num_steps - 1 - torch.arange(n, n + L + 1)]  # at y_j: t = N - 1 - (n + j)
    s, scale = a / (1 - a), a.sqrt() / (1 - a)
    h = s[1:] - s[:-1]
    loc = scale[0] * x + torch.cumsum(h.view(-1, 1, 1) * x0_hat + h.sqrt().view(-1, 1, 1) * z, 0)
    torch.testing.assert_close(y[1:], loc / scale[1:].view(-1, 1, 1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("per_sample", [False, True])
def test_speculation_length_one_is_the_plain_sampler_bit_for_bit(per_sample):
    chain = GaussianMixtureDDPM.random(dim=3, num_steps=60, prediction_type="sample")
    x = chain.sample_prior(6, gen(0))
    make = (lambda: [gen(10 + b) for b in range(6)]) if per_sample else (lambda: gen(1))
    out = asd_sample(chain, x, spec_len=1, generator=make())
    assert torch.equal(out.sample, sample_baseline(chain, x, make()))
    assert out.target_calls == chain.num_steps and out.proposed == 0


def test_a_constant_denoiser_keeps_every_draft_in_two_calls():
    """Point-mass data: x0_hat is the same everywhere, so every draft is the target draw."""
    chain = GaussianMixtureDDPM(torch.tensor([[0.3, -0.7]]), scale=0.0, num_steps=50, prediction_type="sample")
    x = chain.sample_prior(4, gen(0))
    out = asd_sample(chain, x, generator=gen(1))
    assert torch.equal(out.sample, sample_baseline(chain, x, gen(1)))
    assert (out.target_calls, out.iterations, out.target_rows) == (2, 1, 4 * chain.num_steps)
    assert out.accepted == out.proposed == 4 * (chain.num_steps - 1)


class Stiff:
    """A Gaussian chain whose prediction moves so fast with the state that every draft after the
    anchor's exact first step is rejected (|Delta| ~ 100 sigma)."""

    num_steps = 4

    def predict(self, x, step):
        return 100 * x

    def transition(self, x, step, prediction):
        return 0.5 * x + prediction, torch.ones(x.shape[0], dtype=x.dtype)


def test_a_rejected_draft_is_replaced_by_its_reflection_and_later_drafts_are_dropped():
    chain, x = Stiff(), torch.randn(1, 3, generator=gen(0), dtype=torch.float64)
    out = asd_sample(chain, x, generator=gen(1))
    z = NoiseStreams(gen(1), x).noise(torch.zeros(4, dtype=torch.long), torch.arange(4))[:, None]
    state = x
    for n in (0, 2):  # each iteration: the exact step n, then step n + 1 rejected and reflected
        y1 = 0.5 * state + 100 * state + z[n]
        draft_mean, target_mean = 0.5 * y1 + 100 * state, 0.5 * y1 + 100 * y1
        state = target_mean + reflect(z[n + 1], draft_mean - target_mean)
    torch.testing.assert_close(out.sample, state, rtol=1e-12, atol=1e-12)
    # calls: anchor + verify per iteration; rows: 1 + 3 (steps 1..3), then 1 + 1 (step 3)
    assert (out.iterations, out.target_calls, out.target_rows, out.accepted, out.proposed) == (2, 4, 6, 0, 2)


@pytest.mark.parametrize("spec_len", [None, 6])
def test_asd_has_the_plain_sampler_law(spec_len):
    chain = GaussianMixtureDDPM.random(dim=4, num_steps=100, prediction_type="sample", seed=3)
    x = chain.sample_prior(3000, gen(0))
    out = asd_sample(chain, x, spec_len=spec_len, generator=gen(1))
    plain = sample_baseline(chain, chain.sample_prior(3000, gen(2)), gen(3))
    assert out.accepted < out.proposed  # rejections (reflections) took part
    assert out.target_calls < chain.num_steps
    assert_same_law(out.sample, plain, alpha=1e-3 / LAW_TESTS)


def test_bad_speculation_length_is_refused():
    chain = GaussianMixtureDDPM.random(dim=2, num_steps=10)
    with pytest.raises(ValueError, match="spec_len"):
        asd_sample(chain, chain.sample_prior(2, gen(0)), spec_len=0)


def test_on_a_diffusers_ddpm_chain_speculation_length_one_is_its_plain_sampler():
    """The benchmark's set-up (SchedulerChain carrying x0, clipped): ASD runs it unchanged."""
    from diffusers import DDPMScheduler

    from specdiff import SpeculativeScheduler

    scheduler = SpeculativeScheduler.from_scheduler(DDPMScheduler(num_train_timesteps=100, clip_sample=True))
    scheduler.set_timesteps(20)
    chain = scheduler.chain(lambda x, t: 2 * torch.tanh(x) * t.view(-1, 1, 1, 1) / 100)  # an eps "network"
    x = torch.randn(2, 1, 8, 8, generator=gen(0))
    out = asd_sample(chain, x, spec_len=1, generator=gen(1))
    assert torch.equal(out.sample, sample_baseline(chain, x, gen(1)))
    free = asd_sample(chain, x, generator=gen(1))
    assert free.target_calls <= 2 * free.iterations < 2 * 20 and torch.isfinite(free.sample).all()


def test_the_churn_chain_carrying_x0_has_the_same_steps():
    from specdiff.workbench.churn import ChurnMixtureChain, ChurnX0Chain

    v_chain, x0_chain = ChurnMixtureChain(), ChurnX0Chain()
    x = v_chain.initial_state(3, gen(0))
    step = torch.full((3,), 5)
    for a, b in zip(v_chain.transition(x, step, v_chain.predict(x, step)),
                    x0_chain.transition(x, step, x0_chain.predict(x, step))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
