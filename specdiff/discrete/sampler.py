"""Plain, cached and speculative samplers for categorical chains (SPEC §3-§4).

All three consume the same step-keyed randomness (:class:`CategoricalNoise`), so from the
same generator ``window=1`` and the cached sampler reproduce the plain sampler token for
token, and any window and drafter give exactly the plain sampler's law.

Randomness of sample ``b`` at step ``k`` (drawn lazily, in step order, whatever the window):

* ``draft[b, k]``: one float64 uniform per position, from the caller's generator(s) exactly
  as ``MaskedDiffusionScheduler.step`` draws them. It samples step k by inverse CDF: the
  plain sampler's step, or the drafted step of the speculative sampler.
* ``accept[b, k]``: the uniform of the step's acceptance test, and ``seed[b, k]``: the seed
  of a private sub-stream for the rejection residual of step k. Both come from a companion
  generator seeded by a hash of the caller's generator state on entry, so they never shift
  the draft stream.

Why this stays exact: the accept/reject decision of step k uses ``accept[b, k]``, which is
independent of the drafted ``y ~ J`` (made from ``draft[b, k]``), as the speculative
sampling argument requires; a residual loop runs at most once per (sample, step), because
a rejected step is committed, and its sub-stream is used by nothing else, so its proposals
and acceptance uniforms are fresh i.i.d. draws however many the loop needs. Drafts
discarded after a rejection are redrafted from the same ``draft[b, k]``: the decision at
step k never looks at the randomness of steps after k.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import torch
from torch import Tensor

from ..chains import CategoricalChain
from ..drafters import Drafter, as_drafter
from ..noise import GeneratorArg, split_generators
from ..sampler import SpeculativeOutput, _progress, _timed, predict
from ..stats import SpeculativeStats
from ..window import WindowPolicy, resolve_window
from .coupling import sample_residual, step_acceptance_probability
from .scheduler import sample_categorical


def _companion(generator: torch.Generator) -> torch.Generator:
    state = generator.get_state().cpu().numpy().tobytes()
    seed = int.from_bytes(hashlib.sha256(b"specdiff-discrete-companion" + state).digest()[:8], "little")
    return torch.Generator().manual_seed(seed >> 1)


class CategoricalNoise:
    """Step-keyed draft uniforms, acceptance uniforms and residual sub-streams of a batch.

    A single ``torch.Generator`` draws step k's draft uniforms as one ``(B, *shape)``
    tensor (as a diffusers scheduler's ``step`` does); a list draws ``(1, *shape)`` per
    sample, so a sample does not depend on the batch it is in.
    """

    def __init__(self, generator: GeneratorArg, like: Tensor):
        batch = like.shape[0]
        per_sample = split_generators(generator, batch)
        if per_sample is None:
            if generator is None:  # seeded from torch's global RNG, so torch.manual_seed repeats runs
                generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
            self.groups = [(generator, list(range(batch)))]
        else:
            self.groups = [(g, [b]) for b, g in enumerate(per_sample)]
        self._group, self._slot = [0] * batch, [0] * batch  # sample -> (its group, its row there)
        for gi, (_, rows) in enumerate(self.groups):
            for slot, b in enumerate(rows):
                self._group[b], self._slot[b] = gi, slot
        self.companions = [_companion(g) for g, _ in self.groups]
        self.shape, self.device = tuple(like.shape[1:]), like.device
        self._tables: list[dict[int, tuple[Tensor, Tensor, Tensor]]] = [{} for _ in self.groups]
        self._drawn = [0] * len(self.groups)

    def _draw_until(self, gi: int, step: int) -> None:
        generator, rows = self.groups[gi]
        while self._drawn[gi] <= step:
            draft = torch.rand(
                (len(rows), *self.shape), generator=generator, device=generator.device, dtype=torch.float64
            )
            accept = torch.rand(len(rows), generator=self.companions[gi], dtype=torch.float64)
            seeds = torch.randint(0, 2**62, (len(rows),), generator=self.companions[gi])
            self._tables[gi][self._drawn[gi]] = (draft.to(self.device), accept, seeds)
            self._drawn[gi] += 1

    def _lookup(self, what: int, rows: Tensor, steps: Tensor) -> Tensor:
        rows_l, steps_l = rows.tolist(), steps.tolist()
        if len(self.groups) == 1:  # one generator: gather per distinct step
            out = None
            for k in sorted(set(steps_l)):
                self._draw_until(0, k)
                table = self._tables[0][k][what]
                at = [i for i, s in enumerate(steps_l) if s == k]
                picked = table[[self._slot[rows_l[i]] for i in at]]
                if out is None:
                    out = table.new_empty((len(rows_l), *table.shape[1:]))
                out[at] = picked
            return out
        picked = []  # one generator per sample: one (1, ...) table per step and sample
        for b, k in zip(rows_l, steps_l):
            gi = self._group[b]
            self._draw_until(gi, k)
            picked.append(self._tables[gi][k][what][0])
        return torch.stack(picked)

    def draft(self, rows: Tensor, steps: Tensor) -> Tensor:
        """Per-position uniforms ``[len(rows), *shape]`` of ``steps[i]`` for sample ``rows[i]``."""
        return self._lookup(0, rows, steps)

    def accept(self, rows: Tensor, steps: Tensor) -> Tensor:
        """Acceptance uniforms ``[len(rows)]`` (float64, CPU)."""
        return self._lookup(1, rows, steps)

    def residual_generators(self, rows: Tensor, steps: Tensor) -> list[torch.Generator]:
        """The private sub-streams of the rejection residuals of (``rows[i]``, ``steps[i]``)."""
        return [torch.Generator().manual_seed(int(s)) for s in self._lookup(2, rows, steps).tolist()]

    def forget_before(self, steps: Tensor) -> None:
        """Drop randomness no sample can need again (every row of a group is past it)."""
        steps_l = steps.tolist()
        for gi, (_, rows) in enumerate(self.groups):
            oldest = min(steps_l[b] for b in rows)
            for k in [k for k in self._tables[gi] if k < oldest]:
                del self._tables[gi][k]


def _check_chain(chain, x_init: Tensor) -> None:
    if not isinstance(chain, CategoricalChain):
        raise TypeError(f"{type(chain).__name__} is not a CategoricalChain (needs num_steps, predict, transition)")
    if chain.num_steps < 1:
        raise ValueError(f"the chain has {chain.num_steps} steps; it needs at least one")
    if x_init.ndim < 2 or x_init.shape[0] < 1:
        raise ValueError(f"x_init must be a batch of token tensors [B, ...]; got shape {tuple(x_init.shape)}")
    if x_init.is_floating_point():
        raise TypeError(f"x_init must hold integer tokens, got {x_init.dtype}")


def _time_free(chain) -> bool:
    """True when ``predict`` depends on the state only (MDLM's default ``time_conditioning=False``):
    then an unchanged state needs no new network call."""
    return not getattr(chain, "time_conditioned", True)


def _check_finite(prediction: Tensor, steps: Tensor, who: str) -> Tensor:
    if torch.isnan(prediction).any():
        at = sorted(set(steps[torch.isnan(prediction.flatten(1)).any(1).cpu()].tolist()))
        raise FloatingPointError(f"the {who} model returned NaN at step(s) {at}")
    return prediction


def _unchanged(a: Tensor, b: Tensor) -> Tensor:
    return (a == b).flatten(1).all(1)


@torch.no_grad()
def sample_baseline_discrete(
    chain: CategoricalChain,
    x_init: Tensor,
    generator: GeneratorArg = None,
    cached: bool = False,
    progress: bool | Callable = False,
    *,
    return_stats: bool = False,
) -> Tensor | SpeculativeOutput:
    """The ancestral sampler: one target call per step, ``x <- InverseCDF(transition, u_k)``.

    ``cached=True`` is MDLM's ``ddpm_cache`` / RADD's per-sequence cache: rows whose state did
    not change since their last call reuse that prediction (a time-free chain only), and a
    step where no row changed costs no call. Same tokens as ``cached=False`` from the same
    generator. ``return_stats=True`` returns ``SpeculativeOutput(sample, stats)`` with the
    call counts (``window`` 1, no drafts).
    """
    _check_chain(chain, x_init)
    if cached and not _time_free(chain):
        raise ValueError(
            "cached sampling reuses a prediction while the state is unchanged, which is exact only "
            "when the network ignores the time; this chain has time_conditioned=True"
        )
    started = time.perf_counter()
    batch, num_steps = x_init.shape[0], chain.num_steps
    stats = SpeculativeStats(num_steps=num_steps, batch_size=batch, window=1)
    noise = CategoricalNoise(generator, x_init)
    rows = torch.arange(batch)
    x, prediction = x_init.clone(), None
    changed = torch.ones(batch, dtype=torch.bool, device=x.device)
    with _progress(progress, num_steps) as bar:
        for k in range(num_steps):
            step = torch.full((batch,), k, dtype=torch.long, device=x.device)
            ask = changed if cached else torch.ones_like(changed)
            if ask.any():
                new = _check_finite(predict(chain, x[ask], step[ask], rows[ask.cpu()]), step[ask], "target")
                prediction = (
                    new if prediction is None or ask.all() else prediction.index_put((ask,), new.to(prediction))
                )
                stats.target_calls += 1
                stats.target_rows += int(ask.sum())
                for b in ask.nonzero().squeeze(1).tolist():
                    stats.per_sample_target_calls[b] += 1
            probs = chain.transition(x, step, prediction)
            x_next = sample_categorical(probs, noise.draft(rows, step.cpu())).to(x.dtype)
            changed = ~_unchanged(x_next, x)
            x = x_next
            noise.forget_before(torch.full((batch,), k + 1))
            if bar is not None:
                bar.update(1)
    stats.wall_clock = time.perf_counter() - started
    return SpeculativeOutput(sample=x, stats=stats) if return_stats else x


@torch.no_grad()
def speculative_sample_discrete(
    chain: CategoricalChain,
    x_init: Tensor,
    *,
    window: int | str | WindowPolicy = 8,
    drafter: Drafter | Callable | str | None = None,
    generator: GeneratorArg = None,
    progress: bool | Callable = False,
    callback: Callable[[dict], None] | None = None,
) -> SpeculativeOutput:
    """Speculative sampling of a categorical chain, exact in law for any drafter.

    Each round, every live sample drafts up to ``window`` steps ``y_{j+1} ~ J(. | y_j)``
    (the chain's ``transition`` applied to the drafter's prediction), ONE batched target
    call evaluates the drafted states, and drafted steps are accepted left to right with
    probability ``min(1, K(y)/J(y))`` until the first rejection, which is redrawn from the
    residual ``(K - J)+`` by rejection. Samples advance at their own pace (ragged batching).

    On a time-free chain a drafted state equal to its predecessor (nothing unmasked) reuses
    the predecessor's target prediction, and a round whose drafts unmask nothing costs no
    call at all: the cached sampler's saving is included (with the frozen drafter such a
    step has ratio exactly 1). ``callback`` receives ``{"round", "x", "step", "stats"}``.
    """
    _check_chain(chain, x_init)
    drafter = as_drafter(drafter)
    started = time.perf_counter()
    policy = resolve_window(window, chain, x_init)
    window = policy if isinstance(policy, int) else policy.max_window
    observe = None if isinstance(policy, int) else policy.observe
    num_steps, batch, device = chain.num_steps, x_init.shape[0], x_init.device
    stats = SpeculativeStats(num_steps=num_steps, batch_size=batch, window=window)
    noise = CategoricalNoise(generator, x_init)

    # Per sample: committed state x at step n; `pred` is the last target prediction made for
    # it, at (x, n) when `fresh`, else at the state the last rejected step left from.
    x = x_init.clone()
    n = torch.zeros(batch, dtype=torch.long)
    pred = _check_finite(_timed(chain, x, n.to(device), torch.arange(batch), observe), n, "target")
    fresh = torch.ones(batch, dtype=torch.bool)
    stats.target_calls, stats.target_rows = 1, batch
    stats.per_sample_target_calls = [1] * batch

    with _progress(progress, batch * num_steps) as bar:
        while (live := (n < num_steps).nonzero().squeeze(1)).numel():
            size = window if observe is None else min(max(int(policy.choose(stats, live.numel())), 1), window)
            stats.rounds += 1
            committed, x_next, new_pred, new_fresh = _round(
                chain, drafter, noise, stats, size, x[live], n[live], pred[live], fresh[live], live, observe
            )
            x[live.to(device)], n[live] = x_next, n[live] + committed
            pred[live.to(device)], fresh[live] = new_pred.to(pred.dtype), new_fresh
            noise.forget_before(n)
            if bar is not None:
                bar.update(int(committed.sum()))
            if callback is not None:
                callback({"round": stats.rounds, "x": x, "step": n.clone(), "stats": stats})
    stats.wall_clock = time.perf_counter() - started
    return SpeculativeOutput(sample=x, stats=stats)


def _round(chain, drafter, noise, stats, window, x, n, pred, fresh, ids, observe=None):
    """One speculative round for the live samples ``ids``."""
    m, device, num_steps = x.shape[0], x.device, chain.num_steps
    length = (num_steps - n).clamp(max=window)  # L_i: steps this sample may commit
    span = int(length.max())
    states = x.unsqueeze(0).repeat(span + 1, *[1] * x.ndim)  # y_0 .. y_L per sample
    draft_probs = None  # J(. | y_j) per (j, sample): [span, m, *shape, states]

    # 1. Draft y_{j+1} ~ J(. | y_j) with the step's own uniforms. A fresh sample's first step
    #    uses its exact target prediction (J = K: accepted with certainty).
    for j in range(span):
        a = (j < length).nonzero().squeeze(1)
        step = n[a] + j
        guess = pred[a].clone()
        ask = a if j else a[~fresh[a]]
        if ask.numel():
            sel = torch.isin(a, ask).to(device)
            guess[sel] = _check_finite(
                drafter.predict(states[j, ask.to(device)], (n[ask] + j).to(device), pred[ask.to(device)]),
                n[ask] + j,
                "draft",
            ).to(pred.dtype)
            stats.draft_calls += int(drafter.network_calls)
        probs = chain.transition(states[j, a.to(device)], step.to(device), guess)
        states[j + 1, a.to(device)] = sample_categorical(probs, noise.draft(ids[a], step)).to(x.dtype)
        if draft_probs is None:
            draft_probs = probs.new_empty((span, m, *probs.shape[1:]))
        draft_probs[j, a.to(device)] = probs

    # 2. Verify: ONE batched target call on every drafted state whose prediction is unknown:
    #    y_0 unless fresh, y_1..y_L except states at the final step, and, on a time-free chain,
    #    except states equal to their predecessor (their prediction is the predecessor's).
    jj, ii = torch.meshgrid(torch.arange(span + 1), torch.arange(m), indexing="ij")
    live_state = (jj <= length) & (n + jj < num_steps)
    same = torch.zeros(span + 1, m, dtype=torch.bool)
    if _time_free(chain):
        same[1:] = (states[1:] == states[:-1]).flatten(2).all(2).cpu()
    need = live_state & ((jj > 0) | ~fresh) & ~same
    target = pred.new_empty((span + 1, *pred.shape))
    target[0, fresh.to(device)] = pred[fresh.to(device)]
    if need.any():
        j_rows, i_rows = jj[need], ii[need]
        step = n[i_rows] + j_rows
        target[j_rows.to(device), i_rows.to(device)] = _check_finite(
            _timed(chain, states[j_rows.to(device), i_rows.to(device)], step.to(device), ids[i_rows], observe),
            step,
            "target",
        ).to(pred.dtype)
        stats.target_calls += 1
        stats.target_rows += int(need.sum())
        for b in ids[need.any(0)].tolist():
            stats.per_sample_target_calls[b] += 1
    for j in range(1, span + 1):
        copy = (same[j] & live_state[j]).to(device)
        target[j, copy] = target[j - 1, copy]

    # 3. Accept each drafted step w.p. min(1, K(y)/J(y)); only the prefix up to the first
    #    rejection counts. Fresh first steps have J = K exactly and are accepted outright.
    drafted = jj[:span] < length
    j_rows, i_rows = jj[:span][drafted], ii[:span][drafted]
    jd, id_ = j_rows.to(device), i_rows.to(device)
    step = n[i_rows] + j_rows
    target_probs = chain.transition(states[jd, id_], step.to(device), target[jd, id_])
    p = step_acceptance_probability(target_probs, draft_probs[jd, id_], states[jd + 1, id_]).cpu()
    accept = torch.ones(span, m, dtype=torch.bool)
    accept[j_rows, i_rows] = (noise.accept(ids[i_rows], step) < p) | ((j_rows == 0) & fresh[i_rows])

    n_acc = torch.where(accept.all(0), length, (~accept).int().argmax(0)).clamp(max=length)
    committed = (n_acc + 1).clamp(max=length)
    whole = n_acc == length
    cols = torch.arange(m)
    x_next = states[length.to(device), cols.to(device)].clone()
    new_pred = target[length.to(device), cols.to(device)].clone()

    # 4. Rejected step j: redraw it from (K - J)+, each with its step's private sub-stream.
    rejected = (~whole).nonzero().squeeze(1)
    if rejected.numel():
        j_rej = n_acc[rejected]
        flat = torch.full((span, m), -1, dtype=torch.long)
        flat[j_rows, i_rows] = torch.arange(len(j_rows))
        at = flat[j_rej, rejected].to(device)
        y, draws = sample_residual(
            target_probs[at],
            draft_probs[j_rej.to(device), rejected.to(device)],
            noise.residual_generators(ids[rejected], n[rejected] + j_rej),
        )
        x_next[rejected.to(device)] = y.to(x.dtype)
        new_pred[rejected.to(device)] = target[j_rej.to(device), rejected.to(device)]
        stats.residual_draws += int(draws.sum())
    still = n + committed < num_steps
    new_fresh = whole & still
    if _time_free(chain):  # a residual equal to the state it left from keeps its prediction
        rejected_from = states[n_acc.to(device), cols.to(device)]
        new_fresh |= ~whole & still & _unchanged(x_next, rejected_from).cpu()

    # Accounting: decisions up to and including the first rejection, minus exact fresh steps.
    counted = (jj[:span] <= n_acc) & drafted & ~((jj[:span] == 0) & fresh)
    stats.proposed += int(counted.sum())
    stats.accepted += int((counted & accept).sum())
    for j in range(span):
        stats.proposed_by_position[j] += int(counted[j].sum())
        stats.accepted_by_position[j] += int((counted[j] & accept[j]).sum())
    for c in committed.tolist():
        stats.committed_per_round[c] += 1
    for b, p, acc in zip(ids.tolist(), counted.sum(0).tolist(), (counted & accept).sum(0).tolist()):
        stats.per_sample_proposed[b] += p
        stats.per_sample_accepted[b] += acc
    return committed, x_next, new_pred, new_fresh
