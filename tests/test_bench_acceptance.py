"""The acceptance workbench measures what it says: the per-step tally against forced accept/reject
runs and the sampler's own totals, and the lag map against the chain's own draft law."""

import pytest
import torch
from diffusers import DDPMScheduler, EulerAncestralDiscreteScheduler

from specdiff import speculative_sample
from specdiff.drafters import Drafter
from specdiff.kernels.gaussian import acceptance_probability
from specdiff.schedulers import SpeculativeScheduler
from specdiff.workbench.bench_acceptance import (
    SPACES,
    PicardReach,
    StepTally,
    TailWindow,
    draft_model_map,
    lag_map,
    trajectory,
)

STEPS = 12


def toy_model(x, t):
    """A deterministic, nonlinear, timestep-dependent stand-in for a network."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *[1] * (x.ndim - 1))
    return 1.5 * torch.tanh(0.7 * x + torch.sin(t / 97.0)) + 0.1 * torch.cos(3 * x)


def scheduler(base, frozen_prediction="sample"):
    s = SpeculativeScheduler.from_scheduler(base, frozen_prediction=frozen_prediction)
    s.set_timesteps(STEPS)
    return s


class Offset(Drafter):
    """The frozen prediction (x0, never clipped here) plus a constant: every tested step is rejected."""

    def predict(self, x, step, memory):
        return memory.prediction + 100.0


class Exact(Drafter):
    """The target's own prediction at the drafted state: every tested step is accepted."""

    def __init__(self, chain):
        self.chain = chain

    def predict(self, x, step, memory):
        return self.chain.predict(x, step)


class Near(Exact):
    """The target's own prediction plus a small constant: some tested steps are rejected, most not."""

    def predict(self, x, step, memory):
        return self.chain.predict(x, step) + 0.1


def run(chain, drafter, window=4, seed=0):
    tally = StepTally(STEPS)
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    out = speculative_sample(chain, x, window=window, drafter=drafter, callback=tally,
                             generator=torch.Generator().manual_seed(seed + 1))
    return tally, out.stats


def test_step_tally_under_forced_rejection():
    """Round 1 (fresh) commits steps 0 and 1, every later round one step: each step from 1 on is tested
    once and rejected."""
    chain = scheduler(DDPMScheduler(num_train_timesteps=1000, clip_sample=False)).chain(toy_model)
    tally, stats = run(chain, Offset())
    assert tally.proposed == [0] + [1] * (STEPS - 1)
    assert tally.accepted == [0] * STEPS
    assert stats.accepted == 0 and stats.proposed == STEPS - 1


def test_step_tally_under_forced_acceptance():
    """Every round is fully accepted (fresh, so its first step is exact and untested): window 4 tests
    positions 1..3 of each round, steps 1-3, 5-7, 9-11."""
    chain = scheduler(DDPMScheduler(num_train_timesteps=1000, clip_sample=False)).chain(toy_model)
    tally, stats = run(chain, Exact(chain))
    tested = [0 if k % 4 == 0 else 1 for k in range(STEPS)]
    assert tally.proposed == tested and tally.accepted == tested
    assert stats.proposed == stats.accepted == sum(tested)


@pytest.mark.parametrize("seed", [0, 1])
def test_step_tally_adds_up_to_the_run_stats(seed):
    """Runs with rejections inside the schedule: the per-step counts add up to the sampler's totals."""
    chain = scheduler(DDPMScheduler(num_train_timesteps=1000, clip_sample=False)).chain(toy_model)
    tally, stats = run(chain, Near(chain), window=5, seed=seed)
    assert sum(tally.proposed) == stats.proposed and sum(tally.accepted) == stats.accepted
    assert 0 < stats.accepted < stats.proposed - 1  # a rejection before the last (deterministic) step
    assert all(0 <= a <= p for a, p in zip(tally.accepted, tally.proposed))


@pytest.mark.parametrize("make", [lambda: DDPMScheduler(num_train_timesteps=1000),
                                  lambda: EulerAncestralDiscreteScheduler(num_train_timesteps=1000)])
