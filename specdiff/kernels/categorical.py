"""Categorical steps: draw by inverse CDF, accept with min(1, K/J), correct from the exact residual.

A masked-diffusion step moves every position independently, so a whole step's law is a
product ``K(y) = Π_i K_i(y_i)``. Notation (the paper's symbols on the right):

    target_probs   K    the target's step kernel, ``[..., positions, states]`` per row
    draft_probs    J    the drafter's step kernel, same shape
    y                   a whole next state (one token per position)

Step acceptance is joint, not per position: the drafted step ``y ~ J`` is accepted with
probability ``min(1, K(y) / J(y))`` (Leviathan et al. 2023 / Chen et al. 2023, applied to a
whole step), the largest possible ``1 - TV(K, J)``. On rejection the step is redrawn from
the residual ``(K - J)+ / TV`` by rejection: propose ``y' ~ K``, accept with
``max(0, 1 - J(y') / K(y'))``, repeat. The target probabilities are already known, so the
loop costs no network call. Then

    P(y) = J(y) min(1, K/J) + TV · (K - J)+(y) / TV = min(J, K)(y) + (K - J)+(y) = K(y).

Everything is float64: products over many positions underflow early in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_categorical(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw: ``probs[..., S]`` (need not be exactly normalised) and one uniform
    ``u[...]`` in [0, 1) per distribution. Returns the first index whose CDF exceeds
    ``u · total``; a zero-probability index is never returned."""
    return _inverse_cdf(probs.cumsum(-1), u, probs)


def _inverse_cdf(cdf: Tensor, u: Tensor, probs: Tensor) -> Tensor:
    """:func:`sample_categorical` from the CDF of ``probs``; both may broadcast over ``u``'s shape."""
    value = u.to(cdf.dtype).unsqueeze(-1) * cdf[..., -1:]
    if cdf.shape[:-1] == u.shape:
        idx = torch.searchsorted(cdf, value, right=True).squeeze(-1)
    else:  # the number of CDF entries <= value: searchsorted's answer, without copying cdf to u's shape
        idx = (cdf <= value).sum(-1)
    # The first index whose CDF exceeds the value has positive mass, unless there is none: u · total
    # rounded up to total. Only then (rare: one check) fall back to the last index with positive mass.
    over = idx == probs.shape[-1]
    if bool(over.any()):
        last = torch.where(probs > 0, torch.arange(probs.shape[-1], device=probs.device), -1).amax(-1)
        idx = torch.where(over, last.expand_as(idx), idx)
    return idx


def softmax_rows(scores: Tensor) -> Tensor:
    """``softmax(scores)`` over the last axis, a run of equal consecutive rows computed once
    (softmax is row-wise: the same bits as alone). A round's verified laws repeat a row's
    prediction while its state is unchanged."""
    rows = scores.shape[0] if scores.ndim > 1 else 0
    if rows > 1:
        repeat = (scores[1:] == scores[:-1]).flatten(1).all(1)
        if repeat.any():
            fresh = torch.cat([repeat.new_ones(1), ~repeat])
            return torch.softmax(scores[fresh], -1)[torch.cumsum(fresh, 0) - 1]
    return torch.softmax(scores, -1)


def masked_transition(x: Tensor, stay: Tensor, mu: Tensor) -> Tensor:
    """The masked-diffusion step law of every position of ``x [B, ...]`` (MASK = ``V``, the last
    state): a token is copied; a MASK stays w.p. ``stay [B]`` and else becomes token v w.p.
    ``μ_v`` (``mu [B, ..., V]``). ``[B, ..., V + 1]``, float64.

    "Stay" depends on the schedule only, never on μ: draft and target kernels that share it give
    bit-identical MASK probabilities, so a step that unmasks nothing has a ratio of exactly 1."""
    stay = stay.view(-1, *[1] * x.ndim)
    masked_law = torch.cat([(1 - stay) * mu, stay.expand(*x.shape, 1)], dim=-1)
    copy_law = torch.nn.functional.one_hot(x.long(), mu.shape[-1] + 1).to(torch.float64)
    return torch.where((x == mu.shape[-1])[..., None], masked_law, copy_law)


