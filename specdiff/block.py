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

    def _generators(self, rows: Tensor, steps: Tensor, purpose: bytes) -> list[torch.Generator]:
        """Private streams keyed by (sample, step, round start), one per entry of ``rows``/``steps`` [R]."""
        seeds = [g.initial_seed() for g in self.base.residual_generators(rows, steps)]
        out = []
        for seed, start in zip(seeds, self.start[rows.cpu()].tolist()):
            digest = hashlib.sha256(purpose + struct.pack("<QQ", seed, start)).digest()
            out.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))
        return out

    def _per_round(self, rows: Tensor, stale: Tensor, purpose: bytes, draw) -> Tensor:
        """The stale entries of a ``[..., m]`` grid (sample ``rows[i]`` in column ``i``), drawn in order
        from one stream per (sample, round start): ``draw(count, generator)`` -> ``[count, ...]``."""
        cols = stale.reshape(-1, stale.shape[-1]) if stale.ndim > 1 else stale[None]
        want = cols.any(0).nonzero().squeeze(1)
        gens = self._generators(rows.cpu()[want], self.start[rows.cpu()[want]], purpose)
        parts = {i: draw(int(cols[:, i].sum()), g) for i, g in zip(want.tolist(), gens)}
        order = cols.nonzero()  # (position, column) pairs, row-major: each column's entries in position order
        taken = dict.fromkeys(parts, 0)
        out = []
        for i in order[:, 1].tolist():
            out.append(parts[i][taken[i]])
            taken[i] += 1
        return torch.stack(out)

    def noise(self, rows: Tensor, steps: Tensor) -> Tensor:
        """The step noise ``[span, m, ...]`` of a round's grid (``rows [m]``, ``steps [span, m]``)."""
        out = self.base.noise(rows, steps)
        stale = self._stale(rows, steps)
        if bool(stale.any()):
            normal = self.base.kind == "normal"
            dtype = self.base.dtype if normal else torch.float64

            def draw(count, g):
                return (torch.randn if normal else torch.rand)((count, *self.base.shape), generator=g, dtype=dtype)

            fresh = self._per_round(rows, stale, b"specdiff-block-noise", draw)
            out = out.clone()
            out[stale.to(out.device)] = fresh.to(out.device, out.dtype)
        return out

    def uniform(self, rows: Tensor, steps: Tensor) -> Tensor:
        """Acceptance uniforms of the pairs (``rows[i]``, ``steps[i]``), a sample's pairs in step order."""
        out = self.base.uniform(rows, steps)
        stale = self._stale(rows, steps)
        if bool(stale.any()):
            samples, inverse = rows.cpu().unique(return_inverse=True)
            grid = torch.zeros(len(rows), len(samples), dtype=torch.bool)
            grid[torch.arange(len(rows)), inverse] = stale
            order = torch.argsort(inverse * len(rows) + steps.cpu(), stable=True)  # per sample, in step order
            fresh = self._per_round(samples, grid[order], b"specdiff-block-uniform",
                                    lambda count, g: torch.rand(count, generator=g, dtype=torch.float64))
            out = out.clone()
            for (r, _), value in zip(grid[order].nonzero().tolist(), fresh.tolist()):  # _per_round's walk
                out[int(order[r])] = value
        return out

    def residual_generators(self, rows: Tensor, steps: Tensor) -> list[torch.Generator]:
        out = self.base.residual_generators(rows, steps)
        stale = self._stale(rows, steps)
        if bool(stale.any()):
            at = stale.nonzero().squeeze(1)
            fresh = self._generators(rows.cpu()[at], steps.cpu()[at], b"specdiff-block-residual")
            for i, g in zip(at.tolist(), fresh):
                out[i] = g
        return out


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
    fixes, draws = {}, torch.zeros(m, dtype=torch.long)
    for i in range(w.span - 1, -1, -1):
        at = ((tau < 0) & (i < w.L)).nonzero().squeeze(1)
        if not at.numel():
            continue
        rows = t.rows.index(torch.full_like(at, i), at)
        law_D, law_T, y_next, _ = t.take(rows)
        gens = noise.residual_generators(ids[at], c.n[at] + i)
        stop, x, used = bk.stop_or_go_on(law_D, law_T, log_p[i, at], gens, y_next)
        draws[at] += used
        tau[at[stop]] = i
        for r, xr in zip(at[stop].tolist(), x[stop.to(x.device)]):
            fixes[r] = xr
    if bool((tau < 0).any()):
        raise RuntimeError("block verification left a sample without a cut; this is a bug")
    cut = (tau < w.L).nonzero().squeeze(1)
    fixed = (torch.stack([fixes[r] for r in cut.tolist()]), draws[cut]) if cut.numel() else None
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
