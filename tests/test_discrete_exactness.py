"""Discrete speculative sampling is exact: the output law equals the plain sampler's.

Tiny space: 2 real tokens + MASK, 3 positions, 4 steps, a fixed random "network" (a seeded
lookup from the whole state to logits). The laws are computed by enumeration with the same
step-level functions the sampler runs (``chain.transition``, ``step_acceptance_probability``,
``residual_acceptance_probability``); the Monte-Carlo tests then check the vectorised sampler
itself against those laws.
"""

import pytest
import torch
from scipy import stats as sps

import specdiff.discrete.chain as chain_module
from specdiff.discrete import (
    LookupDenoiser,
    MaskedDiffusionChain,
    MaskedDiffusionScheduler,
    exact_baseline_law,
    exact_speculative_law,
    sample_residual,
    speculative_sample_discrete,
    step_acceptance_probability,
    total_variation,
)
from specdiff.discrete.chain import ScaledDrafter, _state_index, all_states
from specdiff.discrete.scheduler import sample_categorical
from specdiff.drafters import ModelDrafter

V, LENGTH, STEPS = 2, 3, 4
# Every chi-square test below is at ALPHA on its own (8 must pass: family-wise <= 8e-3); the
# rate checks use Z_SE = 4 standard errors, two-sided level 2(1 - Phi(4)) = 6.3e-5 each. Fixed
# seeds: every outcome is deterministic.
ALPHA = 1e-3
Z_SE = 4.0


def make_chain(seed=1, steps=STEPS, schedule="linear", temperature=1.0, zero_fraction=0.0):
    scheduler = MaskedDiffusionScheduler(
        vocab_size=V, alpha_schedule=schedule, temperature=temperature, num_inference_steps=steps
    )
    return MaskedDiffusionChain(LookupDenoiser(V, LENGTH, seed=seed, zero_fraction=zero_fraction), scheduler)


OTHER_NET = LookupDenoiser(V, LENGTH, seed=7)
DRAFTERS = {
    "frozen": None,
    "independent-random-network": ModelDrafter(lambda x, step: OTHER_NET(x)),
    "bad-inverted": ScaledDrafter(-3.0),
    "bad-near-greedy": ScaledDrafter(25.0),
}
START = torch.full((LENGTH,), V)


@pytest.mark.parametrize("window", [1, 2, 4])
@pytest.mark.parametrize("drafter", list(DRAFTERS))
def test_speculative_output_law_equals_baseline_law_by_enumeration(drafter, window):
    chain = make_chain()
    baseline = exact_baseline_law(chain, START)
    speculative = exact_speculative_law(chain, START, window=window, drafter=DRAFTERS[drafter])
    assert baseline.sum() == pytest.approx(1.0, abs=1e-12)
    assert (speculative - baseline).abs().max() < 1e-9


@pytest.mark.parametrize(
    "config",
    [
        {"schedule": "cosine", "temperature": 0.7},
        {"zero_fraction": 0.3},  # target kernels with zero probabilities (K = 0 < J somewhere)
        {"steps": 6, "schedule": "cosine", "seed": 3},
    ],
)
def test_exact_law_holds_for_other_schedules_temperatures_and_sparse_targets(config):
    chain = make_chain(**config)
    baseline = exact_baseline_law(chain, START)
    for drafter in (None, ScaledDrafter(-3.0)):
        speculative = exact_speculative_law(chain, START, window=3, drafter=drafter)
        assert (speculative - baseline).abs().max() < 1e-9


def test_final_law_has_no_mask_and_starts_anywhere():
    chain = make_chain()
    states = all_states(V + 1, LENGTH)
    law = exact_baseline_law(chain, START)
    assert law[(states == V).any(1)].abs().max() == 0  # the last step unmasks everything
    partial = torch.tensor([0, V, 1])  # a partially unmasked start state
    speculative = exact_speculative_law(chain, partial, window=2, drafter=ScaledDrafter(-3.0))
    assert (speculative - exact_baseline_law(chain, partial)).abs().max() < 1e-9


def test_enumeration_detects_a_wrong_residual(monkeypatch):
    """Negative control: resampling a rejected step from K instead of (K - J)+ is biased,
    and the enumeration sees it."""
    chain = make_chain()
    baseline = exact_baseline_law(chain, START)
    monkeypatch.setattr(
        chain_module, "residual_acceptance_probability", lambda k, j, y: torch.ones(y.shape[0], dtype=torch.float64)
    )
    wrong = exact_speculative_law(chain, START, window=2, drafter=ScaledDrafter(-3.0))
    assert (wrong - baseline).abs().max() > 1e-2


def plain_target_draw(k, j, generators):
    """A wrong residual for negative controls: a rejected step redrawn from K, not (K - J)+."""
    u = torch.stack([torch.rand(k.shape[1:-1], generator=g, dtype=torch.float64) for g in generators])
    return sample_categorical(k, u), torch.ones(len(generators), dtype=torch.long)


