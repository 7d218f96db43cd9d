"""The plain sampler and the speculative one, for Gaussian and categorical chains alike.

Both consume the same step-keyed randomness (:mod:`specdiff.noise`) through the same kernel
(:mod:`specdiff.kernels`), so with ``window=1`` the speculative sampler reproduces
``sample_baseline`` bit for bit, and for any window and drafter its output has exactly the
baseline's law. The round itself is :func:`specdiff.round.speculative_round`; this module runs
it over a ragged batch (every sample advances at its own pace, one target call per round
serving all of them).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from .block import BlockNoise, check_verify
from .calibration import progress_to, register_sampler
from .chains import GaussianChain
from .drafters import Drafter, as_drafter
from .kernels import kernel_for
from .noise import GeneratorArg, NoiseStreams, split_generators
from .round import Carry, _check_finite, speculative_round
from .stats import SpeculativeStats
from .window import resolve_window


@dataclass
class SpeculativeOutput:
    sample: Tensor
    stats: SpeculativeStats


@torch.no_grad()
def sample_baseline(
    chain,
    x_init: Tensor,
    generator: GeneratorArg = None,
    *,
    cached: bool = False,
    progress: bool | Callable = False,
    return_stats: bool = False,
) -> Tensor | SpeculativeOutput:
    """The plain sequential sampler: one target call per step, each step drawn from its keyed noise.

    ``cached=True`` (time-free chains only, e.g. MDLM's ``ddpm_cache``) reuses a row's prediction
    while its state is unchanged and skips steps where no row changed: the same output from the
    same generator, fewer calls. ``return_stats=True`` returns ``SpeculativeOutput(sample, stats)``.
    """
    kernel = _check_chain(chain, x_init)
    if cached and getattr(chain, "time_conditioned", True):
        raise ValueError(
            "cached sampling reuses a prediction while the state is unchanged, which is exact only "
            "when the network ignores the time; this chain has time_conditioned=True"
        )
    started, batch, num_steps = time.perf_counter(), x_init.shape[0], chain.num_steps
    stats = SpeculativeStats(num_steps=num_steps, batch_size=batch, window=1)
    noise, target = NoiseStreams(generator, x_init, kernel.noise), _Target(chain, stats, x_init.device)
    rows, calls = torch.arange(batch), torch.zeros(batch, dtype=torch.long)
    x, prediction, previous = x_init, None, None
    changed = torch.ones(batch, dtype=torch.bool)
    with _progress(progress, batch * num_steps, "plain sampler") as bar:
        for k in range(num_steps):
            step = torch.full((batch,), k, dtype=torch.long)
            if not cached:
                prediction = target(x, step, rows)
                calls += 1
            elif changed.any():
                new = target(x[changed.to(x.device)], step[changed], rows[changed])
                prediction = new if prediction is None or changed.all() else prediction.index_put(
                    (changed.to(x.device),), new)
                calls += changed
            law = kernel.law(chain, x, step.to(x.device), prediction, prediction if previous is None else previous)
            x_next = kernel.draw(law, noise.noise_at(k), x_init)
            if cached:
                changed = ~(x_next == x).flatten(1).all(1).cpu()
            x, previous = x_next, prediction
            noise.forget_before(step + 1)
            if bar is not None:
                bar.update(batch)
    if not return_stats:
        return x
    stats.per_sample_target_calls, stats.wall_clock = calls.tolist(), time.perf_counter() - started
    return SpeculativeOutput(sample=x, stats=stats)


@torch.no_grad()
def speculative_sample(
    chain,
    x_init: Tensor,
    *,
    window=8,
    drafter: Drafter | Callable | str | None = None,
    generator: GeneratorArg = None,
    max_rows: int | str | None = "auto",
    progress: bool | Callable = False,
    callback: Callable[[dict], None] | None = None,
    coupling: str | None = None,
    verify: str = "step",
) -> SpeculativeOutput:
    """Speculative sampling (De Bortoli et al. 2025), exact in law for any drafter.

    Works on a :class:`~specdiff.GaussianChain` (float states; reflection coupling) and on a
    :class:`~specdiff.CategoricalChain` (integer states; categorical coupling with the exact residual).

    Args:
        window: steps drafted per round (``L``; 1 is the plain sampler), ``"auto"``, or a window
            policy (see :mod:`specdiff.window`): the window of a round may depend on the past only.
        drafter: ``None``/``"frozen"`` (reuse the target's last prediction), a callable with the
            signature of ``chain.predict`` (an independent cheaper network), or a :class:`Drafter`.
        generator: a ``torch.Generator`` or a list of them, one per sample (diffusers semantics);
            ``None`` seeds the run from torch's global RNG (``torch.manual_seed`` repeats it).
        max_rows: the most states per network call; larger verify batches are split into exact
            micro-batches. ``"auto"``: no cap on CPU, a cap fitted to free memory on CUDA.
        progress: ``True`` for a tqdm bar (counts sample-steps), or ``progress(total=)`` making one.
        callback: called after every round with ``{"round", "x", "step", "stats"}``.
        coupling: how a drafted Gaussian step is accepted or corrected: ``"reflection"`` or
            ``"maximal"`` (see :mod:`specdiff.kernels`); ``None``: the chain's own (reflection, or
            maximal where the std comes from the network). The law is the same either way.
        verify: ``"step"`` (each drafted step tested in order) or ``"block"`` (block verification,
            the window cut jointly: the README's block-verification page).
    """
    started = time.perf_counter()  # wall_clock includes the window's calibration, if it measures one
    verify = check_verify(verify)
    kernel = _check_chain(chain, x_init, coupling)
    drafter = as_drafter(drafter)
    calibration_bar = (lambda total: _progress(progress, total, "calibrating the window", "call")) if progress else None
    with progress_to(calibration_bar):
        per_sample = split_generators(generator, x_init.shape[0]) is not None  # a generator per sample
        policy = _window_policy(window, chain, x_init, drafter, max_rows, per_sample)
    batch, num_steps, device = x_init.shape[0], chain.num_steps, x_init.device
    calibrated = {"calibration_seconds": getattr(policy, "calibration_seconds", 0.0),
                  "calibration_rows": getattr(policy, "calibration_rows", 0)}
    if callback is None and getattr(policy, "runs_plain", None) and policy.runs_plain(batch) and not (
            isinstance(max_rows, int) and max_rows < batch):
        return _plain_run(chain, x_init, generator, progress, policy, started, calibrated)
    stats = SpeculativeStats(num_steps=num_steps, batch_size=batch, window=policy.max_window, **calibrated)
    noise = NoiseStreams(generator, x_init, kernel.noise)
    noise = BlockNoise(noise, batch) if verify == "block" else noise
    target = _Target(chain, stats, device)
    _track_memory(device, reset=True)
    n = torch.zeros(batch, dtype=torch.long)
    pred = target.fit_max_rows(max_rows, lambda: target(x_init, n, torch.arange(batch)))
    ahead = pred.new_zeros((policy.max_window, *pred.shape))
    c = Carry(x_init.clone(), n, pred, pred.clone(), torch.ones(batch, dtype=torch.bool), ahead,
              torch.zeros(batch, dtype=torch.long))
    tally = _Tally(stats)
    with _progress(progress, batch * num_steps, "speculative sampler") as bar:
        while (live := (c.n < num_steps).nonzero().squeeze(1)).numel():
            if not isinstance(policy, _Fixed):
                tally.write()  # the policy sees the run so far (past rounds only: exactness is kept)
            L = (num_steps - c.n[live]).clamp(max=min(max(int(policy.choose(stats, len(live))), 1), policy.max_window))
            stats.rounds += 1
            stats.chosen_windows.append(int(L.max()))
            before = int(c.n.sum()) if bar is not None else 0
            if len(live) == batch:  # every sample runs: the round's carry is the new one, no row copies
                c = speculative_round(chain, kernel, drafter, noise, target, c, live, L, tally, verify)
            else:
                c.put(live, speculative_round(chain, kernel, drafter, noise, target, c.take(live), live, L, tally,
                                              verify))
            noise.forget_before(c.n)
            if bar is not None:
                bar.update(int(c.n.sum()) - before)
            if callback is not None:
                tally.write()
                callback({"round": stats.rounds, "x": c.x.clone(), "step": c.n.clone(), "stats": stats})
    tally.write()
    if hasattr(policy, "finish"):  # a replayed schedule checks it was used whole
        policy.finish(stats)
    stats.window_choice = policy.describe() if hasattr(policy, "describe") else None
    stats.peak_memory = _track_memory(device)
    stats.wall_clock = time.perf_counter() - started
    return SpeculativeOutput(sample=c.x, stats=stats)


def _plain_run(chain, x_init: Tensor, generator, progress, policy, started: float, calibrated: dict):
    """A run its automatic window keeps at ``L = 1`` throughout (``AutoWindow.runs_plain``): the plain
    loop, which gives the speculative sampler's ``window=1`` samples bit for bit without a round's
    bookkeeping, recorded as ``num_steps`` rounds of window 1 (so ``stats.windows`` replays it)."""
    out = sample_baseline(chain, x_init, generator, progress=progress, return_stats=True)
    stats = out.stats
    stats.rounds, stats.chosen_windows = chain.num_steps, [1] * chain.num_steps
    stats.committed_per_round = [0, x_init.shape[0] * chain.num_steps]
    stats.calibration_seconds, stats.calibration_rows = calibrated.values()
    policy.chosen[1] += chain.num_steps
    stats.window_choice = policy.describe()
    stats.wall_clock = time.perf_counter() - started
    return out


def predict(chain, x: Tensor, step: Tensor, sample: Tensor) -> Tensor:
    """The chain's network call on rows ``x`` at ``step``; a chain with ``uses_sample_index``
    also learns the sample of each row (per-sample conditioning)."""
    step = step.to(x.device)
    if getattr(chain, "uses_sample_index", False):
        return chain.predict(x, step, sample=sample.to(x.device))
    return chain.predict(x, step)


speculative_sample_discrete = speculative_sample  # the masked-diffusion names of earlier releases
sample_baseline_discrete = sample_baseline


class _Target:
    """The target network as the samplers call it: per-sample conditioning, exact micro-batches
    of at most ``max_rows`` states, a finiteness check, and the call accounting."""

    def __init__(self, chain, stats: SpeculativeStats, device):
        self.chain, self.stats, self.max_rows = chain, stats, None
        self.device = torch.device(device)

    def __call__(self, x: Tensor, step: Tensor, sample: Tensor, copy: bool = True, check: bool = True) -> Tensor:
        """``copy=False``: the caller copies the output at once (a network may reuse its buffer).
        ``check=False``: the caller checks the rows it uses (a verify call also evaluates drafts that a
        rejection discards; a NaN there must not stop the run)."""
        rows = x.shape[0]
        cap = self.max_rows or rows
        if cap >= rows:
            out = self._predict(x, step, sample)
            out = out.clone() if copy else out
        else:
            out = torch.cat([self._predict(x[s : s + cap], step[s : s + cap], sample[s : s + cap])
                             for s in range(0, rows, cap)])
        if check:
            _check_finite(out, step, "target", x)
        self.stats.target_calls += 1
        self.stats.target_rows += rows
        self.stats.peak_rows = max(self.stats.peak_rows, min(rows, cap))
        return out

    def _predict(self, x: Tensor, step: Tensor, sample: Tensor) -> Tensor:
        return predict(self.chain, x, step, sample)

    def fit_max_rows(self, max_rows: int | str | None, first_call: Callable[[], Tensor]) -> Tensor:
        """Set the row cap and make the first call. ``"auto"`` caps nothing on CPU; on CUDA it fits
        the cap to the free memory, from the memory the first call needed per row."""
        if max_rows is not None and max_rows != "auto" and (
                not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1):
            raise ValueError(f"max_rows must be a positive integer, None (no cap) or 'auto'; got {max_rows!r}")
        self.max_rows = None if max_rows == "auto" else max_rows
        measure = max_rows == "auto" and self.device.type == "cuda"
        base = torch.cuda.memory_allocated(self.device) if measure else 0
        out = first_call()
        if measure:
            per_row = max((torch.cuda.max_memory_allocated(self.device) - base) / out.shape[0], 1.0)
            free, _ = torch.cuda.mem_get_info(self.device)
            self.max_rows = max(out.shape[0], int(0.8 * free / per_row))
        self.stats.max_rows = self.max_rows
        return out


class _Fixed:
    """A fixed window (the window policy of an integer ``window``, checked by ``resolve_window``)."""

    def __init__(self, window: int):
        self.max_window = window

    def choose(self, stats: SpeculativeStats, live: int) -> int:
        return self.max_window


def _window_policy(window, chain, x_init: Tensor, drafter: Drafter, max_rows, per_sample: bool = False):
    """The run's window policy. An automatic window calibrates here, before the run: its dry run
    re-enters this sampler with an integer window (see :func:`specdiff.calibration.measure_outside`;
    the sampler registers its entry points below, so the calibration imports nothing of it)."""
    cap = max_rows if isinstance(max_rows, int) and not isinstance(max_rows, bool) else None
    window = resolve_window(window, chain, x_init, drafter, cap, per_sample)
    return _Fixed(window) if isinstance(window, int) else window


class _Tally:
    """Acceptance counts kept as tensors during a run and written to the stats (see SpeculativeStats)."""

    def __init__(self, stats: SpeculativeStats):
        self.stats = stats
        self.sample_calls = torch.ones(stats.batch_size, dtype=torch.long)  # the first call served everyone
        self.sample_counts = torch.zeros(stats.batch_size, 2, dtype=torch.long)  # proposed, accepted
        self.position_counts = torch.zeros(stats.window, 2, dtype=torch.long)
        self.round_counts = torch.zeros(stats.window + 1, dtype=torch.long)
        self.residual_draws = 0
        self.prefix_rows = [0, 0]  # verified, possible (see SpeculativeStats.prefix_rows)
        self.pending: list[tuple] = []  # rounds not counted yet: counted when written, in one go
        self.draws: list[Tensor] = []  # residual draws per corrected row, of rounds not counted yet

    def called(self, ids: Tensor, served: Tensor) -> None:
        """``served[i]``: sample ``ids[i]`` had a row in the call."""
        self.sample_calls.index_add_(0, ids, served.long())

    def round(self, ids: Tensor, counted: Tensor, accept: Tensor, committed: Tensor, verified: Tensor,
              possible: Tensor) -> None:
        """``counted[j, i]``: position j of sample i was put to the test (up to its first rejection);
        ``verified`` / ``possible``: the round's rows up to each first rejection (``prefix_rows``)."""
        self.pending.append((ids, counted, accept, committed, verified, possible))

    def _count(self) -> None:
        for ids, counted, accept, committed, verified, possible in self.pending:
            self.prefix_rows[0] += int(verified)
            self.prefix_rows[1] += int(possible)
            both = torch.stack([counted, counted & accept], -1)  # [position, sample, (proposed, accepted)]
            self.position_counts[: counted.shape[0]].add_(both.sum(1))
            self.sample_counts.index_add_(0, ids, both.sum(0))
            self.round_counts.add_(torch.bincount(committed, minlength=len(self.round_counts)))
        self.pending.clear()
        self.residual_draws += sum(int(d.sum()) for d in self.draws)
        self.draws.clear()

    def write(self) -> None:
        self._count()
        s = self.stats
        s.proposed, s.accepted = self.position_counts.sum(0).tolist()
        s.per_sample_target_calls = self.sample_calls.tolist()
        s.per_sample_proposed, s.per_sample_accepted = self.sample_counts.T.tolist()
        s.proposed_by_position, s.accepted_by_position = self.position_counts.T.tolist()
        s.committed_per_round = self.round_counts.tolist()
        s.residual_draws = self.residual_draws
        s.prefix_rows, s.prefix_rows_possible = self.prefix_rows


def _check_chain(chain, x_init: Tensor, coupling: str | None = None):
    if not isinstance(chain, GaussianChain):  # the protocols of both kinds have the same three members
        raise TypeError(
            f"{type(chain).__name__} is not a GaussianChain or CategoricalChain (needs num_steps, predict, transition)"
        )
    if chain.num_steps < 1:
        raise ValueError(f"the chain has {chain.num_steps} steps; it needs at least one")
    if x_init.ndim < 1 or x_init.shape[0] < 1:
        raise ValueError(f"x_init must be a batch [B, ...] with B >= 1; got shape {tuple(x_init.shape)}")
    kernel = kernel_for(chain, x_init, coupling)
    if kernel.noise == "uniform" and (x_init.is_floating_point() or x_init.ndim < 2):
        raise TypeError(
            f"x_init must hold integer tokens [B, ...] for a categorical chain; got {x_init.dtype} "
            f"of shape {tuple(x_init.shape)}"
        )
    if kernel.noise == "normal" and not x_init.is_floating_point():
        raise TypeError(f"x_init must be floating point for a Gaussian chain; got {x_init.dtype}")
    return kernel


def _track_memory(device, reset: bool = False) -> int | None:
    """Peak bytes allocated on a CUDA device since the last reset (``None`` elsewhere)."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.max_memory_allocated(device)


def _progress(progress: bool | Callable, total: int, desc: str, unit: str | None = None):
    """The run's bar: ``progress(total=)`` counting sample-steps, or, for another ``unit`` (the
    calibration's network calls), ``progress(total=, desc=, unit=)`` where the callable takes them
    (the pipelines' bars do); a tqdm bar for ``True``; else none."""
    if callable(progress):
        named = inspect.signature(progress).parameters
        labelled = unit is not None and {"desc", "unit"} <= set(named)
        return progress(total=total, **({"desc": desc, "unit": unit} if labelled else {}))
    if progress:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit or "step")
    return nullcontext()


register_sampler(predict, speculative_sample)  # the calibration's measurements call the sampler (dry runs)
