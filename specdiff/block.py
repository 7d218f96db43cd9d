"""Block verification (Sun et al. 2024; for diffusions, Soen, Husain, De Bortoli & Doucet 2026):
the window of a speculative round is accepted or cut jointly, not step by step.

A round drafts ``y_1..y_L`` (``y_{i+1} ~ J_{i+1}(. | y_i)``; the target's step law is
``K_{i+1}(. | y_i)``). Weights ``p_0 = 1``, ``p_i = min(1, p_{i-1} K_i(y_i) / J_i(y_i))``; the scaled
residual at position ``i < L`` is ``r_i = (p_i K_{i+1} - J_{i+1})+`` (mass ``|r_i|``). The cut ``τ``
is found from the end: ``τ = L`` with probability ``h_L = p_L``; else, for ``i = L - 1, .., 0``, stop at
``i`` with probability ``h_i = |r_i| / (|r_i| + 1 - p_i)`` (``h_i = 1`` when ``p_i = 1``). The round
commits ``y_1..y_τ`` and, when ``τ < L``, one more step drawn from ``r_τ / |r_τ|``.

Why it is exact: the committed path is the target chain's path stopped at a randomized stopping
time (the chance to stop after ``τ`` steps depends on the first ``τ`` steps only), so the next round
continues the target chain — provided the next round's randomness is independent of this round's
decision. It is checked by enumeration (:func:`exact_block_law`) on tiny chains for every window.

Randomness: unlike the step rule, the cut looks at the drafts and uniforms of ALL the window's
positions, so the noise ``z``, the uniform and the residual stream of a step that a round drafted
but did not commit are biased by its decision (e.g. ``τ < L`` makes ``u`` of the window's last
step large). A later round that reaches such a step must not reuse them: :class:`BlockNoise` hands
out the keyed streams of (sample, step) the first time a round touches the step, and fresh streams
keyed by (sample, step, the round's start step) afterwards. Every round of a sample starts at a
different step, so no draw is ever used by two decisions; a sample's draws still depend on its own
past only (never on the batch or the other samples). At ``window=1`` every round commits its one
step, nothing is ever touched twice, and the plain sampler's draws are used: bit for bit the same.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections import defaultdict

import torch
from torch import Tensor

from .drafters import DraftMemory, as_drafter
from .kernels.block import block_kernel

VERIFY_RULES = ("step", "block")


def check_verify(verify: str) -> str:
    if verify not in VERIFY_RULES:
        raise ValueError(f"verify must be one of {VERIFY_RULES} (step-by-step or block verification); got {verify!r}")
    return verify


class BlockNoise:
    """The step-keyed streams of :class:`~specdiff.noise.NoiseStreams`, refreshed for the steps a
    sample's earlier rounds drafted without committing them (see the module docstring).

    ``begin(ids, n, L)`` opens a round of samples ``ids`` at steps ``n`` with windows ``L``; every
    draw of that round for (sample, step k) comes from the base streams when no earlier round of the
    sample reached k, else from a fresh stream: the noise and the uniforms of a round's stale steps
    from one stream per (sample, round start, purpose), drawn in step order (``noise`` and
    ``uniform`` are called once per round), a residual stream per (sample, k, round start)."""

    def __init__(self, base, batch: int):
        self.base = base
        self.reach = torch.zeros(batch, dtype=torch.long)  # the first step no round of the sample has touched
        self.touched = torch.zeros(batch, dtype=torch.long)  # the reach before the current round
        self.start = torch.zeros(batch, dtype=torch.long)  # the current round's first step

    def begin(self, ids: Tensor, n: Tensor, L: Tensor) -> None:
        self.touched[ids] = self.reach[ids]
        self.start[ids] = n
        self.reach[ids] = torch.maximum(self.reach[ids], n + L)

    def forget_before(self, n: Tensor) -> None:
        self.base.forget_before(n)

    def _stale(self, rows: Tensor, steps: Tensor) -> Tensor:
        rows, steps = rows.cpu(), steps.cpu()
        shape = torch.broadcast_shapes(rows.shape, steps.shape)
        return steps.expand(shape) < self.touched[rows].expand(shape)

    @staticmethod
    def _fresh_seeds(seeds: list[int], starts: list[int], purpose: bytes) -> list[int]:
        """Private stream seeds keyed by (base seed of (sample, step), round start, purpose)."""
        return [int.from_bytes(hashlib.sha256(purpose + struct.pack("<QQ", seed, start)).digest()[:8], "little") >> 1
                for seed, start in zip(seeds, starts)]

    def _fresh_draws(self, samples: Tensor, counts: list[int], purpose: bytes, draw) -> Tensor:
        """``counts[i]`` draws in a row from the stream of (sample ``samples[i]``, its round start,
        ``purpose``), concatenated: ``draw(count, generator)`` -> ``[count, ...]``."""
        starts = self.start[samples]
        seeds = self._fresh_seeds(self.base.residual_seeds(samples, starts).tolist(), starts.tolist(), purpose)
        return torch.cat([draw(n, torch.Generator().manual_seed(seed)) for n, seed in zip(counts, seeds)])

    def noise(self, rows: Tensor, steps: Tensor) -> Tensor:
        """The step noise ``[span, m, ...]`` of a round's grid (``rows [m]``, ``steps [span, m]``); a
        sample's stale steps get its round's fresh stream, drawn in step order."""
        out = self.base.noise(rows, steps)
        stale = self._stale(rows, steps)
        if bool(stale.any()):
            normal = self.base.kind == "normal"
            dtype = self.base.dtype if normal else torch.float64

            def draw(count, g):
                return (torch.randn if normal else torch.rand)((count, *self.base.shape), generator=g, dtype=dtype)

            column, position = stale.reshape(-1, stale.shape[-1]).T.nonzero().unbind(1)  # per sample, step order
            samples, counts = torch.unique_consecutive(column, return_counts=True)
            fresh = self._fresh_draws(rows.cpu()[samples], counts.tolist(), b"specdiff-block-noise", draw)
            out = out.clone()
            grid = out.view(-1, stale.shape[-1], *out.shape[stale.ndim:])
            grid[position.to(out.device), column.to(out.device)] = fresh.to(out.device, out.dtype)
        return out

    def uniform(self, rows: Tensor, steps: Tensor) -> Tensor:
        """Acceptance uniforms of the pairs (``rows[i]``, ``steps[i]``); a sample's stale pairs get its
        round's fresh stream, drawn in step order."""
        out = self.base.uniform(rows, steps)
        stale = self._stale(rows, steps)
        if bool(stale.any()):
            at = stale.nonzero().squeeze(1)
            sample, step = rows.cpu()[at], steps.cpu()[at]
            order = torch.argsort(step, stable=True)
            order = order[torch.argsort(sample[order], stable=True)]  # by sample, then step
            samples, counts = torch.unique_consecutive(sample[order], return_counts=True)
            fresh = self._fresh_draws(samples, counts.tolist(), b"specdiff-block-uniform",
                                      lambda count, g: torch.rand(count, generator=g, dtype=torch.float64))
            out = out.clone()
            out[at[order]] = fresh
        return out

    def residual_seeds(self, rows: Tensor, steps: Tensor) -> Tensor:
        """Seeds of the residual streams of (``rows``, ``steps``) (broadcast; int64, CPU): the base
        streams', or fresh ones keyed by (sample, step, round start) for the stale steps."""
        rows, steps = rows.cpu(), steps.cpu()
        out = self.base.residual_seeds(rows, steps)
        stale = self._stale(rows, steps)
        if bool(stale.any()):
            starts = self.start[rows].expand(stale.shape)[stale].tolist()
            out = out.clone()
            out[stale] = torch.tensor(self._fresh_seeds(out[stale].tolist(), starts, b"specdiff-block-residual"))
        return out

    def residual_generators(self, rows: Tensor, steps: Tensor) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in self.residual_seeds(rows, steps).tolist()]


