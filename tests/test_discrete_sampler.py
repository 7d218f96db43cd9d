"""Pathwise properties of the discrete samplers: step-keyed noise, caching, ragged batches."""

import pytest
import torch

from specdiff.discrete import (
    LookupDenoiser,
    MarkovDenoiser,
    MaskedDiffusionChain,
    MaskedDiffusionScheduler,
    log_ratio,
    sample_baseline_discrete,
    speculative_sample_discrete,
    step_acceptance_probability,
)
from specdiff.discrete.chain import ScaledDrafter
from specdiff.drafters import ModelDrafter

V, LENGTH = 4, 16


def markov_chain(steps=24, **kwargs):
    scheduler = MaskedDiffusionScheduler(vocab_size=V, num_inference_steps=steps, **kwargs)
    return MaskedDiffusionChain(MarkovDenoiser.random(V, seed=0), scheduler)


def start(batch):
    return torch.full((batch, LENGTH), V)


@pytest.mark.parametrize("per_sample", [False, True])
def test_window_one_reproduces_the_baseline_bit_for_bit(per_sample):
    chain = markov_chain()

    def gen():
        return [torch.Generator().manual_seed(s) for s in range(6)] if per_sample else torch.Generator().manual_seed(3)

    base = sample_baseline_discrete(chain, start(6), gen())
    spec = speculative_sample_discrete(chain, start(6), window=1, generator=gen())
    assert torch.equal(base, spec.sample)
    assert spec.stats.acceptance_rate == 1.0 and spec.stats.residual_draws == 0


def test_cached_baseline_gives_the_same_tokens_with_fewer_calls():
    chain = markov_chain(steps=64)
    plain = sample_baseline_discrete(chain, start(8), torch.Generator().manual_seed(0), return_stats=True)
    cached = sample_baseline_discrete(chain, start(8), torch.Generator().manual_seed(0), cached=True, return_stats=True)
    assert torch.equal(plain.sample, cached.sample)
    assert plain.stats.per_sample_target_calls == [64] * 8
    assert max(cached.stats.per_sample_target_calls) <= LENGTH + 1  # one call per change at most
    assert cached.stats.target_rows < plain.stats.target_rows


def test_drafter_equal_to_target_accepts_everything_and_reproduces_the_baseline():
    chain = markov_chain()
    target = MarkovDenoiser.random(V, seed=0)
    spec = speculative_sample_discrete(
        chain,
        start(5),
        window=6,
        drafter=ModelDrafter(lambda x, step: target(x)),
        generator=torch.Generator().manual_seed(4),
    )
    base = sample_baseline_discrete(chain, start(5), torch.Generator().manual_seed(4))
    assert spec.stats.accepted == spec.stats.proposed
    assert torch.equal(spec.sample, base)


def test_a_step_that_unmasks_nothing_has_ratio_exactly_one():
    scheduler = MaskedDiffusionScheduler(vocab_size=V, num_inference_steps=10)
    x = torch.tensor([[V, 1, V, 3, V]])
    g = torch.Generator().manual_seed(0)
    k = scheduler.transition_probs(x, torch.tensor([4]), torch.randn(1, 5, V, generator=g))
    j = scheduler.transition_probs(x, torch.tensor([4]), 10 * torch.randn(1, 5, V, generator=g))
    assert log_ratio(k, j, x).item() == 0.0
    assert step_acceptance_probability(k, j, x).item() == 1.0
    # only newly unmasked positions contribute to the ratio
    y = x.clone()
    y[0, 2] = 0
    expected = (k[0, 2, 0].log() - j[0, 2, 0].log()).item()
    assert log_ratio(k, j, y).item() == pytest.approx(expected, rel=1e-12)


def test_frozen_drafter_never_calls_more_than_plain_and_counts_consistently():
    chain = markov_chain(steps=48)
    out = speculative_sample_discrete(chain, start(6), window=8, generator=torch.Generator().manual_seed(0))
    s = out.stats
    assert sum(c * k for c, k in enumerate(s.committed_per_round)) == 6 * 48
    assert max(s.per_sample_target_calls) < 48
    assert s.draft_calls == 0
    assert 0 < s.accepted <= s.proposed
    assert (out.sample < V).all()


