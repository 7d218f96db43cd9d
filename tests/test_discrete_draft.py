"""The frozen drafter's batched draft (all L steps of a round at once) is the step-by-step draft, bit for bit."""

import pytest
import torch

import specdiff.discrete.scheduler as scheduler_module
from specdiff.discrete import (
    LookupDenoiser,
    MarkovDenoiser,
    MaskedDiffusionChain,
    MaskedDiffusionScheduler,
    speculative_sample_discrete,
)
from specdiff.discrete.chain import ScaledDrafter
from specdiff.discrete.scheduler import sample_categorical
from specdiff.drafters import Drafter, FrozenTargetDrafter, PicardDrafter
from specdiff.kernels import CategoricalKernel
from specdiff.kernels.categorical import MaskedKernel

V, LENGTH = 4, 16


class StepByStep(FrozenTargetDrafter):
    """The same predictions as the frozen drafter, declared to read the state: the round drafts step by step."""

    uses_state = True


@pytest.mark.parametrize(
    "schedule,temperature,chunk", [("linear", 1.0, None), ("cosine", 0.7, 1), ("linear", 0.0, None)]
)
def test_draft_frozen_equals_sequential_steps(schedule, temperature, chunk, monkeypatch):
    if chunk is not None:  # one step per chunk, as for a large vocabulary
        monkeypatch.setattr(scheduler_module, "DRAFT_CHUNK_ELEMENTS", chunk)
    steps, span, batch = 12, 7, 5
    s = MaskedDiffusionScheduler(vocab_size=V, alpha_schedule=schedule, temperature=temperature,
                                 num_inference_steps=steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V + 1, (batch, 2, LENGTH // 2), generator=g)  # partly masked, 2-d positions
    x[0] = V  # one fully masked row
    logits = torch.randn(batch, 2, LENGTH // 2, V, generator=g, dtype=torch.float64)
    logits[..., 1] = float("-inf")  # a token that is never drawn
    start = torch.tensor([0, 3, 5, 6, 11])
    k = (start + torch.arange(span)[:, None]).clamp(max=steps - 1)  # ragged, clamped at the last step
    u = torch.rand(span, *x.shape, generator=g, dtype=torch.float64)
    states, probs = s.draft_frozen(x, k, logits, u)
    y = x
    for j in range(span):
        law = s.transition_probs(y, k[j], logits)
        assert torch.equal(probs[j], law)
        y = sample_categorical(law, u[j]).to(x.dtype)
        assert torch.equal(states[j + 1], y)
    assert torch.equal(states[0], x) and (states[-1][:, :, :] != V).any()
    with pytest.raises(IndexError, match="out of range"):
        s.draft_frozen(x, k + steps, logits, u)


@pytest.mark.parametrize("window", [2, 5, 16])
def test_speculative_sampler_is_unchanged_by_the_batched_draft(window):
    scheduler = MaskedDiffusionScheduler(vocab_size=V, num_inference_steps=12)
    chain = MaskedDiffusionChain(MarkovDenoiser.random(V, seed=0, scale=4.0), scheduler)
    x = torch.full((4, LENGTH), V)
    x[1, :5] = torch.arange(5) % V  # ragged: a row that starts partly unmasked

    def run(drafter):
        gens = [torch.Generator().manual_seed(20 + i) for i in range(4)]
        return speculative_sample_discrete(chain, x, window=window, drafter=drafter, generator=gens)

    batched, stepwise = run(None), run(StepByStep())
    assert torch.equal(batched.sample, stepwise.sample)
    for name in ("per_sample_target_calls", "target_rows", "proposed", "accepted", "residual_draws",
                 "committed_per_round", "accepted_by_position"):
        assert getattr(batched.stats, name) == getattr(stepwise.stats, name), name
    assert batched.stats.accepted > 0 and batched.stats.residual_draws > 0  # both paths were exercised


def test_a_chain_with_its_own_transition_drafts_step_by_step():
    class Tempered(MaskedDiffusionChain):
        def transition(self, x, step, prediction):
            return super().transition(x, step, 0.5 * prediction)

    scheduler = MaskedDiffusionScheduler(vocab_size=2, num_inference_steps=4)
    chain = Tempered(LookupDenoiser(2, 3, seed=1), scheduler)
    x = torch.full((1, 3), 2)
    assert chain.draft_frozen(x, torch.zeros(2, 1, dtype=torch.long), torch.zeros(1, 3, 2), torch.rand(2, 1, 3)) is None
    assert MaskedDiffusionChain.draft_frozen(chain, x, torch.zeros(2, 1, dtype=torch.long), torch.zeros(1, 3, 2),
                                             torch.rand(2, 1, 3)) is None


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_repeated_predictions_get_the_same_law_as_alone(temperature):
    """clean_probabilities computes a run of equal rows once (a round repeats a prediction while the
    state is unchanged): every row must still be exactly the row's own softmax."""
    s = MaskedDiffusionScheduler(vocab_size=V, temperature=temperature, num_inference_steps=8)
    g = torch.Generator().manual_seed(3)
    distinct = torch.randn(4, LENGTH, V, generator=g)
    distinct[2, 0] = float("-inf")
    distinct[2, 0, 1] = 0.0
    logits = distinct[torch.tensor([0, 0, 0, 1, 2, 2, 1, 3])]
    mu = s.clean_probabilities(logits)
    for row in range(len(logits)):
        assert torch.equal(mu[row], s.clean_probabilities(logits[row : row + 1])[0])
    x = torch.full((len(logits), LENGTH), V)
    step = torch.arange(len(logits)) % 8
    alone = torch.cat([s.transition_probs(x[r : r + 1], step[r : r + 1], logits[r : r + 1]) for r in range(len(x))])
    assert torch.equal(s.transition_probs(x, step, logits), alone)


class Copies(FrozenTargetDrafter):
    """The frozen drafter's predictions as a new tensor at every position (equal values, not one tensor)."""

    def predict(self, x, step, memory):
        return memory.prediction.clone()


class Reads(Drafter):
    """Wraps a state-free drafter so that the round treats it as reading the state: step by step."""

    uses_state, reuses_target = True, True

    def __init__(self, drafter):
        self.drafter = drafter

    def predict(self, x, step, memory):
        return self.drafter.predict(x, step, memory)


@pytest.mark.parametrize("drafter", [PicardDrafter(), Copies()], ids=["picard", "copies"])
def test_known_predictions_are_drafted_as_step_by_step(drafter):
    """The kernel's window draft on any state-free drafter: vectorised where every position has the
    same prediction (compared by value), the step loop elsewhere (Picard after a rejection), bit for bit."""
    scheduler = MaskedDiffusionScheduler(vocab_size=V, num_inference_steps=12)
    chain = MaskedDiffusionChain(MarkovDenoiser.random(V, seed=1, scale=4.0), scheduler)
    x = torch.full((4, LENGTH), V)
    x[2, 3:9] = torch.arange(6) % V

    def run(d):
        gens = [torch.Generator().manual_seed(40 + i) for i in range(4)]
        return speculative_sample_discrete(chain, x, window=6, drafter=d, generator=gens)

    fast, slow = run(drafter), run(Reads(drafter))
    assert torch.equal(fast.sample, slow.sample)
    assert fast.stats.to_dict() | {"wall_clock": 0} == slow.stats.to_dict() | {"wall_clock": 0}
    assert fast.stats.accepted > 0 and fast.stats.residual_draws > 0  # both paths were exercised


def test_the_window_draft_declines_different_predictions():
    chain = MaskedDiffusionChain(
        LookupDenoiser(V, 3, seed=1), MaskedDiffusionScheduler(vocab_size=V, num_inference_steps=4)
    )
    x, steps, u = torch.full((1, 3), V), torch.tensor([[0], [1]]), torch.rand(2, 1, 3)
    same = torch.zeros(1, 3, V).expand(2, 1, 3, V)
    assert CategoricalKernel.draft_window(chain, x, steps, same, u) is not None
    assert CategoricalKernel.draft_window(chain, x, steps, same.clone(), u) is not None
    assert CategoricalKernel.draft_window(chain, x, steps, torch.randn(2, 1, 3, V), u) is None


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
@pytest.mark.parametrize("drafter", ["frozen", "picard", "scaled", "model"])
def test_the_unbuilt_masked_law_is_the_built_one_bit_for_bit(temperature, drafter):
    """MaskedKernel (the law left unbuilt, the test on the unmasked positions only) against the
    generic CategoricalKernel on ``chain.transition``'s probabilities: the same run, bit for bit."""
    scheduler = MaskedDiffusionScheduler(vocab_size=V, temperature=temperature, num_inference_steps=12)
    net = LookupDenoiser(V, 5, seed=4, zero_fraction=0.3)  # zero probabilities: K = 0 < J somewhere
    chain = MaskedDiffusionChain(lambda x: torch.cat([net(x), torch.zeros(*x.shape, 1)], -1), scheduler)  # a MASK logit
    assert chain.kernel is MaskedKernel
    d = {"scaled": ScaledDrafter(-0.5), "model": lambda x, step: chain.model(x) * 0.5}.get(drafter, drafter)
    x = torch.full((6, 5), V)
    x[1, :3] = torch.tensor([0, 1, 2])

    def run(kernel):
        chain.kernel = kernel
        return speculative_sample_discrete(chain, x, window=4, drafter=d,
                                           generator=[torch.Generator().manual_seed(60 + i) for i in range(6)])

    unbuilt, built = run(MaskedKernel), run(CategoricalKernel)
    assert torch.equal(unbuilt.sample, built.sample)
    assert unbuilt.stats.to_dict() | {"wall_clock": 0} == built.stats.to_dict() | {"wall_clock": 0}
    assert temperature == 0 or built.stats.residual_draws > 0  # rejections were corrected


def test_the_unbuilt_masked_law_builds_to_the_transition():
    scheduler = MaskedDiffusionScheduler(vocab_size=V, temperature=0.7, num_inference_steps=12)
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, V + 1, (5, 2, 8), generator=g)
    logits = torch.randn(5, 2, 8, V, generator=g)
    logits[0, 0, :, 1:] = float("-inf")  # one possible token
    step = torch.tensor([0, 3, 5, 6, 11])
    chain = MaskedDiffusionChain(lambda t: logits, scheduler)
    assert torch.equal(MaskedKernel.probs(MaskedKernel.law(chain, x, step, logits, logits)),
                       scheduler.transition_probs(x, step, logits))
    for t in (0.0, 1.0, 0.7):  # softmax of the scores is clean_probabilities, one-hot included
        s = MaskedDiffusionScheduler(vocab_size=V, temperature=t)
        assert torch.equal(torch.softmax(s.scores(logits), -1), s.clean_probabilities(logits))
    with pytest.raises(ValueError, match="does not match"):
        MaskedKernel.law(chain, x[:, :1], step, logits, logits)


def test_the_residual_sampler_gives_up_with_an_error_not_a_biased_draw(monkeypatch):
    import specdiff.kernels.categorical as categorical

    monkeypatch.setattr(categorical, "MAX_RESIDUAL_PROPOSALS", 20)
    probs = torch.softmax(torch.randn(2, 3, V, generator=torch.Generator().manual_seed(8), dtype=torch.float64), -1)
    with pytest.raises(RuntimeError, match="no sample in 20 proposals"):  # K = J: (K - J)+ has no mass
        categorical.sample_residual(probs, probs, [torch.Generator().manual_seed(s) for s in range(2)])
    x, used = categorical.sample_residual(probs, probs.flip(-1), [torch.Generator().manual_seed(s) for s in range(2)])
    assert x.shape == (2, 3) and (used >= 1).all()
