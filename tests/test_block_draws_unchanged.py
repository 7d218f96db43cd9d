"""Block verification's draws are pinned: the samples and decisions of a handful of runs (Gaussian
and categorical chains, windows 2, 4, 5 and 8, frozen, Picard and a bad drafter, one generator and one per
sample, ragged batches, a row cap, bf16 states, the DDPM adapter) are bit for bit those stored in
tests/data/block_draws.pt, computed before the block code was made faster. A speed-up must change
no draw; regenerate the file (``python tests/test_block_draws_unchanged.py``) only for a change that
is meant to change the draws, and say so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specdiff import speculative_sample
from specdiff.discrete import LookupDenoiser, MaskedDiffusionChain, MaskedDiffusionScheduler
from specdiff.discrete.chain import ScaledDrafter
from specdiff.testing import GaussianMixtureDDPM

DATA = Path(__file__).parent / "data" / "block_draws.pt"


def _mixture(dim=2):
    return GaussianMixtureDDPM.random(dim=dim, components=4, num_steps=30, seed=1)


def _masked(steps=12):
    scheduler = MaskedDiffusionScheduler(vocab_size=4, num_inference_steps=steps)
    return MaskedDiffusionChain(LookupDenoiser(4, 6, seed=3, scale=2.0), scheduler)


def _ddpm():
    """The DDPM adapter on image-shaped states, with an elementwise stand-in for a UNet (a network's
    float rounding can depend on the thread count and the machine; the block code's must not)."""
    from diffusers import DDPMScheduler

    from specdiff.schedulers import SpeculativeScheduler

    scheduler = SpeculativeScheduler.from_scheduler(DDPMScheduler(num_train_timesteps=100))
    scheduler.set_timesteps(20)
    return scheduler.chain(lambda x, t: torch.tanh(1.5 * x) * (0.5 + t.view(-1, 1, 1, 1) / 200))


def _gens(n, base=0):
    return [torch.Generator().manual_seed(base + s) for s in range(n)]


def _configs():
    """name -> (chain, x_init, options) for one run each."""
    g2 = _mixture()
    x2 = g2.sample_prior(12, torch.Generator().manual_seed(11), dtype=torch.float32)
    m = _masked()
    tokens = torch.full((12, 6), 4)
    ddpm = _ddpm()
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    return {
        "gauss-w2-frozen-per-sample": (g2, x2, dict(window=2, drafter="frozen", generator=_gens(12))),
        "gauss-w8-picard-one-generator": (g2, x2, dict(window=8, drafter="picard",
                                                       generator=torch.Generator().manual_seed(7))),
        "gauss-w4-picard-per-sample": (g2, x2, dict(window=4, drafter="picard", generator=_gens(12, 200))),
        "masked-w4-picard-per-sample": (m, tokens, dict(window=4, drafter="picard", generator=_gens(12, 300))),
        "gauss-w8-frozen-bf16-cap5": (g2, x2.to(torch.bfloat16), dict(window=8, drafter="frozen", max_rows=5,
                                                                      generator=_gens(12, 100))),
        "gauss-d5-w5-frozen": (_mixture(5), _mixture(5).sample_prior(6, torch.Generator().manual_seed(3)),
                                    dict(window=5, drafter="frozen", generator=_gens(6, 50))),
        "masked-w2-frozen-per-sample": (m, tokens, dict(window=2, generator=_gens(12))),
        "masked-w8-bad-per-sample": (m, tokens, dict(window=8, drafter=ScaledDrafter(-1.0), generator=_gens(12, 30))),
        "masked-w8-near-greedy-one-generator-cap7": (m, tokens, dict(window=8, drafter=ScaledDrafter(25.0),
                                                                     max_rows=7,
                                                                     generator=torch.Generator().manual_seed(9))),
        "ddpm-w8-picard-per-sample": (ddpm, noise, dict(window=8, drafter="picard", generator=_gens(3, 70))),
        "ddpm-w2-frozen-one-generator": (ddpm, noise, dict(window=2, drafter="frozen",
                                                                generator=torch.Generator().manual_seed(8))),
    }


def _run(chain, x, options) -> dict:
    with torch.no_grad():
        out = speculative_sample(chain, x, verify="block", **options)
    s = out.stats
    return {"sample": out.sample, "decisions": torch.tensor([s.target_calls, s.target_rows, s.proposed, s.accepted,
                                                             s.residual_draws, *s.committed_per_round,
                                                             *s.per_sample_target_calls])}


def compute() -> dict:
    return {name: _run(*config) for name, config in _configs().items()}


@pytest.fixture(scope="module")
def stored():
    return torch.load(DATA)


@pytest.mark.parametrize("name", list(_configs()))
def test_block_draws_are_unchanged(name, stored):
    chain, x, options = _configs()[name]
    got, want = _run(chain, x, options), stored[name]
    assert torch.equal(got["decisions"], want["decisions"]), (got["decisions"], want["decisions"])
    assert got["sample"].dtype == want["sample"].dtype and torch.equal(got["sample"], want["sample"])


def test_the_pinned_runs_cut_windows():
    """The runs exercise the block rule: most configurations cut windows (residual draws happen)."""
    stored = torch.load(DATA)
    cuts = {name: int(r["decisions"][2] - r["decisions"][3]) for name, r in stored.items()}
    assert sum(c > 0 for c in cuts.values()) >= len(cuts) - 1, cuts


if __name__ == "__main__":
    torch.set_num_threads(1)  # as the tests run (tests/conftest.py)
    DATA.parent.mkdir(exist_ok=True)
    torch.save(compute(), DATA)
    print(f"wrote {DATA}")
