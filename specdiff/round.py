"""One speculative round — the paper's algorithm, written once for every kernel.

Symbols (the README's notation table): ``n`` steps done, ``L`` window, ``y_j`` the drafted state
at step ``n + j`` (``y_0`` the committed one), ``z``/``u`` the step's keyed noise and acceptance
uniform, ``J``/``K`` the draft/target laws of a step (``N(m_D, σ²)`` / ``N(m_T, σ²)`` for a
Gaussian kernel). A round, for every live sample at once (each with its own ``n`` and ``L``):

    1. draft   y_{j+1} ~ J(. | y_j), j < L, from the drafter's prediction and z_{n+j}
    2. verify  ONE batched target call on every y_j whose target prediction is unknown
    3. accept  drafted steps in order while the coupling test passes (u_{n+j})
    4. commit  the accepted prefix, then the first rejected step corrected to a target draw

Grids are ``[position j, sample i, ...]``; positions past a sample's ``L`` are computed at a
clamped step and ignored, which keeps every tensor rectangular.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .drafters import DraftMemory, FrozenTargetDrafter


@dataclass
class Carry:
    """All a sample carries from one round to the next.

    * ``x``: its committed state, at step ``n``;
    * ``pred``: the target's last prediction for it — at ``(x, n)`` when ``fresh`` (the round
      verified ``y_L``: the next first step needs no draft), else at the state the last rejected
      step left from (step ``n - 1``);
    * ``prev``: the target's prediction at step ``n - 1``, the ``previous=`` of multistep chains;
    * ``ahead[i]``: the target's prediction at step ``n + i`` made by the last verify call on a
      draft discarded after a rejection (valid for ``i < ahead_len``): the same step, a nearby
      state. It depends on the noise of steps before ``n + i`` only, so a drafter may use it.

    ``n``, ``fresh``, ``ahead_len`` live on the CPU; the rest on the states' device. Every tensor
    here is the sampler's own (model outputs are copied in, never written to).
    """

    x: Tensor
    n: Tensor
    pred: Tensor
    prev: Tensor
    fresh: Tensor
    ahead: Tensor
    ahead_len: Tensor

    def take(self, ids: Tensor) -> Carry:
        dev = ids.to(self.x.device)
        return Carry(self.x[dev], self.n[ids], self.pred[dev], self.prev[dev], self.fresh[ids],
                     self.ahead[:, dev], self.ahead_len[ids])

    def put(self, ids: Tensor, new: Carry) -> None:
        dev = ids.to(self.x.device)
        self.x[dev], self.n[ids], self.pred[dev], self.prev[dev], self.fresh[ids] = (
            new.x, new.n, new.pred, new.prev, new.fresh
        )
        self.ahead[: len(new.ahead), dev], self.ahead_len[ids] = new.ahead, new.ahead_len


def speculative_round(chain, kernel, drafter, noise, target, c: Carry, ids: Tensor, L: Tensor, tally) -> Carry:
    """Advance the samples ``ids`` (carry ``c``, windows ``L``) by one round; returns their new carry."""
    N, m, dev = chain.num_steps, len(ids), c.x.device
    span = int(L.max())
    j = torch.arange(span + 1)[:, None]
    k = (c.n + j).clamp(max=N - 1)  # the step of y_j
    drafted = j[:span] < L
    exact = (j[:span] == 0) & c.fresh  # first step of a fresh sample: J = K, accepted without a test
    z = noise.noise(ids.repeat(span), k[:span].flatten()).view(span, m, *c.x.shape[1:])

    # 1. Draft y_{j+1} ~ J(. | y_j) with the drafter's prediction (the exact one where J = K). The frozen
    #    drafter's prediction is c.pred at every step: a kernel may draft all L steps at once.
    frozen = type(drafter) is FrozenTargetDrafter and hasattr(kernel, "draft_frozen")
    batched = kernel.draft_frozen(chain, c.x, k[:span].to(dev), c.pred, z) if frozen else None
    if batched is not None:
        y, law_D = batched
    else:
        y, law_D, guess = [c.x], [], c.pred
        for jj in range(span):
            before, guess = guess, _draft(drafter, y[jj], k[jj], jj, c, ids, tally, skip=exact[jj] if jj == 0 else None)
            law_D.append(kernel.law(chain, y[jj], k[jj].to(dev), guess, c.prev if jj == 0 else before))
            y.append(kernel.draw(law_D[-1], z[jj], c.x))
        y, law_D = torch.stack(y), tuple(torch.stack(part) for part in zip(*law_D))

    # 2. Verify: one target call on y_0 (unless fresh) and y_1..y_L (except at the final step, and,
    #    for a time-free network, except states equal to their predecessor: same prediction).
    same = torch.zeros(span + 1, m, dtype=torch.bool)
    if not getattr(chain, "time_conditioned", True):
        same[1:] = (y[1:] == y[:-1]).flatten(2).all(2).cpu()
    need = (j <= L) & (c.n + j < N) & ((j > 0) | ~c.fresh) & ~same
    pred_T = torch.zeros((span + 1, *c.pred.shape), dtype=c.pred.dtype, device=dev)
    pred_T[0, c.fresh.to(dev)] = c.pred[c.fresh.to(dev)]
    if need.any():
        pred_T[need.to(dev)] = target(y[need.to(dev)], k[need], ids.expand(span + 1, m)[need]).to(c.pred.dtype)
        tally.called(ids[need.any(0)])
    if same.any():  # an unchanged state takes the prediction of the last verified one (same[0] is False)
        pred_T = pred_T[torch.where(same, 0, j).cummax(0).values.to(dev), torch.arange(m, device=dev)]

    # 3. Accept: the coupling test of every drafted step (only the prefix up to the first rejection is used).
    ir, jr = drafted.T.nonzero(as_tuple=True)  # sample-major: a sample's repeated predictions are adjacent rows
    jd, idv = jr.to(dev), ir.to(dev)
    previous = torch.where(_rows(jd > 0, c.pred), pred_T[(jd - 1).clamp(min=0), idv], c.prev[idv])
    law_T = kernel.law(chain, y[jd, idv], k[jr, ir].to(dev), pred_T[jd, idv], previous)
    law_Dr = tuple(part[jd, idv] for part in law_D)
    u = noise.uniform(ids[ir], k[jr, ir])
    accept = ~drafted  # positions past L never stop a sample
    accept[jr, ir] = kernel.accept(law_Dr, law_T, y[jd + 1, idv], z[jd, idv], u).cpu() | exact[jr, ir]
    n_acc = torch.where(accept.all(0), L, (~accept).int().argmax(0))  # length of the accepted prefix
    whole = n_acc == L
    committed = torch.where(whole, L, n_acc + 1)

    # 4. Commit: y_L if all accepted, else the first rejected step corrected to a target draw.
    i = torch.arange(m).to(dev)
    rejected = (~whole).nonzero().squeeze(1)
    x_new = y[L.to(dev), i]
    if rejected.numel():
        row = torch.full((span, m), -1, dtype=torch.long)
        row[jr, ir] = torch.arange(len(jr))  # (position, sample) -> its row in the accept step
        at, j_rej = row[n_acc[rejected], rejected].to(dev), n_acc[rejected]
        x_fix, draws = kernel.correct(
            tuple(part[at] for part in law_Dr), tuple(part[at] for part in law_T), y[j_rej.to(dev) + 1, rejected.to(dev)],
            z[j_rej.to(dev), rejected.to(dev)], lambda: noise.residual_generators(ids[rejected], c.n[rejected] + j_rej),
        )
        x_new = x_new.index_put((rejected.to(dev),), x_fix)
        tally.residual_draws += int(draws.sum())
    fresh = whole & (c.n + committed < N)
    if rejected.numel() and not getattr(chain, "time_conditioned", True):  # an unchanged state keeps its prediction
        fresh |= ~whole & (c.n + committed < N) & (x_new == y[n_acc.to(dev), i]).flatten(1).all(1).cpu()
    pred_new = pred_T[torch.where(whole, L, n_acc).to(dev), i]
    prev_new = torch.where(_rows(fresh.to(dev), c.pred), pred_T[(L - 1).clamp(min=0).to(dev), i], pred_new)
    after = n_acc + 1 + j[:span]  # the positions after the rejection, as the next round's 0, 1, ...
    ahead = pred_T[after.clamp(max=span).to(dev), i]
    ahead_len = torch.where(whole, 0, ((after <= L) & (c.n + after < N)).sum(0))
    tally.round(ids, drafted & (j[:span] <= n_acc) & ~exact, accept, committed)
    return Carry(x_new, c.n + committed, pred_new, prev_new, fresh, ahead, ahead_len)


def _draft(drafter, x: Tensor, step: Tensor, j: int, c: Carry, ids: Tensor, tally, skip: Tensor | None) -> Tensor:
    """The drafter's prediction for rows ``x`` at ``step``; rows in ``skip`` keep the exact ``c.pred``."""
    ask = torch.arange(len(ids)) if skip is None else (~skip).nonzero().squeeze(1)
    if not ask.numel():
        return c.pred
    full, a = len(ask) == len(ids), ask.to(x.device)
    rows = (lambda t: t) if full else (lambda t: t[a])  # every row asks from the second position on: no copies
    has = j < c.ahead_len[ask]
    same_step = rows(c.ahead[min(j, len(c.ahead) - 1)]) if has.any() else None
    memory = DraftMemory(rows(c.pred), (c.n[ask] - (~c.fresh[ask]).long()).to(x.device), rows(c.prev),
                         ids[ask].to(x.device), same_step, has.to(x.device))
    guess = drafter.predict(rows(x), step[ask].to(x.device), memory)
    tally.stats.draft_calls += int(drafter.network_calls)
    if guess.shape != memory.prediction.shape:
        raise ValueError(
            f"{type(drafter).__name__}.predict returned shape {tuple(guess.shape)}; expected "
            f"{tuple(memory.prediction.shape)} (one prediction per drafted row, like the chain's predict)"
        )
    if not getattr(drafter, "reuses_target", False):  # target predictions were checked when the target made them
        _check_finite(guess, step[ask], "draft", x)
    return guess.to(c.pred.dtype) if full else c.pred.index_put((a,), guess.to(c.pred.dtype))


def _check_finite(prediction: Tensor, steps: Tensor, who: str, x: Tensor) -> Tensor:
    """Refuse NaN predictions (and infinite ones for continuous states; logits may be -inf)."""
    if prediction.is_floating_point():
        flat = prediction.flatten(1)
        bad = (~torch.isfinite(flat) if x.is_floating_point() else torch.isnan(flat)).any(1)
        if bad.any():
            at = sorted(set(steps[bad.cpu()].tolist()))
            raise FloatingPointError(
                f"the {who} model returned NaN/inf at step(s) {at}; check the model and its dtype "
                "(fp16 overflow?) before sampling"
            )
    return prediction


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """A per-row mask shaped to broadcast over rows of ``like``."""
    return mask.view(-1, *[1] * (like.ndim - 1))
