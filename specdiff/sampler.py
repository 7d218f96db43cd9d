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


def _progress(progress: bool | Callable, total: int):
    if callable(progress):
        return progress(total=total)
    if progress:
        from tqdm.auto import tqdm

        return tqdm(total=total, unit="step")
    return nullcontext()


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
            prediction = _check_finite(chain.predict(x, step), step, "target")
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
    window: int = 8,
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
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be a positive integer (1 = plain sampler); got {window!r}")
    drafter = as_drafter(drafter)
    started = time.perf_counter()
    num_steps, batch, device = chain.num_steps, x_init.shape[0], x_init.device
    stats = SpeculativeStats(num_steps=num_steps, batch_size=batch, window=window)
    noise = NoiseStreams(generator, x_init)

    # Per-sample state: committed x at step n; `pred` is the last target prediction made for
    # the sample (at (x, n) when `fresh`, else at the state the last reflected step left from);
    # `prev` is the target prediction of step n-1 (for multistep chains).
    x = x_init.clone()
    n = torch.zeros(batch, dtype=torch.long)
    pred = _check_finite(chain.predict(x, n.to(device)), n, "target")
    prev = pred.clone()
    fresh = torch.ones(batch, dtype=torch.bool)
    stats.target_calls, stats.target_rows = 1, batch
    stats.per_sample_target_calls = [1] * batch

    with _progress(progress, batch * num_steps) as bar:
        while (live := (n < num_steps).nonzero().squeeze(1)).numel():
            stats.rounds += 1
            committed, x_next, state = _round(
                chain, drafter, noise, stats, window, x[live], n[live], pred[live], prev[live], fresh[live], live
            )
            x[live], n[live] = x_next, n[live] + committed
            pred[live], prev[live], fresh[live] = state
            noise.forget_before(n)
            if bar is not None:
                bar.update(int(committed.sum()))
            if callback is not None:
                callback({"round": stats.rounds, "x": x, "step": n.clone(), "stats": stats})
    stats.wall_clock = time.perf_counter() - started
    return SpeculativeOutput(sample=x, stats=stats)


