"""Research drafters (specdiff.drafters_research): exact for any window, and the Picard
drafter's time-aligned predictions raise acceptance where the frozen one is stale."""

import pytest
import torch

from specdiff import speculative_sample
from specdiff.drafters_research import ExtrapolatedDrafter, PicardDrafter
from specdiff.testing import GaussianMixtureDDPM, two_sample_test

ALPHA = 1e-3  # family-wise significance of the two-sample tests


@pytest.mark.parametrize("name", ["picard", "extrapolated"])
def test_research_drafters_keep_the_baseline_law(mixture_reference, name):
    chain, x, reference = mixture_reference
    drafter = PicardDrafter() if name == "picard" else ExtrapolatedDrafter(1.0)
    watched = drafter.watch(chain) if name == "picard" else chain
    out = speculative_sample(watched, x, window=8, drafter=drafter, generator=torch.Generator().manual_seed(13))
    result = two_sample_test(out.sample, reference, alpha=ALPHA)
    assert result.passed, str(result)
    assert out.stats.accepted < out.stats.proposed  # rejections happened: the coupling was exercised


def test_picard_drafter_accepts_more_than_frozen_after_rejections():
    chain = GaussianMixtureDDPM.random(dim=16, num_steps=300, seed=2)
    x = chain.sample_prior(64, torch.Generator().manual_seed(0))
    frozen = speculative_sample(chain, x, window=16, generator=torch.Generator().manual_seed(1))
    picard = PicardDrafter()
    out = speculative_sample(picard.watch(chain), x, window=16, drafter=picard, generator=torch.Generator().manual_seed(1))
    first = lambda s: s.accepted_by_position[0] / s.proposed_by_position[0]  # the root after a rejection
    assert first(out.stats) > first(frozen.stats) + 0.03
    assert out.stats.target_calls < frozen.stats.target_calls
    assert sum(out.stats.per_sample_target_calls) < sum(frozen.stats.per_sample_target_calls)


def test_a_watched_chain_returns_the_target_prediction_unchanged():
    chain = GaussianMixtureDDPM.random(dim=3, num_steps=20)
    x = chain.sample_prior(4, torch.Generator().manual_seed(0))
    step = torch.tensor([0, 3, 5, 7])
    watched = PicardDrafter().watch(chain)
    assert torch.equal(watched.predict(x, step), chain.predict(x, step))
    assert watched.num_steps == chain.num_steps