def log_weights(log_ratio: Tensor) -> Tensor:
    """``log p_i``, ``i = 0..L``, from the log-ratios ``log K_i(y_i) - log J_i(y_i)`` [L, m] (float64)."""
    out = torch.zeros((log_ratio.shape[0] + 1, *log_ratio.shape[1:]), dtype=torch.float64)
    for i in range(log_ratio.shape[0]):
        out[i + 1] = (out[i] + log_ratio[i]).clamp(max=0)
    return out


def accept_block(kernel, noise, ids: Tensor, w, c, t):
    """The block rule on a round (the round's grid ``w``, carry ``c``, tested pairs ``t``).

    Returns the ``[position, sample]`` grid of accepted positions (those before the cut), the cut
    ``τ`` per sample (``n_acc``), and the committed step of each cut sample: ``(x, draws)`` for the
    samples with ``τ < L`` (in sample order), drawn from the scaled residual at ``τ``."""
    bk, m = block_kernel(kernel), len(ids)
    log_r = bk.log_ratio(t.law_D, t.law_T, t.y_next, t.z).to(torch.float64).cpu()
    log_r = torch.where((t.jr == 0) & c.fresh[t.ir], 0.0, log_r)  # a fresh first step has J = K
    if bool(torch.isnan(log_r).any()):
        raise FloatingPointError("block verification met a NaN draft/target ratio (a NaN prediction in the window); "
                                 "check the model and its dtype, or use verify='step'")
    grid = torch.zeros(w.span, m, dtype=torch.float64)
    grid[t.jr, t.ir] = log_r
    log_p = log_weights(grid)  # [span + 1, m]
    samples = torch.arange(m)
    # τ = L with probability p_L, decided by the acceptance uniform of the window's last step.
    u_last = torch.empty(m, dtype=torch.float64)
    last = t.rows.index(w.L - 1, samples).cpu()
    u_last[:] = t.u[last]
    tau = torch.where(torch.log(u_last) < log_p[w.L, samples], w.L, -1)
    # The residual streams of every (sample, position) at once (a lookup has no side effect on the draws).
    seeds = noise.residual_seeds(ids, c.n.cpu()[None] + torch.arange(w.span)[:, None])  # [span, m]
    fixes, draws = None, torch.zeros(m, dtype=torch.long)
    for i in range(w.span - 1, -1, -1):
        at = ((tau < 0) & (i < w.L)).nonzero().squeeze(1)
        if not at.numel():
            continue
        rows = t.rows.index(torch.full_like(at, i), at)
        law_D, law_T, y_next, _ = t.take(rows)
        gens = [torch.Generator().manual_seed(s) for s in seeds[i, at].tolist()]
        stop, x, used = bk.stop_or_go_on(law_D, law_T, log_p[i, at], gens, y_next)
        draws[at] += used
        tau[at[stop]] = i
        if bool(stop.any()):
            fixes = x.new_zeros((m, *x.shape[1:])) if fixes is None else fixes
            fixes[at[stop].to(x.device)] = x[stop.to(x.device)]
    if bool((tau < 0).any()):
        raise RuntimeError("block verification left a sample without a cut; this is a bug")
    cut = (tau < w.L).nonzero().squeeze(1)
    fixed = (fixes[cut.to(fixes.device)], draws[cut]) if cut.numel() else None
    accepted = ~w.drafted | (w.j[: w.span] < tau)
    return accepted, tau, fixed