#: The residual loop gives up (with an error, never a biased sample) after this many
#: proposals: it only happens when (K - J)+ has no mass left in float64.
MAX_RESIDUAL_PROPOSALS = 1 << 24


def log_prob(probs: Tensor, y: Tensor) -> Tensor:
    """``log Π_i probs_i(y_i)`` per row: ``probs [B, *shape, S]``, ``y [B, *shape]`` -> ``[B]``."""
    picked = probs.to(torch.float64).gather(-1, y.long().unsqueeze(-1)).squeeze(-1)
    return picked.log().flatten(1).sum(1)


def log_ratio(target_probs: Tensor, draft_probs: Tensor, y: Tensor) -> Tensor:
    """``log K(y) - log J(y)`` per row, as a sum of per-position log-ratios.

    Positions that are copied (probability 1 on both sides) and positions that stay MASK
    (probability fixed by the shared schedule, bit-identical on both sides) add exactly 0,
    so only newly unmasked positions contribute, and a step that unmasks nothing has a
    ratio of exactly 1.
    """
    at = y.long().unsqueeze(-1)
    picked_k = target_probs.to(torch.float64).gather(-1, at).squeeze(-1)
    picked_j = draft_probs.to(torch.float64).gather(-1, at).squeeze(-1)
    return _log_terms(picked_k, picked_j).flatten(1).sum(1)


def _log_terms(picked_k: Tensor, picked_j: Tensor) -> Tensor:
    """``log K_i(y_i) - log J_i(y_i)`` per position, exactly 0 where the two are equal."""
    return torch.where(picked_k == picked_j, 0.0, picked_k.log() - picked_j.log())


def step_acceptance_probability(target_probs: Tensor, draft_probs: Tensor, y: Tensor) -> Tensor:
    """``min(1, K(y) / J(y))`` per row: the chance that a drafted step ``y ~ J`` is kept."""
    return _step_acceptance(log_ratio(target_probs, draft_probs, y))


def _step_acceptance(log_r: Tensor) -> Tensor:
    return torch.nan_to_num(log_r.clamp(max=0).exp(), nan=0.0)  # K(y) = J(y) = 0 cannot be drafted; never accept it


def residual_acceptance_probability(target_probs: Tensor, draft_probs: Tensor, y: Tensor) -> Tensor:
    """``max(0, 1 - J(y) / K(y))`` per row: the chance that a proposal ``y ~ K`` is kept by
    the residual loop. ``K(y) · this`` is proportional to ``(K - J)+(y)``."""
    return _residual_acceptance(log_ratio(target_probs, draft_probs, y))


def _residual_acceptance(log_r: Tensor) -> Tensor:
    ratio = (-log_r).exp()  # J/K; +inf where K = 0
    return torch.nan_to_num((1 - ratio).clamp(min=0), nan=0.0)


