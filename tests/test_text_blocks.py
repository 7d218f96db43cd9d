"""Semi-autoregressive blocks: each block is a full masked-diffusion run on the prefix, so the
speculative block sampler has exactly the plain block sampler's law (enumeration per block,
chi-square of the whole sampler), ``window=1`` reproduces it token for token, and a block's
randomness comes only from the caller's generator(s)."""

import pytest
import torch

pytest.importorskip("transformers")

from test_text_adapter import ALPHA, chi_square_p, make_chain

from specdiff.discrete import exact_baseline_law, exact_speculative_law
from specdiff.discrete.chain import ScaledDrafter, all_states
from specdiff.text import sample_blocks
from specdiff.text.blocks import block_generators

LENGTH, BLOCK = 4, 2


def block_law(chain, law_of_block):
    """Output pmf of the block sampler over all_states(S, 4), from the per-block laws."""
    s, mask = chain.scheduler.num_states, chain.mask_token_id
    first = law_of_block(torch.full((BLOCK,), mask))  # over all_states(S, 2)
    law = torch.zeros(s**LENGTH, dtype=torch.float64)
    for prefix, p in zip(all_states(s, BLOCK), first.tolist()):
        if p > 0:
            law += p * law_of_block(torch.cat([prefix, torch.full((LENGTH - BLOCK,), mask)]))
    return law


def test_speculative_block_law_equals_plain_block_law_by_enumeration():
    chain = make_chain(steps=3)
    plain = block_law(chain, lambda x: exact_baseline_law(chain, x))
    spec = block_law(chain, lambda x: exact_speculative_law(chain, x, window=2, drafter=ScaledDrafter(-3.0)))
    assert plain.sum() == pytest.approx(1.0, abs=1e-12)
    assert (spec - plain).abs().max() < 1e-9
    # Blocks are a different sampler from one 4-token run: the test can tell them apart.
    assert (plain - exact_baseline_law(chain, torch.full((LENGTH,), chain.mask_token_id))).abs().max() > 1e-3


def test_block_sampler_matches_the_block_law_chi_square():
    chain = make_chain(steps=3)
    x = torch.full((6000, LENGTH), chain.mask_token_id)
    out = sample_blocks(chain, x, block_size=BLOCK, window=3, drafter=ScaledDrafter(-3.0),
                        generator=torch.Generator().manual_seed(1))
    assert out.stats.proposed > out.stats.accepted and out.stats.num_steps == 6
    assert chi_square_p(out.sample, block_law(chain, lambda x: exact_baseline_law(chain, x)), 6) > ALPHA


def test_window_one_cached_and_plain_blocks_agree_token_for_token_and_keep_the_prompt():
    chain = make_chain(steps=4)
    x = chain.initial_state([[4, 3]] * 8, 5)
    runs = [
        sample_blocks(chain, x, block_size=2, generator=torch.Generator().manual_seed(5)),
        sample_blocks(chain, x, block_size=2, cached=True, generator=torch.Generator().manual_seed(5)),
        sample_blocks(chain, x, block_size=2, window=1, generator=torch.Generator().manual_seed(5)),
    ]
    assert all(torch.equal(runs[0].sample, r.sample) for r in runs[1:])
    assert (runs[0].sample[:, :2] == torch.tensor([4, 3])).all() and (runs[0].sample >= 3).all()
    assert runs[0].stats.target_calls == 3 * 4  # blocks of 2, 2, 1 tokens, 4 steps each
    assert runs[1].stats.target_rows < runs[0].stats.target_rows  # unchanged rows reuse their prediction


def test_a_sample_does_not_depend_on_its_batch_with_one_generator_per_sample():
    chain = make_chain(steps=4)
    x = torch.full((3, LENGTH), chain.mask_token_id)

    def seeds():
        return [torch.Generator().manual_seed(10 + i) for i in range(3)]

    batch = sample_blocks(chain, x, block_size=BLOCK, window=2, generator=seeds()).sample
    alone = sample_blocks(chain, x[1:2], block_size=BLOCK, window=2, generator=seeds()[1:2]).sample
    assert torch.equal(batch[1:2], alone)


def test_each_block_draws_from_its_own_generator_seeded_from_the_callers_which_advances():
    g = torch.Generator().manual_seed(0)
    first, second = block_generators(g, 2, 2)
    assert not torch.equal(torch.rand(4, generator=first), torch.rand(4, generator=second))
    assert not torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())  # consumed, as in diffusers
    again = block_generators(torch.Generator().manual_seed(0), 2, 2)  # the same seed: the same blocks
    assert torch.equal(torch.rand(4, generator=again[0]), torch.rand(4, generator=block_generators(
        torch.Generator().manual_seed(0), 2, 2)[0]))