# -- the exact law by enumeration -------------------------------------------------------------


@torch.no_grad()
def exact_block_law(chain, x_init: Tensor, *, window: int, drafter=None) -> Tensor:
    """Output pmf of the speculative sampler with ``verify="block"`` started at ONE state ``x_init``
    of a tiny time-free categorical chain (like :func:`~specdiff.discrete.exact_speculative_law`),
    by enumerating every drafted window of every round: the cut's law ``P(τ = i | y) = h_i Π_{k>i}
    (1 - h_k)`` and the scaled residual, with fresh randomness in every round (:class:`BlockNoise`)."""
    from .discrete.chain import _joint, _state_index, all_states

    if getattr(chain, "time_conditioned", True):
        raise ValueError("exact_block_law enumerates a time-free chain (time_conditioned=False)")
    drafter = as_drafter(drafter)
    num_states, num_steps = chain.scheduler.num_states, chain.num_steps
    states = all_states(num_states, x_init.shape[-1])
    cache: dict[int, Tensor] = {}

    def target(s: int) -> Tensor:
        if s not in cache:
            cache[s] = chain.predict(states[s : s + 1], torch.zeros(1, dtype=torch.long))[0]
        return cache[s]

    def joint(s: int, step: int, prediction: Tensor) -> Tensor:
        return _joint(chain.transition(states[s : s + 1], torch.tensor([step]), prediction[None])[0], states)

    rounds: dict[int, dict[tuple[int, int, bool], float]] = defaultdict(lambda: defaultdict(float))
    start = int(_state_index(x_init, num_states))
    rounds[0][(start, start, True)] = 1.0
    law = torch.zeros(states.shape[0], dtype=torch.float64)

    def land(step: int, x: int, ref: int, fresh: bool, mass: float) -> None:
        if step == num_steps:
            law[x] += mass
        else:
            rounds[step][(x, ref, fresh)] += mass

    for n in range(num_steps):
        for (x, ref, fresh), mass in rounds.pop(n, {}).items():
            frozen, horizon = target(ref), min(window, num_steps - n)

            def dfs(j: int, y: int, p: float, weight: float, path: list) -> None:
                """``path``: per position i < j, ``(y_i, p_i, h_i, residual_i)``; ``weight``: J(y_1..y_j)."""
                if j == horizon:
                    hs = [h for _, _, h, _ in path] + [p]
                    go_on = 1.0
                    for i in range(horizon, -1, -1):  # P(τ = i) = h_i Π_{k > i} (1 - h_k)
                        stop = weight * go_on * hs[i]
                        if stop > 0:
                            if i == horizon:
                                land(n + horizon, y, y, True, mass * stop)
                            else:
                                yi, _, _, residual = path[i]
                                if residual is None:
                                    raise ArithmeticError("the rule stopped where the scaled residual is empty")
                                for x2 in residual.nonzero().squeeze(1).tolist():
                                    land(n + i + 1, x2, yi, x2 == yi, mass * stop * float(residual[x2]))
                        go_on *= 1 - hs[i]
                    return
                step, exact = n + j, j == 0 and fresh
                memory = DraftMemory(frozen[None], torch.tensor([n - 1 + fresh]), frozen[None], torch.zeros(1))
                guess = frozen if exact else drafter.predict(states[y : y + 1], torch.tensor([step]), memory)[0]
                k_law, j_law = joint(y, step, target(y)), joint(y, step, guess)
                r = (p * k_law - j_law).clamp(min=0)
                d = float((j_law - p * k_law).clamp(min=0).sum())
                h = 1.0 if p >= 1 else float(r.sum()) / d
                residual = r / r.sum() if float(r.sum()) > 0 else None
                for y2 in (j_law > 0).nonzero().squeeze(1).tolist():
                    ratio = 1.0 if exact else float(k_law[y2] / j_law[y2])
                    dfs(j + 1, y2, min(1.0, p * ratio), weight * float(j_law[y2]), path + [(y, p, h, residual)])

            dfs(0, x, 1.0, 1.0, [])
    if not math.isclose(float(law.sum()), 1.0, rel_tol=1e-9):
        raise ArithmeticError(f"the enumerated law sums to {float(law.sum())}")
    return law