def _chi_square_p(samples, law):
    counts = torch.bincount(_state_index(samples, V + 1), minlength=law.numel()).double()
    support = law > 0
    assert counts[~support].sum() == 0, "the sampler produced an impossible state"
    return sps.chisquare(counts[support].numpy(), (law[support] * counts.sum()).numpy()).pvalue


@pytest.mark.parametrize("drafter,window", [("frozen", 4), ("bad-inverted", 2), ("independent-random-network", 3)])
def test_sampler_matches_the_exact_law_chi_square(drafter, window):
    chain = make_chain()
    law = exact_baseline_law(chain, START)
    x = START.expand(20_000, LENGTH).clone()
    out = speculative_sample_discrete(
        chain, x, window=window, drafter=DRAFTERS[drafter], generator=torch.Generator().manual_seed(0)
    )
    assert out.stats.proposed > out.stats.accepted  # rejections (and residual draws) did happen
    assert out.stats.residual_draws >= out.stats.proposed - out.stats.accepted
    assert _chi_square_p(out.sample, law) > ALPHA


def test_chi_square_has_power_against_a_wrong_residual(monkeypatch):
    """Negative control for the test above: redrawing rejected steps from K instead of
    (K - J)+ is rejected overwhelmingly at the same sample size."""
    import specdiff.kernels.categorical as sampler_module

    monkeypatch.setattr(sampler_module, "sample_residual", plain_target_draw)
    chain = make_chain()
    x = START.expand(20_000, LENGTH).clone()
    out = speculative_sample_discrete(
        chain, x, window=2, drafter=DRAFTERS["bad-inverted"], generator=torch.Generator().manual_seed(0)
    )
    assert _chi_square_p(out.sample, exact_baseline_law(chain, START)) < 1e-20


def time_conditioned_chain():
    """The lookup network with its logits scaled by (1 + t): the prediction depends on the
    step, so the sampler cannot reuse a prediction made at an unchanged state, and a time-free
    draft (the bare lookup) is a different kernel at every step."""
    scheduler = MaskedDiffusionScheduler(vocab_size=V, num_inference_steps=STEPS)
    net = LookupDenoiser(V, LENGTH, seed=1)
    chain = MaskedDiffusionChain(lambda x, t: net(x) * (1 + t[:, None, None]), scheduler, time_conditioned=True)
    return chain, ModelDrafter(lambda x, step: net(x))


TIME_CONDITIONED_CASES = [("frozen", 2), ("frozen", 4), ("time-free-model", 3)]


@pytest.mark.parametrize("drafter,window", TIME_CONDITIONED_CASES)
def test_time_conditioned_chain_matches_the_exact_law_chi_square(drafter, window):
    """exact_speculative_law enumerates time-free chains only, so a time-conditioned chain's
    sampler is checked against exact_baseline_law (which enumerates any chain) by chi-square at
    n = 20 000, at ALPHA per case (3 cases: family-wise <= 3e-3), with rejections required."""
    chain, model = time_conditioned_chain()
    law = exact_baseline_law(chain, START)
    x = START.expand(20_000, LENGTH).clone()
    out = speculative_sample_discrete(chain, x, window=window, drafter=None if drafter == "frozen" else model,
                                      generator=torch.Generator().manual_seed(0))
    rejected = out.stats.proposed - out.stats.accepted
    assert rejected >= 1000, f"only {rejected} rejected steps: {out.stats.summary()}"
    assert out.stats.residual_draws >= rejected
    assert _chi_square_p(out.sample, law) > ALPHA


@pytest.mark.parametrize("bug", ["accept-every-draft", "redraw-from-target"])
def test_time_conditioned_chi_square_has_power_against_broken_couplings(monkeypatch, bug):
    """Negative controls for the test above, at its window-4 frozen setting and n: keeping every
    drafted step (the draft's law), or redrawing a rejected step from K instead of (K - J)+,
    must be rejected."""
    import specdiff.kernels.categorical as categorical
    from specdiff.kernels import kernel_for

    chain, _ = time_conditioned_chain()
    x = START.expand(20_000, LENGTH).clone()
    if bug == "accept-every-draft":  # on the kernel this chain steps with
        def keep(law_draft, law_target, y, noise, u):
            return torch.ones(len(y), dtype=torch.bool, device=y.device)

        monkeypatch.setattr(kernel_for(chain, x), "accept", staticmethod(keep))
    else:
        monkeypatch.setattr(categorical, "sample_residual", plain_target_draw)
    out = speculative_sample_discrete(chain, x, window=4, generator=torch.Generator().manual_seed(0))
    assert _chi_square_p(out.sample, exact_baseline_law(chain, START)) < ALPHA


