"""Semi-autoregressive sampling: masked diffusion block by block, left to right (as MDLM's
semi-AR sampler, block diffusion and LLaDA's blocks).

The masked positions of ``x_init`` (a common suffix of every row, after the prompt) are cut
into blocks of ``block_size``. Block ``b`` is one run of a sampler of the chain's whole
grid on the prefix ``x[:, :end_b]``: everything before the block is fixed (copied by the
kernel) and the model sees no position after it. The speculative sampler is exact for each
block given its prefix, so the whole block sampler has exactly the law of the plain one.

Block ``b`` draws only from a generator seeded by the ``b``-th of ``num_blocks`` seeds drawn from
the caller's generator(s) on entry, never from what earlier blocks consumed, so the plain,
cached and speculative block samplers use the same randomness for every block, and the caller's
generator advances as in diffusers (a second call with it gives new samples).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch
from torch import Tensor

from ..drafters import Drafter
from ..sampler import SpeculativeOutput, sample_baseline_discrete, speculative_sample_discrete
from ..stats import SpeculativeStats
from ..window import ReplayWindow


def _per_block(generator: torch.Generator, num_blocks: int) -> list[torch.Generator]:
    """``num_blocks`` generators seeded by draws from ``generator`` (which advances)."""
    seeds = torch.randint(0, 2**62, (num_blocks,), generator=generator, device=generator.device).tolist()
    return [torch.Generator(device=generator.device).manual_seed(seed) for seed in seeds]


def block_generators(generator, batch: int, num_blocks: int) -> list:
    """Per block: a generator (or a list, one per sample) seeded from the caller's, which advances."""
    if generator is None:  # seeded from torch's global RNG, so torch.manual_seed repeats runs
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
    if isinstance(generator, torch.Generator):
        return _per_block(generator, num_blocks)
    if not isinstance(generator, Sequence) or len(generator) != batch:
        raise ValueError(f"generator must be a torch.Generator or a list of {batch} (one per sample)")
    per_sample = [_per_block(g, num_blocks) for g in generator]
    return [[blocks[b] for blocks in per_sample] for b in range(num_blocks)]


def _masked_suffix(x: Tensor, mask_id: int) -> int:
    masked = (x == mask_id).flatten(1) if x.ndim > 2 else x == mask_id
    start = int(masked.shape[1] - masked.flip(1).int().cumprod(1).sum(1).min())
    if not masked[:, start:].all() or masked[:, :start].any():
        raise ValueError("block sampling needs the masked positions to be the same suffix of every row (prompt first)")
    return start


def _add(total: SpeculativeStats, s: SpeculativeStats) -> SpeculativeStats:
    """The stats of the blocks so far and of the next block (the same samples): counts, times and per-sample
    lists add, the schedules join in order (``chosen_windows``), the calibration costs add."""
    joined = total.merge(s)  # counts, times, per-position lists, peaks, schedules and calibration
    per_sample = {name: [a + b for a, b in zip(getattr(total, name), getattr(s, name))] for name in (
        "per_sample_target_calls", "per_sample_proposed", "per_sample_accepted")}
    choice = total.window_choice if s.window_choice in (None, total.window_choice) else joined.window_choice
    return dataclasses.replace(joined, batch_size=total.batch_size, window_choice=choice, **per_sample)


class _BlockReplay(ReplayWindow):
    """The rounds of a replayed block run that a block consumes: the run's schedule from where the blocks before
    it stopped (sized by the whole schedule's largest window); the last block checks the schedule was used whole."""

    def __init__(self, replay: ReplayWindow, start: int, last: bool):
        if start >= len(replay.windows):
            raise ValueError(
                f"the replayed schedule has {len(replay.windows)} rounds and this run needs more: it was recorded "
                "from another run (batch, steps, seeds, drafter or x_init differ)"
            )
        super().__init__(replay.windows[start:])
        self.max_window, self.last, self.describe = replay.max_window, last, replay.describe

    def finish(self, stats: SpeculativeStats) -> None:
        if self.last:
            super().finish(stats)


@torch.no_grad()
def sample_blocks(
    chain,
    x_init: Tensor,
    *,
    block_size: int,
    window: int | None = None,
    drafter: Drafter | Callable | str | None = None,
    cached: bool = False,
    generator=None,
    progress: bool | Callable = False,
    max_rows: int | str | None = "auto",
    verify: str = "step",
) -> SpeculativeOutput:
    """Generate the masked suffix of ``x_init [B, L]`` in blocks of ``block_size`` tokens.

    Each block runs ``chain.num_steps`` steps: the plain sampler (``window=None``; ``cached``
    as MDLM's ``ddpm_cache``) or the speculative one (``window``, ``drafter``, ``max_rows``, ``verify``). ``stats`` add
    up over blocks (``num_steps`` = blocks x steps) and hold the whole run's schedule, block after block:
    ``window=stats.windows`` (or ``window=stats``) replays it, each block running its own rounds of it.
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    start, length = _masked_suffix(x_init, chain.mask_token_id), x_init.shape[1]
    ends = list(range(start + block_size, length, block_size)) + [length]
    gens = block_generators(generator, x_init.shape[0], len(ends))
    replay = ReplayWindow(window) if isinstance(window, (list, tuple, SpeculativeStats)) else None
    if replay is not None:  # one schedule for the whole run: each block runs its own rounds of it
        replay.bind(SimpleNamespace(num_steps=chain.num_steps * len(ends)), x_init)
    stats, x = None, x_init.clone()
    for b, (end, g) in enumerate(zip(ends, gens)):
        if replay is not None:
            window = _BlockReplay(replay, stats.rounds if stats else 0, last=b == len(ends) - 1)
        if window is None:
            out = sample_baseline_discrete(chain, x[:, :end], g, cached=cached, progress=progress, return_stats=True)
        else:
            out = speculative_sample_discrete(
                chain, x[:, :end], window=window, drafter=drafter, generator=g, progress=progress, max_rows=max_rows,
                verify=verify,
            )
        x[:, :end] = out.sample
        block = dataclasses.replace(out.stats, num_steps=chain.num_steps * len(ends))
        stats = block if stats is None else _add(stats, block)
    return SpeculativeOutput(sample=x, stats=stats)
