"""Time-free chains (``time_conditioned = False``): the round may reuse a prediction while a
sample's state is unchanged. What it carries after such a round must come from committed
randomness only; these tests pin the two places where it did not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as st

from specdiff import sample_baseline, speculative_sample
from specdiff.drafters import Drafter
from specdiff.testing import GaussianMixtureDDPM


class RoundingMultistepChain:
    """A 1-D two-step Gaussian chain on bf16 states near 256, where the grid spacing is 2: a step
    of std 0.8 often rounds back to the state it left from. The mean reads the previous step's
    prediction (``uses_previous_prediction``), and the network ignores the time, as declared."""

    num_steps = 12
    uses_previous_prediction = True
    time_conditioned = False

    def predict(self, x, step):
        return torch.tanh((x.float() - 256.0) / 3.0)

    def transition(self, x, step, prediction, previous=None):
        previous = prediction if previous is None else previous
        mean = x.float() + 1.5 * prediction - 0.9 * (prediction - previous) + 0.35
        return mean, torch.full((x.shape[0],), 0.8)


def final_values(out: torch.Tensor) -> np.ndarray:
    return out.float().flatten().numpy()


def chi_square_p(a: np.ndarray, b: np.ndarray) -> float:
    values = np.union1d(a, b)
    table = np.array([[np.sum(a == v) for v in values], [np.sum(b == v) for v in values]])
    table = table[:, table.sum(0) >= 10]  # cells with too few counts pooled out (same cut on both rows)
    return st.chi2_contingency(table)[1]


@pytest.mark.parametrize("drafter", ["frozen", "picard"])
def test_a_time_free_multistep_chain_keeps_the_plain_law_when_a_correction_stays_put(drafter):
    """A rejected step whose correction rounds back to the state it left from marks the sample
    fresh; its previous prediction must then be the one at that state, not the target's
    prediction at the last, discarded draft (which holds the noise of uncommitted steps).
    Chi-square of the final value against the plain loop, n = 4000 each, alpha = 1e-3; before
    the fix p was below 1e-15 on every seed tried."""
    chain, n = RoundingMultistepChain(), 4000
    x = torch.full((n, 1), 256.0, dtype=torch.bfloat16)
    plain = final_values(sample_baseline(chain, x, torch.Generator().manual_seed(1)))
    out = speculative_sample(chain, x, window=8, drafter=drafter, generator=torch.Generator().manual_seed(2))
    assert out.stats.proposed - out.stats.accepted >= 1000  # the test has rejections to see
    assert chi_square_p(plain, final_values(out.sample)) > 1e-3


def test_window_one_is_the_plain_loop_on_the_rounding_chain():
    chain = RoundingMultistepChain()
    x = torch.full((64, 1), 256.0, dtype=torch.bfloat16)
    plain = sample_baseline(chain, x, torch.Generator().manual_seed(3))
    out = speculative_sample(chain, x, window=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain, out.sample)


@pytest.mark.parametrize("drafter", ["frozen", "picard", "extrapolated"])
def test_a_correction_that_stays_put_carries_the_prediction_of_the_state_it_left_from(monkeypatch, drafter):
    """Pathwise: when a round's correction leaves a sample where it was (the chain is time-free, so
    the sample is fresh again), the previous prediction it carries (the multistep ``previous=``,
    and what drafters read as ``DraftMemory.previous``) is the target's prediction one step
    earlier, at that very state. Before the fix it was the prediction at the round's last draft,
    which holds the noise of steps the round does not commit."""
    import specdiff.sampler as sampler_module
    from specdiff.drafters_research import ExtrapolatedDrafter

    seen = []
    original = sampler_module.speculative_round

    def spy(chain, kernel, drafter, noise, target, c, ids, L, tally):
        new = original(chain, kernel, drafter, noise, target, c, ids, L, tally)
        seen.append((new.n - c.n, L.clone(), new.fresh.clone(), new.pred.clone(), new.prev.clone()))
        return new

    monkeypatch.setattr(sampler_module, "speculative_round", spy)
    chain = RoundingMultistepChain()
    x = torch.full((256, 1), 256.0, dtype=torch.bfloat16)
    chosen = ExtrapolatedDrafter() if drafter == "extrapolated" else drafter
    speculative_sample(chain, x, window=8, drafter=chosen, generator=torch.Generator().manual_seed(4))
    stayed = 0
    for committed, L, fresh, pred, prev in seen:
        put = fresh & (committed < L)  # rejected, and the correction left the state where it was
        stayed += int(put.sum())
        assert torch.equal(prev[put], pred[put])
    assert stayed >= 20


class NaNFarOut(GaussianMixtureDDPM):
    """A mixture DDPM (x0-prediction) whose network breaks down (NaN) beyond |x| = 8, where the plain
    sampler never goes (its states are N(0, 1)-sized)."""

    def predict(self, x, step):
        out = super().predict(x, step)
        return torch.where((x.abs() > 8).any(1, keepdim=True), torch.nan, out)


def far_off(chain, x, step):
    """A bad independent drafter's guess: the target's x0 prediction shifted by 30 (drafts run far out)."""
    return GaussianMixtureDDPM.predict(chain, x, step) + 30.0


class FarOffPicard(Drafter):
    """Picard where the last verify call predicted the drafted step (those predictions are NaN when
    the discarded draft was far out), the far-off guess elsewhere."""

    reuses_target = True

    def __init__(self, chain):
        self.chain = chain

    def predict(self, x, step, memory):
        guess = far_off(self.chain, x, step)
        if memory.same_step is None:
            return guess
        return torch.where(memory.has_same_step.view(-1, 1), memory.same_step, guess)


@pytest.mark.parametrize("window", [4, 8])
@pytest.mark.parametrize("drafter", ["far-off", "far-off-picard"])
def test_a_non_finite_prediction_at_a_discarded_draft_does_not_abort_the_run(window, drafter):
    """The verify call also evaluates drafts that a rejection discards and the plain sampler never
    visits; a NaN there must not raise (a user retrying failed seeds would bias the output). A draft
    built on such a NaN (a Picard drafter reuses the discarded drafts' predictions) is drafted from
    the frozen prediction instead. Law: two-sample KS per coordinate against the plain loop,
    n = 1500, alpha = 1e-3 each."""
    chain = NaNFarOut.random(dim=2, components=4, num_steps=40, seed=1, prediction_type="sample")
    x = chain.sample_prior(1500, torch.Generator().manual_seed(0))
    plain = sample_baseline(chain, x, torch.Generator().manual_seed(1))
    chosen = FarOffPicard(chain) if drafter == "far-off-picard" else (lambda x, step: far_off(chain, x, step))
    out = speculative_sample(chain, x, window=window, drafter=chosen, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(out.sample).all()
    assert out.stats.proposed - out.stats.accepted >= 500
    for d in range(2):
        assert st.ks_2samp(plain[:, d].numpy(), out.sample[:, d].numpy()).pvalue > 1e-3


def test_a_non_finite_prediction_at_a_committed_state_still_names_its_step():
    chain = NaNFarOut.random(dim=2, components=4, num_steps=40, seed=1, prediction_type="sample")
    x = torch.full((3, 2), 9.0, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match=r"NaN/inf at step\(s\) \[0\]"):
        speculative_sample(chain, x, window=4, generator=torch.Generator().manual_seed(0))
