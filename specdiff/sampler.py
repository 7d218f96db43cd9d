"""The plain ancestral sampler and the speculative one (SPEC §3).

Both consume the same step-keyed noise (:mod:`specdiff.noise`), so with ``window=1`` the
speculative sampler reproduces ``sample_baseline`` bit for bit, and for any window its
output has exactly the baseline's law.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from .chains import GaussianChain
from .coupling import reflection_coupling
from .drafters import Drafter, as_drafter
from .noise import GeneratorArg, NoiseStreams
from .stats import SpeculativeStats
from .window import WindowPolicy, resolve_window
from .drafters_research import Memory, draft_prediction  # prototype: the new driver passes memory itself


@dataclass
class SpeculativeOutput:
    sample: Tensor
    stats: SpeculativeStats


def _check_finite(prediction: Tensor, steps: Tensor, who: str) -> Tensor:
    bad = ~torch.isfinite(prediction.flatten(1)).all(1)
    if bad.any():
        at = sorted(set(steps[bad].tolist()))
        raise FloatingPointError(
            f"the {who} model returned NaN/inf at step(s) {at}; check the model and its dtype "
            "(fp16 overflow?) before sampling"
        )
    return prediction


def _per_row(std: Tensor | float, like: Tensor) -> Tensor:
    """``std`` as ``[B, 1, ..., 1]`` so it broadcasts over each row of ``like``."""
    std = torch.as_tensor(std, device=like.device)
    if std.numel() not in (1, like.shape[0]):
        raise ValueError(
            f"transition returned std of shape {tuple(std.shape)}; it must hold one value per row "
            "(an isotropic std fixed by the schedule)"
        )
    return std.reshape(-1, *[1] * (like.ndim - 1)).expand(like.shape[0], *[1] * (like.ndim - 1))


def _transition(chain, x: Tensor, step: Tensor, prediction: Tensor, previous: Tensor):
    if getattr(chain, "uses_previous_prediction", False):
        mean, std = chain.transition(x, step, prediction, previous=previous)
    else:
        mean, std = chain.transition(x, step, prediction)
    return mean, _per_row(std, x)


def predict(chain, x: Tensor, step: Tensor, sample: Tensor) -> Tensor:
    """The chain's network call on rows ``x`` at ``step``; a chain with ``uses_sample_index``
    also learns which sample each row belongs to (per-sample conditioning, e.g. prompts)."""
    if getattr(chain, "uses_sample_index", False):
        return chain.predict(x, step, sample=sample.to(x.device))
    return chain.predict(x, step)


def _progress(progress: bool | Callable, total: int):
    if callable(progress):
        return progress(total=total)
    if progress:
        from tqdm.auto import tqdm

        return tqdm(total=total, unit="step")
    return nullcontext()


def _check_window(window) -> None:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be a positive integer (1 = plain sampler); got {window!r}")


def _check_chain(chain, x_init: Tensor) -> None:
    if not isinstance(chain, GaussianChain):
        raise TypeError(f"{type(chain).__name__} is not a GaussianChain (needs num_steps, predict, transition)")
    if chain.num_steps < 1:
        raise ValueError(f"the chain has {chain.num_steps} steps; it needs at least one")
    if x_init.ndim < 1 or x_init.shape[0] < 1:
        raise ValueError(f"x_init must be a batch [B, ...] with B >= 1; got shape {tuple(x_init.shape)}")


@torch.no_grad()
def sample_baseline(
    chain: GaussianChain,
    x_init: Tensor,
    generator: GeneratorArg = None,
    *,
    progress: bool | Callable = False,
) -> Tensor:
    """The plain sequential sampler: one target call per step, ``x <- mean + std * z``."""
    _check_chain(chain, x_init)
    batch = x_init.shape[0]
    noise = NoiseStreams(generator, x_init)
    x, previous = x_init, None
    rows = torch.arange(batch, device="cpu")
    with _progress(progress, chain.num_steps) as bar:
        for k in range(chain.num_steps):
            step = torch.full((batch,), k, dtype=torch.long, device=x.device)
            prediction = _check_finite(predict(chain, x, step, rows), step, "target")
            mean, std = _transition(chain, x, step, prediction, prediction if previous is None else previous)
            z = noise.gaussian(rows, torch.full((batch,), k))
            x = (mean + std * z).to(x_init.dtype)
            previous = prediction
            noise.forget_before(torch.full((batch,), k + 1))
            if bar is not None:
                bar.update(1)
    return x


@torch.no_grad()
def speculative_sample(
    chain: GaussianChain,
    x_init: Tensor,
    *,
    window: int | str | WindowPolicy = 8,
    drafter: Drafter | Callable | str | None = None,
    generator: GeneratorArg = None,
    progress: bool | Callable = False,
    callback: Callable[[dict], None] | None = None,
) -> SpeculativeOutput:
    """Speculative sampling (De Bortoli et al. 2025), exact in law for any drafter.

    Each round, every live sample drafts up to ``window`` steps, ONE batched target call
    verifies all drafted states of all samples (per-row steps), and the reflection
    coupling accepts drafted steps left to right until the first rejection, which is
    replaced by its reflection. Samples advance at their own pace (ragged batching).
    ``callback`` receives ``{"round", "x", "step", "stats"}`` after every round.
    """
    _check_chain(chain, x_init)
    drafter = as_drafter(drafter)
    started = time.perf_counter()
    policy = resolve_window(window, chain, x_init)
    window = policy if isinstance(policy, int) else policy.max_window
    observe = None if isinstance(policy, int) else policy.observe
    num_steps, batch, device = chain.num_steps, x_init.shape[0], x_init.device
    stats = SpeculativeStats(num_steps=num_steps, batch_size=batch, window=window)
    noise = NoiseStreams(generator, x_init)

    # Per-sample state: committed x at step n; `pred` is the last target prediction made for
    # the sample (at (x, n) when `fresh`, else at the state the last reflected step left from);
    # `prev` is the target prediction of step n-1 (for multistep chains).
    x = x_init.clone()
    n = torch.zeros(batch, dtype=torch.long)
    pred = _check_finite(_timed(chain, x, n.to(device), torch.arange(batch), observe), n, "target")
    prev = pred.clone()
    fresh = torch.ones(batch, dtype=torch.bool)
    stats.target_calls, stats.target_rows = 1, batch
    tally = _Tally(batch, window)

    with _progress(progress, batch * num_steps) as bar:
        while (live := (n < num_steps).nonzero().squeeze(1)).numel():
            size = window
            if observe is not None:  # the policy sees the past only: stats so far, timings
                tally.write(stats)
                size = min(max(int(policy.choose(stats, live.numel())), 1), window)
            stats.rounds += 1
            committed, x_next, state = _round(
                chain, drafter, noise, stats, tally, size, x[live], n[live], pred[live], prev[live], fresh[live], live,
                observe,
            )
            x[live], n[live] = x_next, n[live] + committed
            pred[live], prev[live], fresh[live] = state
            noise.forget_before(n)
            if bar is not None:
                bar.update(int(committed.sum()))
            if callback is not None:
                callback({"round": stats.rounds, "x": x, "step": n.clone(), "stats": stats})
    tally.write(stats)
    stats.wall_clock = time.perf_counter() - started
    return SpeculativeOutput(sample=x, stats=stats)


class _Tally:
    """Per-sample and per-position counts kept as tensors during a run (see SpeculativeStats)."""

    def __init__(self, batch: int, window: int):
        self.sample_calls = torch.ones(batch, dtype=torch.long)  # the warm-up call served everyone
        self.sample_counts = torch.zeros(batch, 2, dtype=torch.long)  # proposed, accepted
        self.position_counts = torch.zeros(window, 2, dtype=torch.long)
        self.round_counts = torch.zeros(window + 1, dtype=torch.long)

    def write(self, stats: SpeculativeStats) -> None:
        stats.per_sample_target_calls = self.sample_calls.tolist()
        stats.per_sample_proposed, stats.per_sample_accepted = self.sample_counts.T.tolist()
        stats.proposed_by_position, stats.accepted_by_position = self.position_counts.T.tolist()
        stats.committed_per_round = self.round_counts.tolist()


def _timed(chain, x, step, sample, observe):
    if observe is None:
        return predict(chain, x, step, sample)
    started = time.perf_counter()
    out = predict(chain, x, step, sample)
    observe(x.shape[0], time.perf_counter() - started)
    return out


def _round(chain, drafter, noise, stats, tally, window, x, n, pred, prev, fresh, ids, observe=None):
    """One speculative round for the live samples ``ids`` (SPEC §3).

    Position ``j`` of sample ``i`` is its drafted step ``n_i + j``, used when ``j < L_i``.
    Grids are ``[position, sample, ...]``; unused positions are computed at a clamped step
    and masked out, which keeps every tensor rectangular.
    """
    m, device, num_steps = x.shape[0], x.device, chain.num_steps
    length = (num_steps - n).clamp(max=window)  # L_i: steps sample i may commit this round
    span = int(length.max())
    pos = torch.arange(span + 1)[:, None]
    steps = (n + pos).clamp(max=num_steps - 1)  # [span+1, m]
    drafted = pos[:span] < length  # [span, m]
    z = noise.gaussian(ids.repeat(span), steps[:span].flatten()).view(span, *x.shape)
    u = noise.uniform(ids.repeat(span), steps[:span].flatten()).view(span, m)

    # 1. Draft: y_{j+1} = m_D,j + std z_{n+j}, sequentially. A fresh sample's first step uses
    #    its exact target prediction (so it is accepted with certainty).
    states, mean_d, std_d, guesses = [x], [], [], []
    for j in range(span):
        ask = torch.arange(m) if j else (~fresh).nonzero().squeeze(1)
        guess = pred.clone() if ask.numel() < m else None
        if ask.numel():
            at = steps[j, ask]
            memory = Memory(prediction=pred[ask], step=(n - (~fresh).long())[ask].to(device), previous=prev[ask],
                            sample=ids[ask].to(device))
            drafted_pred = draft_prediction(drafter, states[j][ask], at.to(device), memory)
            drafted_pred = _check_finite(drafted_pred, at, "draft").to(pred.dtype)
            guess = drafted_pred if guess is None else guess.index_put_((ask.to(device),), drafted_pred)
            stats.draft_calls += int(drafter.network_calls)
        mean, std = _transition(chain, states[j], steps[j].to(device), guess, guesses[-1] if j else prev)
        states.append((mean + std * z[j]).to(x.dtype))
        mean_d.append(mean.to(x.dtype))
        std_d.append(std)
        guesses.append(guess)
    states = torch.stack(states)

    # 2. Verify: ONE batched target call on every drafted state whose prediction is unknown
    #    (y_0 unless fresh, and y_1..y_L except states at the final step).
    need = (pos <= length) & ((pos > 0) | ~fresh) & (n + pos < num_steps)
    target = torch.zeros_like(pred).expand(span + 1, *pred.shape).clone()
    target[0, fresh] = pred[fresh]
    if need.any():
        at = steps[need]
        target[need] = _check_finite(
            _timed(chain, states[need], at.to(device), ids.expand(span + 1, m)[need], observe), at, "target"
        )
        stats.target_calls += 1
        stats.target_rows += int(need.sum())
        tally.sample_calls[ids[need.any(0)]] += 1

    # 3. Accept or reflect every drafted step at once; only the prefix up to the first
    #    rejection is used (decisions are per step and keyed noise, so extra ones are harmless).
    j_rows, i_rows = drafted.nonzero(as_tuple=True)
    before = torch.where(_bcast(j_rows > 0, pred), target[(j_rows - 1).clamp(min=0), i_rows], prev[i_rows])
    mean_t, std_t = _transition(
        chain, states[j_rows, i_rows], steps[j_rows, i_rows].to(device), target[j_rows, i_rows], before
    )
    std_draft = torch.stack(std_d)[j_rows, i_rows]
    if not torch.allclose(std_draft, std_t, rtol=1e-6, atol=0):
        raise ValueError(
            "draft and target kernels have different std (learned variance?); the reflection "
            "coupling needs a std fixed by the schedule: use a fixed variance_type"
        )
    x_new, ok = reflection_coupling(
        states[j_rows + 1, i_rows], torch.stack(mean_d)[j_rows, i_rows], mean_t, std_t, u[j_rows, i_rows],
        noise=z[j_rows, i_rows],
    )
    accept = ~drafted  # unused positions count as accepted so they never stop a sample
    accept[j_rows, i_rows] = ok.cpu()
    reflected = states[1:].clone()
    reflected[j_rows, i_rows] = x_new

    n_acc = torch.where(accept.all(0), length, (~accept).int().argmax(0))  # accepted prefix
    whole = n_acc == length
    committed = torch.where(whole, length, n_acc + 1)
    cols, last = torch.arange(m), n_acc.clamp(max=span - 1)
    x_next = torch.where(_bcast(whole, x), states[length, cols], reflected[last, cols])
    new_fresh = whole & (n + committed < num_steps)
    new_pred = torch.where(_bcast(new_fresh, pred), target[length, cols], target[last, cols])
    new_prev = torch.where(_bcast(new_fresh, pred), target[(length - 1).clamp(min=0), cols], new_pred)

    # Accounting: decisions up to and including the first rejection, minus exact fresh steps.
    counted = drafted & (pos[:span] <= n_acc) & ~((pos[:span] == 0) & fresh)
    stats.proposed += int(counted.sum())
    stats.accepted += int((counted & accept).sum())
    tally.position_counts[:span] += torch.stack([counted.sum(1), (counted & accept).sum(1)], 1)
    tally.sample_counts[ids] += torch.stack([counted.sum(0), (counted & accept).sum(0)], 1)
    tally.round_counts[: window + 1] += torch.bincount(committed, minlength=window + 1)
    return committed, x_next, (new_pred, new_prev, new_fresh)


def _bcast(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *[1] * (like.ndim - 1)).to(like.device)
