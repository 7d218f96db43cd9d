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

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .drafters import DraftMemory


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
        if len(new.ahead) > len(self.ahead):  # a round of every sample may have left a shorter one
            self.ahead = torch.cat(
                [self.ahead, self.ahead.new_zeros((len(new.ahead) - len(self.ahead), *self.ahead.shape[1:]))]
            )
        self.ahead[: len(new.ahead), dev], self.ahead_len[ids] = new.ahead, new.ahead_len


def speculative_round(chain, kernel, drafter, noise, target, c: Carry, ids: Tensor, L: Tensor, tally) -> Carry:
    """Advance the samples ``ids`` (carry ``c``, windows ``L``) by one round; returns their new carry."""
    w = _Window.of(chain, c, L)
    z = noise.noise(ids, w.k[: w.span])  # [span, m, ...]: the noise z_{n+j} of each drafted step
    y, law_D = _drafts(chain, kernel, drafter, c, ids, w.k, z, w.span, tally)  # 1. draft
    pred_T, before, need, repeats = _verify(chain, target, c, ids, w, y, tally)  # 2. verify
    t = _Tested.of(chain, kernel, noise, ids, w, y, z, law_D, pred_T, before, sample_major=repeats)
    accepted, n_acc, broken = _accept(kernel, w, c, t, pred_T)  # 3. accept
    # Only the predictions at committed states (y_0..y_{n_acc}) are the plain sampler's: a non-finite
    # one stops the run; one at a discarded draft is never used (a NaN there fails its test, above).
    bad = broken & need & (w.j <= n_acc)
    if bool(bad.any()):
        _check_finite(pred_T[_to(bad, c.x.device)], w.k[bad], "target", c.x)
    new = _commit(chain, kernel, noise, c, ids, w, t, y, pred_T, before, n_acc, tally)  # 4. commit
    # The rows of positions up to n_acc + 1 depend on the randomness of committed steps only (later
    # drafts hold the noise of steps a later round redrafts): those are the rows a window policy sees.
    decided = w.j <= n_acc + 1
    tally.round(ids, w.tested & (w.j[: w.span] <= n_acc), accepted, new.n - c.n, (need & decided).sum(),
                (w.possible & decided).sum())
    return new


@dataclass
class _Window:
    """The grid of one round: positions ``j`` (a column), the step ``k`` of each ``y_j`` (clamped past
    the last step, so every tensor stays rectangular), the ``drafted`` positions (``j < L``), those
    ``tested`` (the first step of a fresh sample has ``J = K``: no test), and the positions whose
    target prediction the round may need (``possible``: y_0 unless fresh, .. y_L, before the end)."""

    N: int
    span: int
    L: Tensor
    j: Tensor
    k: Tensor
    drafted: Tensor
    tested: Tensor
    possible: Tensor

    @classmethod
    def of(cls, chain, c: Carry, L: Tensor) -> _Window:
        N, span = chain.num_steps, int(L.max())
        j = _positions(span + 1)
        drafted = j[:span] < L
        return cls(N, span, L, j, (c.n + j).clamp(max=N - 1), drafted, drafted & ~((j[:span] == 0) & c.fresh),
                   (j <= L) & (c.n + j < N) & ((j > 0) | ~c.fresh))


def _verify(chain, target, c: Carry, ids: Tensor, w: _Window, y: Tensor, tally):
    """ONE target call on y_0 (unless fresh) and y_1..y_L (before the final step; and, for a
    time-free network, not on a state equal to its predecessor: same prediction).

    Returns ``pred_T`` (``[span + 1, m, ...]``: the target's prediction at each ``y_j``), ``before``
    (``c.prev`` stacked under it: ``before[j]`` is the prediction one step before position ``j``,
    the ``previous=`` of multistep chains), ``need`` (the pairs the call evaluated) and whether some
    drafted state repeated its predecessor."""
    m, dev = len(ids), c.x.device
    need, same = w.possible, None
    if not getattr(chain, "time_conditioned", True):
        same = torch.zeros(w.span + 1, m, dtype=torch.bool)
        same[1:] = (y[1:] == y[:-1]).flatten(2).all(2).cpu()
        need = w.possible & ~same
        same = same if bool(same.any()) else None
    before = c.pred.new_zeros((w.span + 2, *c.pred.shape))
    before[0] = c.prev
    pred_T = before[1:]
    fresh_dev = _to(c.fresh, dev)
    pred_T[0, fresh_dev] = c.pred[fresh_dev]
    asked = need.flatten().nonzero().squeeze(1)  # the (position, sample) pairs the call evaluates, row-major
    if len(asked):
        tally.called(ids, need.any(0))
        at = _to(asked, dev)
        out = target(y.flatten(0, 1)[at], w.k.flatten()[asked], ids[asked % m], copy=False, check=False)
        pred_T.flatten(0, 1).index_copy_(0, at, out if out.dtype == pred_T.dtype else out.to(pred_T.dtype))
    if same is not None:  # an unchanged state takes the prediction of the last verified one (same[0] is False)
        pred_T.copy_(pred_T[_to(torch.where(same, 0, w.j).cummax(0).values, dev), _samples(m, dev)])
    return pred_T, before, need, same is not None