def test_a_second_call_with_the_same_generator_gives_new_samples():
    chain = make_chain(steps=4)
    x = torch.full((32, LENGTH), chain.mask_token_id)  # the toy law is concentrated: enough rows to differ
    g = torch.Generator().manual_seed(3)
    first = sample_blocks(chain, x, block_size=BLOCK, window=2, generator=g).sample
    second = sample_blocks(chain, x, block_size=BLOCK, window=2, generator=g).sample
    assert not torch.equal(first, second)
    assert torch.equal(first, sample_blocks(chain, x, block_size=BLOCK, window=2,
                                            generator=torch.Generator().manual_seed(3)).sample)


def test_block_sampler_rejects_masks_that_are_not_a_common_suffix():
    chain = make_chain()
    m = chain.mask_token_id
    with pytest.raises(ValueError, match="suffix"):
        sample_blocks(chain, torch.tensor([[m, 3, m, m]]), block_size=2)
    with pytest.raises(ValueError, match="block_size"):
        sample_blocks(chain, torch.tensor([[3, m]]), block_size=0)


def adaptive_block_run(chain, x, window):
    return sample_blocks(chain, x, block_size=BLOCK, window=window, drafter=ScaledDrafter(-3.0),
                         generator=torch.Generator().manual_seed(7))


def test_a_block_runs_stats_hold_its_whole_schedule_and_replay_it_bit_for_bit():
    from specdiff.window import AutoWindow

    chain = make_chain(steps=6)
    x = torch.full((4, LENGTH), chain.mask_token_id)
    auto = AutoWindow(max_window=4, latency={1: 1.0, 64: 1.0}, outside=(0.0, 0.0))  # a given curve: no timing
    out = adaptive_block_run(chain, x, auto)
    s = out.stats
    assert s.proposed > s.accepted  # rejections: the schedule depends on the run
    assert len(s.windows) == s.rounds and s.rounds > 2 and len(set(s.windows)) > 1
    first = adaptive_block_run(chain, x[:, :BLOCK], auto).stats.windows  # the first block alone
    assert s.windows[:len(first)] == first and len(first) < s.rounds  # every block's rounds, in order
    for replay in (s.windows, s):
        again = adaptive_block_run(chain, x, replay)
        assert torch.equal(again.sample, out.sample) and again.stats.windows == s.windows
        assert again.stats.calibration_rows == 0
        assert again.stats.window_choice == f"replayed window schedule ({s.rounds} rounds, max {max(s.windows)})"


def test_a_block_runs_calibration_cost_and_window_choice_add_up_over_its_blocks(monkeypatch):
    from specdiff.text import blocks
    from specdiff.window import AutoWindow

    chain = make_chain(steps=4)
    x = torch.full((2, LENGTH), chain.mask_token_id)
    real, choices = blocks.speculative_sample_discrete, []

    def calibrating(*args, **kwargs):  # each block reports a calibration of 3 rows
        out = real(*args, **kwargs)
        out.stats.calibration_rows, out.stats.calibration_seconds = 3, 0.5
        choices.append(out.stats.window_choice)
        return out

    monkeypatch.setattr(blocks, "speculative_sample_discrete", calibrating)
    s = adaptive_block_run(chain, x, AutoWindow(max_window=3, latency={1: 1.0, 64: 1.0}, outside=(0.0, 0.0))).stats
    assert (s.calibration_rows, s.calibration_seconds) == (6, 1.0)
    assert len(choices) == 2 and all(c.startswith("auto window") and c in s.window_choice for c in choices)


def test_a_block_replay_of_another_runs_schedule_is_refused_with_a_clear_error():
    chain = make_chain(steps=6)
    x = torch.full((4, LENGTH), chain.mask_token_id)
    s = adaptive_block_run(chain, x, 3).stats
    with pytest.raises(ValueError, match="needs more"):
        adaptive_block_run(chain, x, s.windows[:-2])
    with pytest.raises(ValueError, match="finished after"):
        adaptive_block_run(chain, x, s.windows + [1, 1])
    with pytest.raises(ValueError, match="from a run of 4 samples"):
        adaptive_block_run(chain, x[:2], s)
    with pytest.raises(ValueError, match="recorded from another run"):
        adaptive_block_run(chain, x, [1] * s.rounds)