def _round(chain, drafter, noise, stats, window, x, n, pred, prev, fresh, ids):
    """One speculative round for the live samples ``ids`` (SPEC §3)."""
    m, device, num_steps = x.shape[0], x.device, chain.num_steps
    length = (num_steps - n).clamp(max=window)  # L_i: steps this sample may commit
    span = int(length.max())
    states = x.new_empty((span + 1, *x.shape))  # y_0 .. y_L per sample
    mean_d, std_d, z_d = x.new_empty((span, *x.shape)), [None] * span, [None] * span
    draft_pred = pred.new_empty((span, *pred.shape))
    states[0] = x

    # 1. Draft: y_{j+1} = m_D,j + std z_{n+j}. A fresh sample's first step uses its exact
    #    target prediction (so it is accepted with certainty).
    for j in range(span):
        a = (j < length).nonzero().squeeze(1)
        step = n[a] + j
        guess = pred[a].clone()
        ask = a if j else a[~fresh[a]]
        if ask.numel():
            sel = torch.isin(a, ask)
            guess[sel] = _check_finite(
                drafter.predict(states[j, ask], (n[ask] + j).to(device), pred[ask]), n[ask] + j, "draft"
            ).to(pred.dtype)
            stats.draft_calls += int(drafter.network_calls)
        before = draft_pred[j - 1, a] if j else prev[a]
        mean, std = _transition(chain, states[j, a], step.to(device), guess, before)
        z = noise.gaussian(ids[a], step)
        states[j + 1, a] = (mean + std * z).to(x.dtype)
        mean_d[j, a], draft_pred[j, a] = mean.to(x.dtype), guess
        std_d[j], z_d[j] = (a, std), z

    # 2. Verify: ONE batched target call on every drafted state whose prediction is unknown
    #    (y_0 unless fresh, y_1..y_L, except states at the final step).
    jj, ii = torch.meshgrid(torch.arange(span + 1), torch.arange(m), indexing="ij")
    need = (jj <= length) & ((jj > 0) | ~fresh) & (n + jj < num_steps)
    target = pred.new_empty((span + 1, *pred.shape))
    target[0, fresh] = pred[fresh]
    if need.any():
        j_rows, i_rows = jj[need], ii[need]
        step = n[i_rows] + j_rows
        target[j_rows, i_rows] = _check_finite(chain.predict(states[j_rows, i_rows], step.to(device)), step, "target")
        stats.target_calls += 1
        stats.target_rows += int(need.sum())
        for b in ids[need.any(0)].tolist():
            stats.per_sample_target_calls[b] += 1

    # 3. Accept or reflect every drafted step; only the prefix up to the first rejection counts.
    drafted = jj[:span] < length
    j_rows, i_rows = jj[:span][drafted], ii[:span][drafted]
    step = n[i_rows] + j_rows
    before = torch.where(
        (j_rows > 0).view(-1, *[1] * (pred.ndim - 1)), target[(j_rows - 1).clamp(min=0), i_rows], prev[i_rows]
    )
    mean_t, std_t = _transition(chain, states[j_rows, i_rows], step.to(device), target[j_rows, i_rows], before)
    std_draft = torch.empty_like(std_t)
    z = x.new_empty((len(j_rows), *x.shape[1:]))
    for j in range(span):
        a, std = std_d[j]
        at = (j_rows == j).nonzero().squeeze(1)  # flat positions of (a, j), in the same order as a
        std_draft[at], z[at] = std, z_d[j]
    if not torch.allclose(std_draft, std_t, rtol=1e-6, atol=0):
        raise ValueError(
            "draft and target kernels have different std (learned variance?); the reflection "
            "coupling needs a std fixed by the schedule: use a fixed variance_type"
        )
    u = noise.uniform(ids[i_rows], step)
    x_new, ok = reflection_coupling(states[j_rows + 1, i_rows], mean_d[j_rows, i_rows], mean_t, std_t, u, noise=z)
    accept = torch.ones(span, m, dtype=torch.bool)
    accept[j_rows, i_rows] = ok.cpu()
    reflected = x.new_empty((span, *x.shape))
    reflected[j_rows, i_rows] = x_new

    n_acc = torch.where(accept.all(0), length, (~accept).int().argmax(0)).clamp(max=length)
    committed = (n_acc + 1).clamp(max=length)
    whole = n_acc == length
    cols = torch.arange(m)
    x_next = torch.where(
        whole.view(-1, *[1] * (x.ndim - 1)).to(device),
        states[length, cols],
        reflected[n_acc.clamp(max=span - 1), cols],
    )
    still = n + committed < num_steps
    new_fresh = whole & still
    new_pred = torch.where(_bcast(new_fresh, pred), target[length, cols], target[n_acc.clamp(max=span - 1), cols])
    new_prev = torch.where(_bcast(new_fresh, pred), target[(length - 1).clamp(min=0), cols], new_pred)

    # Accounting: decisions up to and including the first rejection, minus exact fresh steps.
    counted = (jj[:span] <= n_acc) & drafted & ~((jj[:span] == 0) & fresh)
    stats.proposed += int(counted.sum())
    stats.accepted += int((counted & accept).sum())
    for j in range(span):
        stats.proposed_by_position[j] += int(counted[j].sum())
        stats.accepted_by_position[j] += int((counted[j] & accept[j]).sum())
    for c in committed.tolist():
        stats.committed_per_round[c] += 1
    for b, p, a in zip(ids.tolist(), counted.sum(0).tolist(), (counted & accept).sum(0).tolist()):
        stats.per_sample_proposed[b] += p
        stats.per_sample_accepted[b] += a
    return committed, x_next, (new_pred, new_prev, new_fresh)


def _bcast(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *[1] * (like.ndim - 1)).to(like.device)
