"""The round's fast paths are the generic computation, bit for bit: a state-free drafter's window
drafted at once by the Gaussian kernel's draft_window (DDPM), against the same drafter asked position by
position; and the companion streams (acceptance uniforms, residual seeds) drawn in blocks of
steps, against the step-by-step draws of their generators."""

import pytest
import torch
from diffusers import DDPMScheduler

from specdiff import speculative_sample
from specdiff.drafters import Drafter, FrozenTargetDrafter, PicardDrafter
from specdiff.kernels import GaussianKernel
from specdiff.noise import NoiseStreams, _companion
from specdiff.schedulers.speculative import SpeculativeScheduler


class StepByStep(Drafter):
    """Wraps a drafter so that the sampler treats it as one that reads the drafted states."""

    uses_state, reuses_target, network_calls = True, True, False

    def __init__(self, drafter):
        self.drafter = drafter

    def predict(self, x, step, memory):
        return self.drafter.predict(x, step, memory)


def ddpm_chain(dtype, **config):
    scheduler = SpeculativeScheduler.from_scheduler(DDPMScheduler(num_train_timesteps=1000, **config))
    scheduler.set_timesteps(60)
    weight = torch.randn(3, 3, generator=torch.Generator().manual_seed(1)).to(dtype) * 0.4

    def net(x, t):  # a cheap deterministic "network": the fast paths must not care what it is
        return torch.einsum("bchw,cd->bdhw", x, weight) + torch.sin(t.float() / 200).view(-1, 1, 1, 1).to(x.dtype)

    return scheduler.chain(net)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [{}, {"clip_sample": False}, {"thresholding": True, "clip_sample": False}])
def test_a_rolled_out_window_is_the_position_by_position_draft(dtype, config):
    chain = ddpm_chain(dtype, **config)
    assert chain.affine
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(2)).to(dtype)
    for drafter in (FrozenTargetDrafter(), PicardDrafter()):
        for window in (1, 4, 16):
            runs = [speculative_sample(chain, x, window=window, drafter=d,
                                       generator=[torch.Generator().manual_seed(s) for s in range(5)])
                    for d in (drafter, StepByStep(drafter))]
            fast, slow = runs
            assert torch.equal(fast.sample, slow.sample), (type(drafter).__name__, window)
            assert fast.stats.to_dict() | {"wall_clock": 0} == slow.stats.to_dict() | {"wall_clock": 0}
            assert window == 1 or fast.stats.proposed > fast.stats.accepted  # reflections were exercised


def test_the_window_draft_declines_chains_without_an_affine_mean():
    chain = ddpm_chain(torch.float32)
    chain.affine = False
    steps = torch.zeros(2, 1, dtype=torch.long)
    assert GaussianKernel.draft_window(chain, torch.zeros(1, 3, 4, 4), steps, torch.zeros(2, 1, 3, 4, 4),
                                       torch.zeros(2, 1, 3, 4, 4)) is None


@pytest.mark.parametrize("per_sample", [False, True])
def test_companion_streams_drawn_in_blocks_are_the_step_by_step_draws(per_sample):
    batch, steps = 3, 75
    make = (lambda: [torch.Generator().manual_seed(10 + b) for b in range(batch)]) if per_sample else (
        lambda: torch.Generator().manual_seed(10))
    streams = NoiseStreams(make(), torch.zeros(batch, 2))
    rows = torch.arange(batch)
    u = torch.stack([streams.uniform(rows, torch.full((batch,), k)) for k in range(steps)])
    seeds = torch.stack([
        torch.tensor([g.initial_seed() for g in streams.residual_generators(rows, torch.full((batch,), k))])
        for k in range(steps)
    ])
    groups = make() if per_sample else [make()]
    for slots, g in zip([[b] for b in range(batch)] if per_sample else [list(range(batch))], groups):
        uniforms, residuals = _companion(g, b"specdiff-uniforms"), _companion(g, b"specdiff-residuals")
        for k in range(steps):
            assert torch.equal(u[k, slots], torch.rand(len(slots), generator=uniforms, dtype=torch.float64))
            assert torch.equal(seeds[k, slots], torch.randint(0, 2**62, (len(slots),), generator=residuals))


@pytest.mark.parametrize("per_sample", [False, True])
def test_uniform_step_noise_drawn_several_steps_at_once_is_the_step_by_step_draws(per_sample):
    """A categorical round draws its window's step noise in one call per generator: the same numbers,
    and the same generator state after, as one call per step (the plain sampler)."""
    batch, steps, shape = 3, 40, (2, 5)
    make = (lambda: [torch.Generator().manual_seed(30 + b) for b in range(batch)]) if per_sample else (
        lambda: torch.Generator().manual_seed(30))
    given = make()
    streams = NoiseStreams(given, torch.zeros(batch, *shape, dtype=torch.long), "uniform")
    rows, got, start = torch.arange(batch), [], 0
    for span in (1, 7, 3, 16, 13):  # windows of several steps, as a round asks for them
        grid = torch.arange(start, start + span)[:, None].expand(span, batch)
        got.append(streams.noise(rows, grid))
        start += span
    got = torch.cat(got)
    for slots, g, mine in zip([[b] for b in range(batch)] if per_sample else [list(range(batch))],
                              make() if per_sample else [make()], given if per_sample else [given]):
        plain = torch.stack([torch.rand((len(slots), *shape), generator=g, dtype=torch.float64) for _ in range(steps)])
        assert torch.equal(got[:, slots], plain)
        assert torch.equal(mine.get_state(), g.get_state())


@pytest.mark.parametrize("kind, like", [("normal", torch.zeros(3, 2, 4)),
                                        ("normal", torch.zeros(3, 2, 4, dtype=torch.bfloat16)),
                                        ("uniform", torch.zeros(3, 5, dtype=torch.long))])
@pytest.mark.parametrize("per_sample", [False, True])
def test_the_plain_loops_noise_at_a_step_is_the_keyed_lookup(per_sample, kind, like):
    """The plain loop draws every sample's noise at step k with ``noise_at(k)``, without the per-row gather
    of a round's ragged lookup (a generator list of 8 cost 1.5 ms a step, 4% of a digits UNet call at
    batch 8): the same numbers as ``noise(arange(batch), k)`` and the same generator states after."""
    batch, steps = like.shape[0], 20
    make = (lambda: [torch.Generator().manual_seed(50 + b) for b in range(batch)]) if per_sample else (
        lambda: torch.Generator().manual_seed(50))
    fast_gens, keyed_gens = make(), make()
    fast, keyed = NoiseStreams(fast_gens, like, kind), NoiseStreams(keyed_gens, like, kind)
    rows = torch.arange(batch)
    for k in range(steps):
        got, want = fast.noise_at(k), keyed.noise(rows, torch.full((batch,), k))
        assert got.dtype == want.dtype and torch.equal(got, want)
        fast.forget_before(torch.full((batch,), k + 1))
        keyed.forget_before(torch.full((batch,), k + 1))
    for a, b in zip(fast_gens if per_sample else [fast_gens], keyed_gens if per_sample else [keyed_gens]):
        assert torch.equal(a.get_state(), b.get_state())