def test_a_sample_does_not_depend_on_its_batch_with_a_generator_list():
    chain = markov_chain()
    seeds = [11, 12, 13, 14, 15]
    drafter = ScaledDrafter(-1.0)  # poor drafts: rejections and residual draws happen
    batch = speculative_sample_discrete(
        chain, start(5), window=4, drafter=drafter, generator=[torch.Generator().manual_seed(s) for s in seeds]
    )
    assert batch.stats.residual_draws > 0
    for i in (0, 3):
        alone = speculative_sample_discrete(
            chain, start(1), window=4, drafter=drafter, generator=[torch.Generator().manual_seed(seeds[i])]
        )
        assert torch.equal(alone.sample[0], batch.sample[i])
    # The same holds at another window: sample i of a window-2 batch is sample i run alone.
    other_window = speculative_sample_discrete(
        chain, start(5), window=2, drafter=drafter, generator=[torch.Generator().manual_seed(s) for s in seeds]
    )
    assert other_window.stats.residual_draws > 0
    for i in (1, 4):
        alone = speculative_sample_discrete(
            chain, start(1), window=2, drafter=drafter, generator=[torch.Generator().manual_seed(seeds[i])]
        )
        assert torch.equal(alone.sample[0], other_window.sample[i])


def test_ragged_batches_start_at_different_states():
    chain = markov_chain(steps=12)
    x = start(4)
    x[1, :8] = 2  # half unmasked already
    x[2] = 1  # nothing to unmask: every step is a copy
    out = speculative_sample_discrete(chain, x, window=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.sample[2], x[2])
    assert torch.equal(out.sample[1, :8], x[1, :8])
    assert out.stats.per_sample_target_calls[2] == 1  # the warm-up call only: nothing ever changes


def test_model_drafter_counts_draft_calls_and_time_conditioned_chains_work():
    net = LookupDenoiser(2, 3, seed=0)
    scheduler = MaskedDiffusionScheduler(vocab_size=2, num_inference_steps=5)
    chain = MaskedDiffusionChain(lambda x, t: net(x) * (1 + t[:, None, None]), scheduler, time_conditioned=True)
    x = torch.full((3, 3), 2)
    base = sample_baseline_discrete(chain, x, torch.Generator().manual_seed(0))
    spec = speculative_sample_discrete(chain, x, window=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(base, spec.sample)
    out = speculative_sample_discrete(
        chain, x, window=3, drafter=lambda x, step: net(x), generator=torch.Generator().manual_seed(0)
    )
    assert out.stats.draft_calls > 0
    with pytest.raises(ValueError, match="time_conditioned"):
        sample_baseline_discrete(chain, x, cached=True)


def test_callback_progress_and_argument_checks():
    chain = markov_chain(steps=8)
    seen = []
    speculative_sample_discrete(chain, start(2), window=3, callback=seen.append, progress=False)
    assert seen and seen[-1]["step"].tolist() == [8, 8]
    updates = []

    class Bar:
        def __init__(self, total):
            self.total = total

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, k):
            updates.append(k)

    speculative_sample_discrete(chain, start(2), window=3, progress=Bar)
    assert sum(updates) == 2 * 8
    with pytest.raises(ValueError, match="window"):
        speculative_sample_discrete(chain, start(2), window=0)
    with pytest.raises(TypeError, match="integer tokens"):
        speculative_sample_discrete(chain, start(2).float())
    with pytest.raises(ValueError, match="generators"):
        sample_baseline_discrete(chain, start(2), [torch.Generator()])


def test_same_seed_repeats_and_global_seed_is_respected():
    chain = markov_chain()
    a = speculative_sample_discrete(
        chain, start(3), window=4, drafter=ScaledDrafter(-1.0), generator=torch.Generator().manual_seed(9)
    )
    b = speculative_sample_discrete(
        chain, start(3), window=4, drafter=ScaledDrafter(-1.0), generator=torch.Generator().manual_seed(9)
    )
    assert torch.equal(a.sample, b.sample)
    torch.manual_seed(0)
    c = speculative_sample_discrete(chain, start(3), window=4)
    torch.manual_seed(0)
    d = speculative_sample_discrete(chain, start(3), window=4)
    assert torch.equal(c.sample, d.sample)


@pytest.mark.parametrize("window", [1, 4])
def test_nan_logits_are_refused_and_minus_inf_ones_are_not(window):
    net = MarkovDenoiser.random(V, seed=0)

    def logits(x):  # -inf is a token the model rules out; NaN a broken model, once 5 positions are unmasked
        out = net(x)
        out[..., 0] = float("-inf")
        return torch.where(((x != V).sum(1) >= 5).view(-1, 1, 1), torch.nan, out)

    chain = MaskedDiffusionChain(logits, MaskedDiffusionScheduler(vocab_size=V, num_inference_steps=LENGTH))
    with pytest.raises(FloatingPointError, match="NaN/inf at step"):
        speculative_sample_discrete(
            chain, chain.prior(2, (LENGTH,)), window=window, generator=torch.Generator().manual_seed(0)
        )
    chain.model = lambda x: torch.where(torch.arange(V) == 0, float("-inf"), net(x))
    assert (speculative_sample_discrete(chain, chain.prior(2, (LENGTH,)), window=window).sample != 0).all()
