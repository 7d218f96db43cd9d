"""One driver for every chain: both kernels through the same entry points, per-sample
conditioning, the row cap, the drafter's memory, and a core that imports without diffusers."""

import subprocess
import sys

import pytest
import torch
from scipy import stats as sps

import specdiff
from specdiff import Drafter, sample_baseline, speculative_sample
from specdiff.discrete import LookupDenoiser, MaskedDiffusionChain, MaskedDiffusionScheduler, exact_baseline_law
from specdiff.discrete.chain import ScaledDrafter, _state_index
from specdiff.testing import GaussianMixtureDDPM, two_sample_test

ALPHA = 1e-3
V, LENGTH = 2, 3


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def masked_chain(steps=4):
    scheduler = MaskedDiffusionScheduler(vocab_size=V, num_inference_steps=steps)
    return MaskedDiffusionChain(LookupDenoiser(V, LENGTH, seed=1), scheduler)


# -- both chain kinds through speculative_sample / sample_baseline --------------------------------


def test_speculative_sample_on_a_categorical_chain_has_the_exact_law():
    chain = masked_chain()
    start = torch.full((20_000, LENGTH), V)
    law = exact_baseline_law(chain, start[0])
    out = speculative_sample(
        chain, start, window=3, drafter=ScaledDrafter(-3.0), generator=torch.Generator().manual_seed(0)
    )
    assert out.stats.proposed > out.stats.accepted and out.stats.residual_draws > 0
    counts = torch.bincount(_state_index(out.sample, V + 1), minlength=law.numel()).double()
    support = law > 0
    assert counts[~support].sum() == 0
    p = sps.chisquare(counts[support].numpy(), (law[support] * counts.sum()).numpy()).pvalue
    assert p > ALPHA, p


@pytest.mark.parametrize("per_sample", [False, True])
def test_window_one_is_the_plain_sampler_for_both_kinds(per_sample):
    make = (lambda: gens(range(6))) if per_sample else (lambda: torch.Generator().manual_seed(5))
    chain = masked_chain(steps=6)
    tokens = torch.full((6, LENGTH), V)
    assert torch.equal(speculative_sample(chain, tokens, window=1, generator=make()).sample,
                       sample_baseline(chain, tokens, make()))
    mixture = GaussianMixtureDDPM.random(dim=3, num_steps=20)
    x = mixture.sample_prior(6, torch.Generator().manual_seed(0))
    assert torch.equal(speculative_sample(mixture, x, window=1, generator=make()).sample,
                       sample_baseline(mixture, x, make()))


def test_the_kernel_follows_the_chain_and_the_states():
    chain = masked_chain()
    with pytest.raises(TypeError, match="integer tokens"):
        speculative_sample(chain, torch.full((2, LENGTH), float(V)))
    mixture = GaussianMixtureDDPM.random(dim=2, num_steps=5)
    with pytest.raises(TypeError, match="floating point"):
        sample_baseline(mixture, torch.zeros(2, 2, dtype=torch.long))


# -- per-sample conditioning --------------------------------------------------------------------


class Conditioned(GaussianMixtureDDPM):
    """A mixture whose data mean is shifted per sample (a stand-in for a prompt per sample)."""

    uses_sample_index = True

    def __init__(self, shifts, **kwargs):
        base = GaussianMixtureDDPM.random(dim=2, **kwargs)
        super().__init__(base.means, base.scale, base.weights, base.num_steps, base.prediction_type)
        self.shifts, self.seen = shifts, []

    def predict(self, x, step, sample):
        self.seen.append(sample.clone())
        ab, _ = self._coefficients(step, x)
        shift = self.shifts[sample].to(x)
        # the posterior mean of x0 for the mixture moved by `shift`: predict on x - sqrt(ab) * shift
        out = super().predict(x - ab.sqrt() * shift, step)
        return out + shift if self.prediction_type == "sample" else out