@pytest.mark.parametrize("space", SPACES)
def test_lag_map_is_the_acceptance_of_the_chains_own_frozen_draft(make, space):
    """The map's entry (k, d) for a held space is 1 - TV between the chain's law at x_k from the
    prediction made d steps earlier (a chain carrying that space) and its law from the one made at x_k."""
    base = make()
    adapter, xs, outs = trajectory(toy_model, scheduler(base), torch.randn(1, 1, 4, 4,
                                   generator=torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    assert len(xs) == STEPS
    acc = lag_map(adapter, xs, outs, max_lag=4)[space]
    chain = scheduler(base, frozen_prediction=space).chain(toy_model)
    checked = 0
    for k in range(1, STEPS):
        step = torch.tensor([k])
        mean_t, std = chain.transition(xs[k : k + 1], step, chain.predict(xs[k : k + 1], step))
        if float(std) == 0:
            assert acc[k] == [None] * 4
            continue
        for d in range(1, min(4, k) + 1):
            held = chain.predict(xs[k - d : k - d + 1], torch.tensor([k - d]))
            mean_d, _ = chain.transition(xs[k : k + 1], step, held)
            want = float(acceptance_probability(mean_d, mean_t, float(std)))
            assert acc[k][d - 1] == pytest.approx(want, abs=1e-5)
            checked += 1
    assert checked >= 30


def test_draft_model_map_accepts_a_draft_equal_to_the_target():
    """A draft model whose outputs are the target's is accepted at every noisy step; one far off never."""
    adapter, xs, outs = trajectory(toy_model, scheduler(DDPMScheduler(num_train_timesteps=1000, clip_sample=False)),
                                   torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0)),
                                   torch.Generator().manual_seed(1))
    same = draft_model_map(adapter, xs, outs, outs.clone())
    off = draft_model_map(adapter, xs, outs, outs + 100.0)
    noisy = [k for k in range(1, STEPS) if same[k] is not None]
    assert len(noisy) == STEPS - 2  # step 0 has no draft, the last step no noise
    assert all(same[k] == pytest.approx(1.0) for k in noisy) and all(off[k] < 1e-6 for k in noisy)


def test_tail_window_shrinks_the_window_in_the_last_fifth():
    """The per-step window runs ``window`` until four fifths of the steps are done, then ``tail``."""
    steps = 20
    s = SpeculativeScheduler.from_scheduler(DDPMScheduler(num_train_timesteps=1000, clip_sample=False))
    s.set_timesteps(steps)
    chain = s.chain(toy_model)
    done = []

    def record(info):
        done.append(int(info["step"][0]))

    out = speculative_sample(chain, torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0)),
                             window=TailWindow(6, 2, steps), drafter=Exact(chain), callback=record,
                             generator=torch.Generator().manual_seed(1))
    windows = out.stats.chosen_windows
    starts = [0] + done[:-1]
    assert windows == [min(6 if n < 16 else 2, steps - n) for n in starts]
    assert 2 in windows and 6 in windows


def test_picard_reach_spans_frozen_to_picard_bit_for_bit():
    """Reach 0 never uses a same-step prediction (the frozen drafter); a reach past the window always does
    (the Picard drafter): same samples and stats, bit for bit. Rejections make the two differ."""
    s = SpeculativeScheduler.from_scheduler(DDPMScheduler(num_train_timesteps=1000, clip_sample=False))
    s.set_timesteps(30)
    chain = s.chain(toy_model)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def sample(drafter):
        return speculative_sample(chain, x, window=6, drafter=drafter, generator=torch.Generator().manual_seed(1))

    frozen, picard = sample("frozen"), sample("picard")
    assert not torch.equal(frozen.sample, picard.sample)  # the same-step predictions were used
    for reach, want in [(0, frozen), (6, picard)]:
        got = sample(PicardReach(reach))
        assert torch.equal(got.sample, want.sample) and got.stats.target_calls == want.stats.target_calls
