"""The transformers adapter (MaskedLMChain) is the scheduler's MDLM/MD4 kernel on a real
masked LM, and the speculative sampler is exact on it: enumeration on a tiny vocabulary
(tokens a, b + [PAD], [UNK], [MASK]; 3 positions) and chi-square of the vectorised sampler.
The network is a 2-layer BertForMaskedLM with random weights, in float64 (batch-invariant)."""

import pytest
import torch
from scipy import stats as sps

pytest.importorskip("transformers")
from transformers import BertConfig, BertForMaskedLM

from specdiff.discrete import (
    MaskedDiffusionScheduler,
    exact_baseline_law,
    exact_speculative_law,
    sample_baseline_discrete,
    speculative_sample_discrete,
)
from specdiff.discrete.chain import ScaledDrafter, _state_index
from specdiff.drafters import ModelDrafter
from specdiff.text import MaskedLMChain, char_tokenizer

ALPHA = 1e-3  # level of each Monte-Carlo test (fixed seeds: deterministic outcomes)
TOKENIZER = char_tokenizer("ab")  # ids: [PAD]=0 [UNK]=1 [MASK]=2 a=3 b=4; the chain's MASK is 5


def tiny_bert(seed: int, positions: int = 8) -> BertForMaskedLM:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(TOKENIZER), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=positions, initializer_range=0.5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # large init: peaked, state-dependent logits, so drafts do get rejected
    return BertForMaskedLM(config).eval().double()


def make_chain(seed=0, steps=4, **scheduler_kwargs):
    scheduler = MaskedDiffusionScheduler(vocab_size=len(TOKENIZER), num_inference_steps=steps, **scheduler_kwargs)
    return MaskedLMChain.from_tokenizer(tiny_bert(seed), TOKENIZER, scheduler)


OTHER = make_chain(seed=5)
DRAFTERS = {
    "frozen": None,
    "independent-bert": ModelDrafter(lambda x, step: OTHER.predict(x, step)),
    "bad-inverted": ScaledDrafter(-3.0),
}


def test_model_sees_its_own_mask_token_and_specials_are_never_generated():
    seen = []

    def spy(input_ids, **kwargs):
        seen.append(input_ids.clone())
        return tiny_bert(0)(input_ids, **kwargs)

    scheduler = MaskedDiffusionScheduler(vocab_size=len(TOKENIZER), num_inference_steps=3)
    chain = MaskedLMChain.from_tokenizer(spy, TOKENIZER, scheduler)
    x = chain.initial_state([[3]], 2)
    assert x.tolist() == [[3, chain.mask_token_id, chain.mask_token_id]]
    probs = chain.transition(x, torch.zeros(1, dtype=torch.long), chain.predict(x, torch.zeros(1, dtype=torch.long)))
    assert seen[0].tolist() == [[3, TOKENIZER.mask_token_id, TOKENIZER.mask_token_id]]
    assert probs[..., TOKENIZER.all_special_ids].abs().max() == 0
    assert probs[0, 0].tolist() == [0, 0, 0, 1, 0, 0]  # the prompt token is copied
    out = sample_baseline_discrete(chain, x.expand(64, -1).clone(), torch.Generator().manual_seed(0))
    assert (out[:, 0] == 3).all() and ((out == 3) | (out == 4)).all()


@pytest.mark.parametrize("window", [2, 4])
@pytest.mark.parametrize("drafter", list(DRAFTERS))
def test_speculative_law_equals_baseline_law_by_enumeration(drafter, window):
    chain = make_chain()
    start = torch.full((3,), chain.mask_token_id)
    baseline = exact_baseline_law(chain, start)
    assert baseline.sum() == pytest.approx(1.0, abs=1e-12)
    speculative = exact_speculative_law(chain, start, window=window, drafter=DRAFTERS[drafter])
    assert (speculative - baseline).abs().max() < 1e-9


@pytest.mark.parametrize("config", [{"alpha_schedule": "cosine", "temperature": 0.7}, {"steps": 6}])
def test_exact_law_with_cosine_schedule_temperature_and_prompt_prefix(config):
    chain = make_chain(seed=2, **config)
    start = torch.tensor([4, chain.mask_token_id, chain.mask_token_id])  # prompt "b"
    baseline = exact_baseline_law(chain, start)
    states = torch.stack([torch.tensor(s) for s in [[4, a, b] for a in (3, 4) for b in (3, 4)]])
    assert baseline[_state_index(states, chain.scheduler.num_states)].sum() == pytest.approx(1.0, abs=1e-12)
    for drafter in (None, ScaledDrafter(-3.0)):
        assert (exact_speculative_law(chain, start, window=3, drafter=drafter) - baseline).abs().max() < 1e-9