@dataclass
class _Tested:
    """The drafted ``(position, sample)`` pairs ``(jr, ir)`` as rows, with what the coupling needs
    of each: both laws, the drafted next state, its noise and acceptance uniform; ``rows`` maps a
    ``[position, sample, ...]`` grid to these rows. Sample-major when a time-free chain repeated
    states, so that a sample's repeated predictions are adjacent rows (a kernel may then evaluate
    each run once); else position-major."""

    jr: Tensor
    ir: Tensor
    rows: object
    law_D: tuple
    law_T: tuple
    y_next: Tensor
    z: Tensor
    u: Tensor

    @classmethod
    def of(cls, chain, kernel, noise, ids, w: _Window, y, z, law_D, pred_T, before, sample_major: bool) -> _Tested:
        m, dev = len(ids), y.device
        sample_major = sample_major and m > 1
        if sample_major:
            ir, jr = w.drafted.T.nonzero(as_tuple=True)
        else:
            jr, ir = w.drafted.nonzero(as_tuple=True)
        rows = _grid_rows(jr, ir, w.span, m, dev, views=not sample_major)
        kr = w.k[jr, ir]
        law_T = kernel.law(chain, rows(y), _to(kr, dev), rows(pred_T), rows(before))
        return cls(jr, ir, rows, tuple(rows(part) for part in law_D), law_T, rows(y, 1), rows(z),
                   noise.uniform(ids[ir], kr))

    def take(self, at: Tensor) -> tuple:
        """``(law_D, law_T, y_next, z)`` of the rows ``at``."""
        return (tuple(part[at] for part in self.law_D), tuple(part[at] for part in self.law_T),
                self.y_next[at], self.z[at])