def sample_residual(
    target_probs: Tensor,
    draft_probs: Tensor,
    generators: list[torch.Generator],
    *,
    first_block: int = 8,
    max_block: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Exact draws from ``(K - J)+ / TV``, one per row, by rejection.

    ``target_probs`` / ``draft_probs``: ``[R, *shape, S]``; ``generators``: one private stream
    per row. Each row draws blocks (8, 16, ... up to ``max_block``) of i.i.d. proposals
    ``y' ~ K`` from its own stream, each with its own acceptance uniform, and keeps the first
    accepted proposal in draw order. Blocking only batches the work: the first success of an
    i.i.d. sequence has the same law whatever the block sizes, and a row's result depends on
    its own stream only. The loop is never truncated (it raises instead, see
    :data:`MAX_RESIDUAL_PROPOSALS`). Returns ``(y [R, *shape], proposals used [R])``.
    """
    rows, shape = target_probs.shape[0], target_probs.shape[1:-1]
    if len(generators) != rows:
        raise ValueError(f"need one generator per row: {len(generators)} for {rows} rows")
    out = torch.empty((rows, *shape), dtype=torch.long, device=target_probs.device)
    used = torch.zeros(rows, dtype=torch.long)
    cdf = target_probs.cumsum(-1)  # every proposal of a row is drawn from the same K: its CDF once
    pending, block, drawn = torch.arange(rows), first_block, 0  # every pending row has drawn `drawn` proposals
    while pending.numel():
        if drawn >= MAX_RESIDUAL_PROPOSALS:
            raise RuntimeError(
                f"the rejection residual found no sample in {MAX_RESIDUAL_PROPOSALS} proposals: (K - J)+ has "
                "(numerically) no mass although the drafted step was rejected; are the draft and target "
                "kernels normalised and in float64?"
            )
        draws = [
            (
                torch.rand((block, *shape), generator=generators[r], dtype=torch.float64),
                torch.rand(block, generator=generators[r], dtype=torch.float64),
            )
            for r in pending.tolist()
        ]
        u = torch.stack([d[0] for d in draws]).to(target_probs.device)  # [P, block, *shape]
        v = torch.stack([d[1] for d in draws]).to(target_probs.device)  # [P, block]
        k, j, c = target_probs, draft_probs, cdf
        if len(pending) < rows:
            at = pending.to(target_probs.device)
            k, j, c = k[at], j[at], c[at]
        k, j = k.unsqueeze(1), j.unsqueeze(1)  # [P, 1, *shape, S]: one row, every proposal
        proposals = _inverse_cdf(c.unsqueeze(1), u, k)  # [P, block, *shape]
        picked = proposals.unsqueeze(-1)
        per_position = _log_terms(
            k.expand(*proposals.shape, -1).gather(-1, picked), j.expand(*proposals.shape, -1).gather(-1, picked)
        )
        keep = v.flatten() < _residual_acceptance(per_position.reshape(len(v) * block, -1).sum(1))
        keep = keep.view(-1, block).cpu()
        hit = keep.any(1)
        first = keep.to(torch.int8).argmax(1)
        done, first = pending[hit], first[hit]
        out[done.to(out.device)] = proposals[hit.to(proposals.device), first.to(proposals.device)]
        used[done] = drawn + first + 1
        pending, drawn, block = pending[~hit], drawn + block, min(2 * block, max_block)
    return out, used


def total_variation(target_probs: Tensor, draft_probs: Tensor, states: Tensor) -> Tensor:
    """``TV(K, J) = ½ Σ_y |K(y) - J(y)|`` of ONE row's product kernels, by enumerating
    ``states [M, *shape]`` (all next states; only for tiny spaces). ``1 - TV`` is the
    chance that the joint coupling accepts a drafted step."""
    m = states.shape[0]
    k = log_prob(target_probs.expand(m, *target_probs.shape), states).exp()
    j = log_prob(draft_probs.expand(m, *draft_probs.shape), states).exp()
    return 0.5 * (k - j).abs().sum()


def _one_prediction(predictions: Tensor) -> bool:
    """Whether ``predictions [L, ...]`` holds the same prediction at every position."""
    if len(predictions) == 1 or predictions.stride(0) == 0:
        return True
    return torch.equal(predictions[1:], predictions[:1].expand_as(predictions[1:]))


class CategoricalKernel:
    """A step of a :class:`~specdiff.CategoricalChain`: every position moves independently to
    the categorical law ``chain.transition`` returns; law = ``(probs,)``."""

    noise = "uniform"  # the caller's generator draws one float64 uniform per position

    @staticmethod
    def law(chain, x: Tensor, step: Tensor, prediction: Tensor, previous: Tensor) -> tuple[Tensor]:
        return (chain.transition(x, step, prediction),)

    @staticmethod
    def draw(law: tuple[Tensor], u: Tensor, like: Tensor) -> Tensor:
        return sample_categorical(law[0], u).to(like.dtype)

    @staticmethod
    def draft_window(chain, x: Tensor, steps: Tensor, predictions: Tensor, u: Tensor):
        """Draft a window whose predictions are known up front, at once, where every position has
        the same one (the frozen drafter) and the chain can (``chain.draft_frozen``): ``(y [L + 1,
        ...], law [L, ...])``, bit for bit the position-by-position ``law`` / ``draw``; else ``None``.
        ``predictions [L, B, ...]``; one tensor expanded over the window is recognised from its
        stride, without comparing values."""
        run = getattr(chain, "draft_frozen", None)
        if run is None or not _one_prediction(predictions):
            return None
        drafted = run(x, steps, predictions[0], u)
        return None if drafted is None else (drafted[0], (drafted[1],))

    @staticmethod
    def accept(law_draft, law_target, y: Tensor, noise: Tensor, u: Tensor) -> Tensor:
        """``u < min(1, K(y) / J(y))`` per row (``u`` independent of the draw of ``y``)."""
        p = step_acceptance_probability(law_target[0], law_draft[0], y)
        return u.to(p.device) < p

    @staticmethod
    def correct(law_draft, law_target, y: Tensor, noise: Tensor, generators) -> tuple[Tensor, Tensor]:
        """A draw from the residual ``(K - J)+`` for each rejected step, from its private streams
        (``generators()``); returns the draws and the proposals each needed."""
        x, draws = sample_residual(law_target[0], law_draft[0], generators())
        return x.to(y.dtype), draws


class MaskedKernel(CategoricalKernel):
    """The categorical kernel of masked diffusion (:class:`~specdiff.discrete.MaskedDiffusionChain`),
    with its law left unbuilt: ``(x, stay, scores)``, the state, each row's chance that a MASK
    stays (``[R]``) and the clean-token scores (``μ = softmax(scores)``, ``[R, ..., V]``).

    The coupling test needs ``K(y) / J(y)`` only at the positions the step unmasks (elsewhere both
    are 1, or both the shared ``stay``): it computes ``μ`` there alone. The whole law
    (:func:`masked_transition`, what ``chain.transition`` gives) is built only to draw a step or to
    correct a rejected one. Every number is the one the built law holds, bit for bit."""

    @staticmethod
    def law(chain, x: Tensor, step: Tensor, prediction: Tensor, previous: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return (
            x, chain.scheduler.stay_table(x.device)[step].expand(x.shape[0]), chain.scheduler.scores_for(x, prediction)
        )

    @staticmethod
    def probs(law) -> Tensor:
        """The built law: ``chain.transition``'s probabilities ``[R, ..., V + 1]``."""
        x, stay, scores = law
        return masked_transition(x, stay, softmax_rows(scores))

    @staticmethod
    def draw(law, u: Tensor, like: Tensor) -> Tensor:
        return sample_categorical(MaskedKernel.probs(law), u).to(like.dtype)

    @staticmethod
    def draft_window(chain, x: Tensor, steps: Tensor, predictions: Tensor, u: Tensor):
        """The window at once (:meth:`MaskedDiffusionScheduler.draft_states`) where every position
        has the same prediction; else ``None``."""
        if not _one_prediction(predictions):
            return None
        scores, stay = chain.scheduler.scores_for(x, predictions[0]), chain.scheduler.stay_table(x.device)[steps]
        states, _ = chain.scheduler.draft_states(x, stay, softmax_rows(scores), u)
        return states, (states[:-1], stay, scores.expand(len(stay), *scores.shape))

    @staticmethod
    def accept(law_draft, law_target, y: Tensor, noise: Tensor, u: Tensor) -> Tensor:
        """``u < min(1, K(y) / J(y))`` per row, from the positions ``y`` unmasks."""
        x, stay, target = law_target
        mask = target.shape[-1]
        at = ((x == mask) & (y != mask)).nonzero(as_tuple=True)  # (row, position...) of each unmasking
        token, free = y[at].unsqueeze(-1), (1 - stay)[at[0]]
        k = free * torch.softmax(target[at], -1).gather(-1, token).squeeze(-1)
        j = free * torch.softmax(law_draft[2][at], -1).gather(-1, token).squeeze(-1)
        per_position = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        per_position[at] = _log_terms(k, j)  # log_ratio's terms: 0 elsewhere
        p = _step_acceptance(per_position.flatten(1).sum(1))
        return u.to(p.device) < p

    @staticmethod
    def correct(law_draft, law_target, y: Tensor, noise: Tensor, generators) -> tuple[Tensor, Tensor]:
        x, draws = sample_residual(MaskedKernel.probs(law_target), MaskedKernel.probs(law_draft), generators())
        return x.to(y.dtype), draws
