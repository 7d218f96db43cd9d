"""MaskedDiffusionScheduler: the MDLM / MD4 kernel, diffusers conventions, and agreement
with the chain the samplers use."""

import math

import pytest
import torch

from specdiff.discrete import (
    LookupDenoiser,
    MaskedDiffusionChain,
    MaskedDiffusionScheduler,
    sample_baseline_discrete,
    sample_categorical,
)
from specdiff.discrete.scheduler import alpha

V = 5


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_alpha_schedule_endpoints_and_monotonicity(schedule):
    s = MaskedDiffusionScheduler(vocab_size=V, alpha_schedule=schedule, num_inference_steps=7)
    assert s.alphas[0] == 0.0 and s.alphas[-1] == 1.0
    assert (s.alphas.diff() > 0).all()
    assert s.stay_masked_probability(torch.tensor([6])).item() == 0.0  # the last step unmasks all
    assert s.stay_masked_probability(torch.tensor([0])).item() == pytest.approx(1 - s.alphas[1].item())
    if schedule == "cosine":
        assert alpha(torch.tensor(0.5), "cosine").item() == pytest.approx(1 - math.cos(math.pi / 4))


def test_transition_probs_are_the_mdlm_kernel():
    s = MaskedDiffusionScheduler(vocab_size=V, num_inference_steps=4, temperature=0.5)
    x = torch.tensor([[V, 2, V], [0, V, V]])
    logits = torch.randn(2, 3, V, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    probs = s.transition_probs(x, torch.tensor([1, 2]), logits)
    assert probs.shape == (2, 3, V + 1) and probs.dtype == torch.float64
    assert torch.allclose(probs.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    assert torch.equal(probs[0, 1], torch.nn.functional.one_hot(torch.tensor(2), V + 1).double())
    a_t, a_s = s.alphas[1], s.alphas[2]
    stay = (1 - a_s) / (1 - a_t)
    assert probs[0, 0, V] == stay
    assert torch.allclose(probs[0, 0, :V], (1 - stay) * torch.softmax(logits[0, 0] / 0.5, -1))
    # a MASK logit in the model output is ignored
    with_mask = torch.cat([logits, torch.full((2, 3, 1), 50.0, dtype=torch.float64)], -1)
    assert torch.equal(s.transition_probs(x, torch.tensor([1, 2]), with_mask), probs)


def test_temperature_zero_is_argmax():
    s = MaskedDiffusionScheduler(vocab_size=V, num_inference_steps=3, temperature=0.0)
    logits = torch.randn(1, 4, V)
    probs = s.transition_probs(torch.full((1, 4), V), torch.tensor([2]), logits)
    assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and (probs.max(-1).values == 1).all()


def test_sample_categorical_is_the_inverse_cdf_and_skips_zero_mass():
    probs = torch.tensor([0.0, 0.25, 0.0, 0.75], dtype=torch.float64)
    u = torch.tensor([0.0, 0.2499999, 0.25, 0.9999999, 1 - 2**-53], dtype=torch.float64)
    assert sample_categorical(probs.expand(5, -1), u).tolist() == [1, 1, 3, 3, 3]
    tail = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    assert sample_categorical(tail.expand(1, -1), torch.tensor([1 - 2**-53], dtype=torch.float64)).tolist() == [1]


def test_sample_categorical_falls_back_to_the_last_positive_mass_when_u_total_rounds_to_total():
    tiny = torch.tensor([[5e-324, 0.0, 0.0], [0.0, 5e-324, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    u = torch.tensor([0.75, 0.75, 0.3], dtype=torch.float64)  # 0.75 · 5e-324 rounds to 5e-324: past every CDF
    assert sample_categorical(tiny, u).tolist() == [0, 1, 0]


def test_plain_scheduler_loop_unmasks_everything_and_matches_the_library_sampler():
    net = LookupDenoiser(2, 3, seed=0)
    s = MaskedDiffusionScheduler(vocab_size=2)
    s.set_timesteps(6)
    x = torch.full((4, 3), 2)
    g = torch.Generator().manual_seed(0)
    for t in s.timesteps:
        out = s.step(net(x), t, x, generator=g)
        assert ((out.prev_sample == 2) <= (x == 2)).all()  # masks only disappear
        x = out.prev_sample
    assert (x < 2).all()
    chain = MaskedDiffusionChain(net, s)
    assert torch.equal(x, sample_baseline_discrete(chain, torch.full((4, 3), 2), torch.Generator().manual_seed(0)))
    # the same with one generator per sample
    x = torch.full((4, 3), 2)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    for t in s.timesteps:
        x = s.step(net(x), t, x, generator=gens, return_dict=False)[0]
    ref = sample_baseline_discrete(chain, torch.full((4, 3), 2), [torch.Generator().manual_seed(i) for i in range(4)])
    assert torch.equal(x, ref)


def test_step_uses_the_chain_transition():
    s = MaskedDiffusionScheduler(vocab_size=V, num_inference_steps=5)
    chain = MaskedDiffusionChain(lambda x: torch.zeros(*x.shape, V), s)
    x = torch.tensor([[V, 1, V, V]])
    logits = torch.randn(1, 4, V)
    k = int(s.index_for_timestep(s.timesteps[3], 1))
    assert k == 3
    assert torch.equal(chain.transition(x, torch.tensor([3]), logits), s.transition_probs(x, torch.tensor([3]), logits))
    with pytest.raises(ValueError, match="not on the grid"):
        s.step(logits, 0.123, x)


def test_config_round_trip(tmp_path):
    s = MaskedDiffusionScheduler(vocab_size=7, alpha_schedule="cosine", temperature=0.9, num_inference_steps=33)
    s.save_pretrained(tmp_path)
    r = MaskedDiffusionScheduler.from_pretrained(tmp_path)
    assert dict(r.config) == dict(s.config)
    assert torch.equal(r.alphas, s.alphas) and r.mask_token_id == 7
    with pytest.raises(ValueError, match="alpha_schedule"):
        MaskedDiffusionScheduler(alpha_schedule="sqrt")


def test_add_noise_masks_at_rate_one_minus_alpha_and_elbo_weight():
    s = MaskedDiffusionScheduler(vocab_size=V, alpha_schedule="cosine")
    x0 = torch.randint(0, V, (4000, 16), generator=torch.Generator().manual_seed(0))
    t = torch.full((4000,), 0.3)
    xt = s.add_noise(x0, t, generator=torch.Generator().manual_seed(1))
    rate = (xt == V).double().mean().item()
    # 64 000 independent positions: within Z_SE = 4 binomial standard errors, two-sided level 6.3e-5.
    p = 1 - alpha(torch.tensor(0.3), "cosine").item()
    assert abs(rate - p) <= 4 * math.sqrt(p * (1 - p) / xt.numel()), (rate, p)
    assert ((xt == x0) | (xt == V)).all()
    assert (s.elbo_weight(torch.tensor([0.1, 0.5, 0.9])) > 0).all()
    assert MaskedDiffusionScheduler(vocab_size=V).elbo_weight(torch.tensor(0.25)).item() == pytest.approx(4.0)