def _accept(kernel, w: _Window, c: Carry, t: _Tested, pred_T: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The coupling test of every drafted step (only the prefix up to the first rejection is used);
    returns the ``[position, sample]`` grid of outcomes, each sample's accepted prefix length, and
    the grid of non-finite target predictions (on the host with the outcomes: one transfer a round)."""
    decisions = kernel.accept(t.law_D, t.law_T, t.y_next, t.z, t.u)
    broken = ~_usable(pred_T, c.x).flatten(2).all(2) if pred_T.is_floating_point() else None
    host = (decisions if broken is None else torch.cat([decisions, broken.flatten().to(decisions.device)])).cpu()
    accepted = ~w.drafted  # positions past L never stop a sample
    accepted[t.jr, t.ir] = host[: len(decisions)]
    accepted[0] |= c.fresh  # the first step of a fresh sample has J = K: accepted without a test
    n_acc = torch.where(accepted.all(0), w.L, (~accepted).int().argmax(0))
    broken = torch.zeros_like(w.possible) if broken is None else host[len(decisions) :].view(w.possible.shape)
    return accepted, n_acc, broken


def _commit(chain, kernel, noise, c: Carry, ids, w: _Window, t: _Tested, y, pred_T, before, n_acc, tally) -> Carry:
    """y_L where the whole window was accepted, else the first rejected step corrected to a target
    draw; and what the sample carries to its next round."""
    dev, m = c.x.device, len(ids)
    whole = n_acc == w.L
    committed = torch.where(whole, w.L, n_acc + 1)
    i = _samples(m, dev)
    rejected = (~whole).nonzero().squeeze(1)
    x_new = y[_to(w.L, dev), i]
    if rejected.numel():
        j_rej = n_acc[rejected]
        x_fix, draws = kernel.correct(*t.take(t.rows.index(j_rej, rejected)),
                                      lambda: noise.residual_generators(ids[rejected], c.n[rejected] + j_rej))
        x_new = x_new.index_put((_to(rejected, dev),), x_fix)
        tally.draws.append(draws)
    going = c.n + committed < w.N
    fresh = whole & going  # the round verified y_L: the next first step needs no draft
    if rejected.numel() and not getattr(chain, "time_conditioned", True):  # an unchanged state keeps its prediction
        fresh |= ~whole & going & (x_new == y[_to(n_acc, dev), i]).flatten(1).all(1).cpu()
    pred_new = pred_T[_to(n_acc, dev), i]  # at y_L if all accepted, else where the rejected step left from
    # The prediction one step before the new state: at y_{L-1} after a whole window, at the state the
    # rejected step left from otherwise (also when the correction stayed there, making the sample fresh).
    prev_new = before[_to(committed, dev), i]
    after = n_acc + 1 + w.j[: w.span]  # the positions after the rejection, as the next round's 0, 1, ...
    ahead = pred_T[_to(after.clamp(max=w.span), dev), i]
    ahead_len = torch.where(whole, 0, ((after <= w.L) & (c.n + after < w.N)).sum(0))
    return Carry(x_new, c.n + committed, pred_new, prev_new, fresh, ahead, ahead_len)


def _drafts(chain, kernel, drafter, c: Carry, ids: Tensor, k: Tensor, z: Tensor, span: int, tally):
    """``y_0..y_span`` stacked, and the draft laws of positions ``0..span-1`` stacked part by part.

    The loop is sequential (``y_{j+1}`` needs ``y_j``); what the positions share is built once,
    here: the steps on the device, the drafter's memory, which positions have a same-step
    prediction. At position 0 a fresh sample keeps its exact ``c.pred`` (J = K). A drafter that
    never looks at the drafted state (``uses_state = False``) is asked for every position first:
    with the window's predictions known up front, a kernel's ``draft_window`` may draft it at once
    (or decline with ``None``: then the loop below drafts it)."""
    dev, m = c.x.device, len(ids)
    steps, sample = _to(k, dev), _to(ids, dev)
    made_at = _to(c.n - (~c.fresh).long(), dev)
    reach = int(c.ahead_len.max())  # position j < reach: some row has a same-step prediction
    has = _to(_positions(reach) < c.ahead_len, dev) if reach else None
    nobody = _nobody(m, dev)
    asks = (~c.fresh).nonzero().squeeze(1)  # the rows that draft position 0
    steps_j = steps.unbind(0)

    def guess_at(jj: int, x: Tensor | None) -> Tensor:
        if jj == 0 and len(asks) < m:
            if not len(asks):
                return c.pred
            a = asks.to(dev)
            same_step = bool((c.ahead_len[asks] > 0).any())
            memory = DraftMemory(c.pred[a], made_at[a], c.prev[a], sample[a], c.ahead[0][a] if same_step else None,
                                 has[0][a] if same_step else nobody[a])
            guess = _draft(drafter, None if x is None else x[a], steps_j[0][a], memory, tally, c.x)
            # The memory's own prediction handed back (the frozen drafter): that is c.pred, row for row.
            return c.pred if guess is memory.prediction else c.pred.index_put((a,), guess)
        if jj < reach:
            memory = DraftMemory(c.pred, made_at, c.prev, sample, c.ahead[min(jj, len(c.ahead) - 1)], has[jj])
        else:
            memory = DraftMemory(c.pred, made_at, c.prev, sample, None, nobody)
        return _draft(drafter, x, steps_j[jj], memory, tally, c.x)

    guesses = None
    if not getattr(drafter, "uses_state", True):
        guesses = [guess_at(jj, None) for jj in range(span)]
        first = guesses[0]  # one tensor at every position (the frozen drafter): a view, no copies
        known = first.expand(span, *first.shape) if all(g is first for g in guesses) else torch.stack(guesses)
        window = getattr(kernel, "draft_window", None)
        done = window(chain, c.x, steps[:span], known, z) if window is not None else None
        if done is not None:
            return done
    y, laws, previous, z_j = [c.x], [], c.prev, z.unbind(0)
    for jj in range(span):
        guess = guesses[jj] if guesses is not None else guess_at(jj, y[jj])
        laws.append(kernel.law(chain, y[jj], steps_j[jj], guess, previous))
        y.append(kernel.draw(laws[-1], z_j[jj], c.x))
        previous = guess
    return torch.stack(y), tuple(torch.stack(part) for part in zip(*laws))


def _draft(drafter, x: Tensor | None, step: Tensor, memory: DraftMemory, tally, like: Tensor) -> Tensor:
    """The drafter's prediction for rows ``x`` at ``step`` (``x`` is None for a drafter that does
    not look at it), checked, in the carried dtype."""
    guess = drafter.predict(x, step, memory)
    if drafter.network_calls:
        tally.stats.draft_calls += 1
    if guess.shape != memory.prediction.shape:
        raise ValueError(
            f"{type(drafter).__name__}.predict returned shape {tuple(guess.shape)}; expected "
            f"{tuple(memory.prediction.shape)} (one prediction per drafted row, like the chain's predict)"
        )
    dtype = memory.prediction.dtype
    guess = guess if guess.dtype == dtype else guess.to(dtype)
    if guess is memory.prediction:
        return guess
    # A non-finite guess (a broken drafter, or the target's prediction at a draft that a rejection
    # discarded) is replaced by the frozen one: a drafter is any function of the past, so this is exact.
    usable = _usable(guess, like).flatten(1).all(1).view(-1, *[1] * (guess.ndim - 1))
    return torch.where(usable, guess, memory.prediction)


def _usable(prediction: Tensor, x: Tensor) -> Tensor:
    """Finite entries (continuous states); entries that are not NaN (logits: -inf rules a token out)."""
    return torch.isfinite(prediction) if x.is_floating_point() else ~torch.isnan(prediction)


def _check_finite(prediction: Tensor, steps: Tensor, who: str, x: Tensor) -> Tensor:
    """Refuse NaN predictions (and infinite ones for continuous states; logits may be -inf)."""
    if prediction.is_floating_point():
        if x.is_floating_point():
            # One reduction settles the usual case: a sum is finite only if every term is (float64
            # never overflows on finite float32/16 terms; where it does, or on MPS's float32, the
            # exact check below runs).
            wide = torch.float32 if prediction.device.type == "mps" else torch.float64
            if math.isfinite(prediction.sum(dtype=wide)):
                return prediction
        elif not bool(torch.isnan(prediction).any()):  # logits may be -inf, never NaN
            return prediction
        flat = prediction.flatten(1)
        bad = (~torch.isfinite(flat) if x.is_floating_point() else torch.isnan(flat)).any(1)
        if bad.any():
            at = sorted(set(steps[bad.cpu()].tolist()))
            raise FloatingPointError(
                f"the {who} model returned NaN/inf at step(s) {at}; check the model and its dtype "
                "(fp16 overflow?) before sampling"
            )
    return prediction


def _grid_rows(jr: Tensor, ir: Tensor, span: int, m: int, dev, views: bool = True):
    """``rows(t, shift)``: ``t[jr + shift, ir]`` for a ``[position, sample, ...]`` grid ``t``, and
    ``rows.index(j, i)``: the row of pair ``(j, i)``. When every pair is drafted (every sample
    has the window ``span``, and the pairs are position-major) the rows are the flattened grid:
    views, no copies."""
    if views and len(jr) == span * m:
        def rows(t: Tensor, shift: int = 0) -> Tensor:
            return t[shift : shift + span].flatten(0, 1)

        rows.index = lambda j, i: _to(j * m + i, dev)
    else:
        jd, idv = jr.to(dev), ir.to(dev)

        def rows(t: Tensor, shift: int = 0) -> Tensor:
            return t[jd + shift if shift else jd, idv]

        def index(j: Tensor, i: Tensor) -> Tensor:
            row = torch.full((span, m), -1, dtype=torch.long)
            row[jr, ir] = torch.arange(len(jr))
            return row[j, i].to(dev)

        rows.index = index
    return rows


@functools.lru_cache(maxsize=64)
def _positions(n: int) -> Tensor:
    """``arange(n)`` as a column (shared, never written to)."""
    return torch.arange(n)[:, None]


@functools.lru_cache(maxsize=64)
def _samples(m: int, device) -> Tensor:
    """``arange(m)`` on ``device`` (shared, never written to)."""
    return torch.arange(m, device=device)


@functools.lru_cache(maxsize=64)
def _nobody(m: int, device) -> Tensor:
    """``m`` False values on ``device``: no row has a same-step prediction (shared, never written to)."""
    return torch.zeros(m, dtype=torch.bool, device=device)


def _to(t: Tensor, device) -> Tensor:
    """``t`` on ``device``; no call when it is there (most of a round's index tensors, on a CPU run)."""
    return t if t.device == device else t.to(device)


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """A per-row mask shaped to broadcast over rows of ``like``."""
    return mask.view(-1, *[1] * (like.ndim - 1))