def test_each_row_of_a_network_call_knows_its_sample():
    shifts = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, -5.0], [3.0, 3.0]], dtype=torch.float64)
    chain = Conditioned(shifts, num_steps=40, prediction_type="sample")
    x = chain.sample_prior(4, torch.Generator().manual_seed(0))
    plain = sample_baseline(chain, x, gens(range(4)))
    seen_plain, chain.seen = chain.seen, []
    assert all(torch.equal(s, torch.arange(4)) for s in seen_plain)
    out = speculative_sample(chain, x, window=1, generator=gens(range(4)))
    assert torch.equal(out.sample, plain)
    spec = speculative_sample(chain, x, window=6, generator=gens(range(4))).sample
    assert (spec - shifts).norm(dim=1).max() < 2.5  # every sample went to its own condition
    assert chain.seen and all(s.dtype == torch.long and s.max() < 4 for s in chain.seen)


def test_per_sample_conditioning_keeps_the_law():
    shifts = torch.zeros(1200, 2, dtype=torch.float64)
    shifts[600:, 0] = 4.0
    chain = Conditioned(shifts, num_steps=60)
    x = chain.sample_prior(1200, torch.Generator().manual_seed(0))
    plain = sample_baseline(chain, x, torch.Generator().manual_seed(1))
    spec = speculative_sample(chain, x, window=8, generator=torch.Generator().manual_seed(2)).sample
    for half in (slice(0, 600), slice(600, None)):
        result = two_sample_test(spec[half], plain[half], alpha=ALPHA)
        assert result.passed, str(result)


def test_a_model_drafter_receives_the_sample_index():
    shifts = torch.tensor([[0.0, 0.0], [4.0, 0.0]], dtype=torch.float64)
    chain = Conditioned(shifts, num_steps=30)
    asked = []

    def draft(x, step, sample):
        asked.append(sample.clone())
        return chain.predict(x, step, sample)

    x = chain.sample_prior(2, torch.Generator().manual_seed(0))
    out = speculative_sample(chain, x, window=4, drafter=draft, generator=gens(range(2)))
    assert asked and out.stats.accepted == out.stats.proposed  # an exact drafter: every step accepted
    assert torch.equal(out.sample, sample_baseline(chain, x, gens(range(2))))


# -- bounded memory -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gaussian", "categorical"])
def test_the_row_cap_changes_nothing_but_the_call_sizes(kind):
    if kind == "gaussian":
        chain = GaussianMixtureDDPM.random(dim=3, num_steps=50)
        x = chain.sample_prior(10, torch.Generator().manual_seed(0))
    else:
        chain, x = masked_chain(steps=8), torch.full((10, LENGTH), V)
    free = speculative_sample(chain, x, window=6, generator=gens(range(10)), max_rows=None)
    capped = speculative_sample(chain, x, window=6, generator=gens(range(10)), max_rows=7)
    assert torch.equal(free.sample, capped.sample)
    assert free.stats.target_calls == capped.stats.target_calls  # micro-batches are one sequential call
    assert capped.stats.peak_rows == 7 and capped.stats.max_rows == 7
    assert free.stats.peak_rows > 7 and free.stats.max_rows is None
    for bad in (0, True, 2.5):  # True is an int to Python, not a cap of one row
        with pytest.raises(ValueError, match="max_rows"):
            speculative_sample(chain, x, window=2, max_rows=bad)


# -- the drafter's memory -------------------------------------------------------------------------


class Recorder(Drafter):
    def __init__(self):
        self.memories = []

    def predict(self, x, step, memory):
        self.memories.append((step.clone(), memory))
        return memory.prediction


def test_the_drafter_memory_says_where_the_prediction_was_made():
    chain = GaussianMixtureDDPM.random(dim=2, num_steps=40)
    x = chain.sample_prior(3, torch.Generator().manual_seed(0))
    recorder = Recorder()
    frozen = speculative_sample(chain, x, window=5, drafter=recorder, generator=gens(range(3)))
    assert torch.equal(frozen.sample, speculative_sample(chain, x, window=5, generator=gens(range(3))).sample)
    for step, memory in recorder.memories:
        assert memory.prediction.shape == (len(step), 2) and memory.previous.shape == memory.prediction.shape
        assert ((memory.step < step) | (memory.step == step)).all()  # made at or before the drafted step
        assert memory.sample.max() < 3


# -- import footprint ------------------------------------------------------------------------------


def test_import_specdiff_needs_only_torch():
    code = (
        "import sys, specdiff; "
        "assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules); "
        "specdiff.SpeculativeScheduler; assert 'diffusers' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert specdiff.speculative_sample_discrete is speculative_sample