def chi_square_p(samples, law, num_states):
    counts = torch.bincount(_state_index(samples, num_states), minlength=law.numel()).double()
    support = law > 0
    assert counts[~support].sum() == 0, "the sampler produced an impossible state"
    return sps.chisquare(counts[support].numpy(), (law[support] * counts.sum()).numpy()).pvalue


@pytest.mark.parametrize("drafter,window", [("frozen", 4), ("bad-inverted", 2)])
def test_sampler_on_the_adapter_matches_the_exact_law_chi_square(drafter, window):
    chain = make_chain()
    start = torch.full((3,), chain.mask_token_id)
    x = start.expand(8000, 3).clone()
    out = speculative_sample_discrete(
        chain, x, window=window, drafter=DRAFTERS[drafter], generator=torch.Generator().manual_seed(0)
    )
    assert out.stats.proposed > out.stats.accepted  # rejections (and residual draws) happened
    assert chi_square_p(out.sample, exact_baseline_law(chain, start), chain.scheduler.num_states) > ALPHA


def test_window_one_and_cached_reproduce_the_plain_sampler_token_for_token():
    chain = make_chain(steps=8)
    x = chain.initial_state([[3, 4]] * 16, 4)
    plain = sample_baseline_discrete(chain, x, torch.Generator().manual_seed(3))
    cached = sample_baseline_discrete(chain, x, torch.Generator().manual_seed(3), cached=True)
    spec = speculative_sample_discrete(chain, x, window=1, generator=torch.Generator().manual_seed(3)).sample
    assert torch.equal(plain, cached) and torch.equal(plain, spec)


def test_time_conditioned_model_gets_t_or_sigma_and_refuses_the_cache():
    got = {}

    def model(input_ids, timesteps=None):
        got["t"] = timesteps
        return torch.zeros(*input_ids.shape, len(TOKENIZER))

    scheduler = MaskedDiffusionScheduler(vocab_size=len(TOKENIZER), num_inference_steps=4)
    for time_input, expected in (("t", 0.75), ("sigma", -torch.log(torch.tensor(0.25)).item())):
        chain = MaskedLMChain.from_tokenizer(model, TOKENIZER, scheduler, time_input=time_input)
        chain.predict(chain.initial_state([[3]], 2), torch.tensor([1]))
        assert got["t"].tolist() == pytest.approx([expected])
    with pytest.raises(ValueError, match="time_conditioned"):
        sample_baseline_discrete(chain, chain.initial_state([[3]], 2), cached=True)
    with pytest.raises(ValueError, match="time_input"):
        MaskedLMChain.from_tokenizer(model, TOKENIZER, scheduler, time_input="sigma2")


def test_prompts_of_different_lengths_are_left_padded_and_hidden_by_the_attention_mask():
    masks = []

    def model(input_ids, attention_mask=None):
        masks.append(attention_mask)
        return torch.zeros(*input_ids.shape, len(TOKENIZER))

    chain = MaskedLMChain.from_tokenizer(model, TOKENIZER, MaskedDiffusionScheduler(vocab_size=len(TOKENIZER)))
    x = chain.initial_state([[3, 4], [4]], 2)
    assert x.tolist() == [[3, 4, 5, 5], [0, 4, 5, 5]]
    out = sample_baseline_discrete(chain, x, torch.Generator().manual_seed(0))
    assert out[1, 0] == TOKENIZER.pad_token_id and masks[0].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]


def test_bad_input_errors_name_the_fix():
    scheduler = MaskedDiffusionScheduler(vocab_size=3)
    with pytest.raises(ValueError, match="mask_token_id"):
        MaskedLMChain(lambda x: x, scheduler, mask_token_id=7)
    chain = MaskedLMChain(lambda x: x, MaskedDiffusionScheduler(vocab_size=5), mask_token_id=2)
    with pytest.raises(ValueError, match="pad_token_id"):
        chain.initial_state([[3, 4], [4]], 2)


def test_half_precision_model_runs_and_the_kernel_stays_float64():
    scheduler = MaskedDiffusionScheduler(vocab_size=len(TOKENIZER), num_inference_steps=6)
    chain = MaskedLMChain.from_tokenizer(tiny_bert(0).to(torch.bfloat16), TOKENIZER, scheduler)
    x = chain.initial_state([[3]] * 4, 5)
    step = torch.zeros(4, dtype=torch.long)
    assert chain.predict(x, step).dtype == torch.bfloat16
    assert chain.transition(x, step, chain.predict(x, step)).dtype == torch.float64
    out = speculative_sample_discrete(chain, x, window=3, generator=torch.Generator().manual_seed(0))
    assert ((out.sample == 3) | (out.sample == 4)).all()