def test_sampler_acceptance_rate_matches_one_minus_total_variation():
    """Two steps, window 2, frozen drafter: step 0 is exact; step 1 is drafted from the
    prediction at the start, and must be accepted with probability E_{y1 ~ K0}[1 - TV(K1, J1)]."""
    chain = make_chain(steps=2)
    states = all_states(V + 1, LENGTH)
    start = START[None]
    k0 = chain.transition(start, torch.tensor([0]), chain.predict(start, torch.tensor([0])))[0]
    frozen = chain.predict(start, torch.tensor([0]))
    expected = 0.0
    for y1 in states:
        p = float(torch.exp(k0.gather(-1, y1[:, None]).log().sum()))
        if p == 0:
            continue
        k1 = chain.transition(y1[None], torch.tensor([1]), chain.predict(y1[None], torch.tensor([1])))[0]
        j1 = chain.transition(y1[None], torch.tensor([1]), frozen)[0]
        expected += p * (1 - float(total_variation(k1, j1, states)))
    n = 20_000
    out = speculative_sample_discrete(
        chain, start.expand(n, -1).clone(), window=2, generator=torch.Generator().manual_seed(1)
    )
    assert out.stats.proposed_by_position == [0, n]
    rate = out.stats.accepted_by_position[1] / n
    se = (expected * (1 - expected) / n) ** 0.5
    assert abs(rate - expected) < Z_SE * se, (rate, expected)


def _random_kernels(seed, rows=1):
    g = torch.Generator().manual_seed(seed)
    scheduler = MaskedDiffusionScheduler(vocab_size=V, num_inference_steps=3)
    x = torch.tensor([[V, V, 0]]).expand(rows, -1)
    k = scheduler.transition_probs(x, torch.tensor([1]), torch.randn(rows, LENGTH, V, generator=g, dtype=torch.float64))
    j = scheduler.transition_probs(
        x, torch.tensor([1]), 2 * torch.randn(rows, LENGTH, V, generator=g, dtype=torch.float64)
    )
    return k, j


def test_step_coupling_acceptance_rate_is_one_minus_tv_and_output_has_the_target_law():
    """One step, coupled in isolation: draft y ~ J, keep it w.p. min(1, K/J), else draw the
    residual. Acceptance ~ 1 - TV(K, J); the output ~ K."""
    k, j = _random_kernels(0)
    states = all_states(V + 1, LENGTH)
    tv = float(total_variation(k[0], j[0], states))
    n = 20_000
    g = torch.Generator().manual_seed(2)
    y = sample_categorical(j.expand(n, -1, -1), torch.rand(n, LENGTH, generator=g, dtype=torch.float64))
    keep = torch.rand(n, generator=g, dtype=torch.float64) < step_acceptance_probability(
        k.expand(n, -1, -1), j.expand(n, -1, -1), y
    )
    se = (tv * (1 - tv) / n) ** 0.5
    assert abs(keep.double().mean() - (1 - tv)) < Z_SE * se
    rejected = int((~keep).sum())
    gens = [torch.Generator().manual_seed(100 + i) for i in range(rejected)]
    y[~keep], draws = sample_residual(k.expand(rejected, -1, -1), j.expand(rejected, -1, -1), gens)
    target_law = torch.exp(k[0].expand(states.shape[0], -1, -1).gather(-1, states[..., None]).squeeze(-1).log().sum(1))
    counts = torch.bincount(_state_index(y, V + 1), minlength=states.shape[0]).double()
    support = target_law > 0
    assert counts[~support].sum() == 0
    assert sps.chisquare(counts[support].numpy(), (target_law[support] * n).numpy()).pvalue > ALPHA
    # the residual loop needs 1/TV proposals on average (geometric)
    assert abs(draws.double().mean() - 1 / tv) < 4 * ((1 - tv) / tv**2 / rejected) ** 0.5


def test_residual_sampler_draws_from_the_normalised_positive_part():
    k, j = _random_kernels(5)
    states = all_states(V + 1, LENGTH)
    m = states.shape[0]
    joint_k = torch.exp(k[0].expand(m, -1, -1).gather(-1, states[..., None]).squeeze(-1).log().sum(1))
    joint_j = torch.exp(j[0].expand(m, -1, -1).gather(-1, states[..., None]).squeeze(-1).log().sum(1))
    residual = (joint_k - joint_j).clamp(min=0)
    residual = residual / residual.sum()
    n = 8_000
    y, _ = sample_residual(
        k.expand(n, -1, -1), j.expand(n, -1, -1), [torch.Generator().manual_seed(i) for i in range(n)]
    )
    counts = torch.bincount(_state_index(y, V + 1), minlength=m).double()
    assert counts[residual == 0].sum() == 0
    assert sps.chisquare(counts[residual > 0].numpy(), (residual[residual > 0] * n).numpy()).pvalue > ALPHA
