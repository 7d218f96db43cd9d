"""What block verification needs of a kernel: the ratio ``K(y)/J(y)`` of a drafted step, and the
decision at one position of the window: stop there (with a draw from the scaled residual) or go on.

Block verification (Sun et al. 2024) keeps a weight ``p_i`` per drafted position and, at position
``i``, the scaled residual ``r_i = (p_i K - J)+`` of the next step's laws. The rule stops at ``i``
with probability ``h_i = |r_i| / (|r_i| + 1 - p_i)`` and then draws the step from ``r_i / |r_i|``
(see :mod:`specdiff.block`). Both are drawn here at once, by rejection, without ever computing
``|r_i|``: repeat { with probability ``1 - p_i`` go on; else propose ``x ~ K`` and stop with ``x``
with probability ``max(0, 1 - J(x) / (p_i K(x)))`` }. One round of the loop goes on with
probability ``1 - p_i`` and stops at ``x`` with probability ``p_i K(x) max(0, 1 - J(x)/(p_i K(x)))
= r_i(x)``, so the loop stops with probability ``|r_i| / (|r_i| + 1 - p_i) = h_i``, at ``x ~ r_i /
|r_i|``. At ``p_i = 1`` it is the step rule's residual loop. Its expected length is ``1 / D_i`` with
``D_i = |r_i| + 1 - p_i = |(J - p_i K)+|`` (>= ``1 - p_i``, >= TV(K, J) at ``p_i = 1``).

A Gaussian step (equal σ) needs no loop in ``d`` dimensions: ``J(x)/K(x)`` depends on ``x`` only
through the coordinate ``t`` of ``(x - m_T)/σ`` along ``e = Δ/‖Δ‖``, so the loop runs on scalars
(``t ~ N(0, 1)`` under K, ``J/K = exp(a t - a²/2)``, ``a = ‖Δ‖``) and the orthogonal part of the
draw is a fresh standard normal, shared by both laws.

Randomness: one private stream per row (the round's keyed residual streams); draws in blocks of
8, 16, .. 1024 iterations, the first decisive iteration in draw order wins (blocking only batches
the work, the law of the first success of an i.i.d. sequence does not depend on it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import categorical as cat
from . import gaussian as gau

#: The loop gives up (with an error, never a biased draw) after this many iterations: only when
#: ``D_i`` is (numerically) 0, a position the rule cannot reach.
MAX_ITERATIONS = 1 << 24


def _loop(rows: int, log_p: Tensor, generators: list, propose, *, first_block: int = 8, max_block: int = 1024):
    """The stop-or-go-on loop for ``rows`` rows with weights ``exp(log_p)`` [rows] (float64, CPU).

    ``propose(at, block, gens)`` draws ``block`` proposals for the rows ``at`` from their streams
    and returns ``(proposals, keep_probability [len(at), block])`` (keep = ``max(0, 1 - J/(pK))``).
    Returns ``(stop [rows] bool, proposal index per stopped row: (at, block slot, proposals), used)``."""
    stop = torch.zeros(rows, dtype=torch.bool)
    used = torch.zeros(rows, dtype=torch.long)
    go_on = -torch.expm1(log_p.clamp(max=0))  # 1 - p, exact near p = 1
    chosen: list[tuple[Tensor, Tensor, object]] = []
    pending = (log_p > -math.inf).nonzero().squeeze(1)  # p = 0: go on at once (no draw)
    block, drawn = first_block, 0
    while pending.numel():
        if drawn >= MAX_ITERATIONS:
            raise RuntimeError(
                f"block verification: the stop-or-go-on loop decided nothing in {MAX_ITERATIONS} iterations: "
                "the position has (numerically) no residual and weight 1, which the rule never reaches; are the "
                "draft and target laws normalised (and in float64 for categorical steps)?"
            )
        gens = [generators[r] for r in pending.tolist()]
        w = torch.stack([torch.rand(block, generator=g, dtype=torch.float64) for g in gens])
        proposals, keep = propose(pending, block, gens)
        v = torch.stack([torch.rand(block, generator=g, dtype=torch.float64) for g in gens])
        leave = w < go_on[pending, None]
        take = ~leave & (v < keep.cpu())
        decided = leave | take
        hit = decided.any(1)
        first = decided.to(torch.int8).argmax(1)
        rows_hit, first = pending[hit], first[hit]
        stopped = take[hit, first]
        stop[rows_hit] = stopped
        used[rows_hit] = drawn + first + 1
        if bool(stopped.any()):
            chosen.append((rows_hit[stopped], hit.nonzero().squeeze(1)[stopped], first[stopped], proposals))
        pending, drawn, block = pending[~hit], drawn + block, min(2 * block, max_block)
    return stop, chosen, used


class CategoricalBlock:
    """Categorical steps (a product over positions; laws in float64): ``law = (probs,)``."""

    @staticmethod
    def probs(law) -> Tensor:
        return law[0]

    @classmethod
    def log_ratio(cls, law_draft, law_target, y: Tensor, z: Tensor) -> Tensor:
        """``log K(y) - log J(y)`` per row (``-inf`` where K(y) = 0; NaN laws give NaN)."""
        return cat.log_ratio(cls.probs(law_target), cls.probs(law_draft), y)

    @classmethod
    def stop_or_go_on(cls, law_draft, law_target, log_p: Tensor, generators: list, like: Tensor):
        """The decision at one position per row: ``(stop [R], x [R, ...] (rows that stop), used [R])``."""
        k, j = cls.probs(law_target).to(torch.float64), cls.probs(law_draft).to(torch.float64)
        _refuse_unreachable(log_p, lambda: (k == j).flatten(1).all(1).cpu())
        shape, cdf, dev = k.shape[1:-1], k.cumsum(-1), k.device
        lp = log_p.to(dev)

        def propose(at: Tensor, block: int, gens: list):
            u = torch.stack([torch.rand((block, *shape), generator=g, dtype=torch.float64) for g in gens]).to(dev)
            a = at.to(dev)
            kk, jj = k[a].unsqueeze(1), j[a].unsqueeze(1)
            x = cat._inverse_cdf(cdf[a].unsqueeze(1), u, kk)  # [P, block, *shape]
            picked = x.unsqueeze(-1)
            log_k = kk.expand(*x.shape, -1).gather(-1, picked).squeeze(-1).log().flatten(2).sum(2)
            log_j = jj.expand(*x.shape, -1).gather(-1, picked).squeeze(-1).log().flatten(2).sum(2)
            # 1 - J/(pK); J = 0 < K gives 1; K > 0 always (x ~ K)
            keep = (-torch.exp(log_j - log_k - lp[a, None])).add(1).clamp(min=0)
            return x, torch.nan_to_num(keep, nan=0.0)

        stop, chosen, used = _loop(len(log_p), log_p.cpu(), generators, propose)
        x = torch.zeros((len(log_p), *shape), dtype=like.dtype, device=dev)
        for rows, at, slot, proposals in chosen:
            x[rows.to(dev)] = proposals[at.to(dev), slot.to(dev)].to(like.dtype)
        return stop, x, used


class MaskedBlock(CategoricalBlock):
    """The masked kernel: its law left unbuilt (``(x, stay, scores)``), built here."""

    @staticmethod
    def probs(law) -> Tensor:
        return cat.MaskedKernel.probs(law)


class GaussianBlock:
    """Gaussian steps ``N(m, σ²I)``, draft and target with the same σ: ``law = (mean, std)``."""

    @staticmethod
    def log_ratio(law_draft, law_target, y: Tensor, z: Tensor) -> Tensor:
        """``log K(y) - log J(y) = -<z, Δ> - ½‖Δ‖²`` per row; a deterministic row (σ = 0) gives 0
        for equal means and ``-inf`` otherwise."""
        (m_d, std_d), (m_t, std_t) = law_draft, law_target
        std = _shared_std(std_d, std_t)
        delta = gau._delta(m_d, m_t, std)
        log_r = gau.log_ratio(delta, z)
        point = torch.where((delta == 0).all(1), 0.0, -math.inf).to(log_r)
        return torch.where(std > 0, log_r, point)

    @staticmethod
    def stop_or_go_on(law_draft, law_target, log_p: Tensor, generators: list, like: Tensor):
        (m_d, std_d), (m_t, std_t) = law_draft, law_target
        std = _shared_std(std_d, std_t)
        delta = gau._as(gau._delta(m_d, m_t, std), torch.float64)
        a = delta.norm(dim=1)  # ‖Δ‖ (float64); the direction below is rescaled like the reflection's
        random = (std > 0).cpu()
        # σ = 0: K and J are point masses; the residual is p δ(m_T) when the means differ, else empty.
        a_cpu = a.cpu()
        _refuse_unreachable(log_p, lambda: a_cpu == 0)
        lp = log_p.cpu()

        def propose(at: Tensor, block: int, gens: list):
            t = torch.stack([torch.randn(block, generator=g, dtype=torch.float64) for g in gens])
            aa, pp = a_cpu[at, None], lp[at, None]
            keep = (-torch.exp(aa * t - 0.5 * aa * aa - pp)).add(1).clamp(min=0)  # 1 - J/(pK) along e
            keep = torch.where(random[at, None], keep, (aa > 0).double())  # σ = 0: stop iff the means differ
            return t, keep

        stop, chosen, used = _loop(len(log_p), lp, generators, propose)
        dev, rows = like.device, len(log_p)
        t = torch.zeros(rows, dtype=torch.float64)
        for r, at, slot, proposals in chosen:
            t[r] = proposals[at, slot]
        # The orthogonal part: a fresh N(0, I) from the row's stream, its component along e replaced by t.
        g = torch.zeros(rows, delta.shape[1], dtype=torch.float64)
        for r in stop.nonzero().squeeze(1).tolist():
            g[r] = torch.randn(delta.shape[1], generator=generators[r], dtype=torch.float64)
        scaled = delta / delta.abs().amax(1, keepdim=True).clamp_min(torch.finfo(delta.dtype).tiny)
        e = scaled / scaled.norm(dim=1, keepdim=True).clamp_min(torch.finfo(delta.dtype).tiny)
        g, t = g.to(dev), t.to(dev)
        zeta = g - (g * e).sum(1, keepdim=True) * e + t[:, None] * e
        sigma = std.to(torch.float64).to(dev)[:, None]
        x = m_t.to(torch.float64).flatten(1) + torch.where(sigma > 0, sigma * zeta, 0.0)
        return stop, x.view(like.shape).to(like.dtype), used


def _shared_std(std_d: Tensor, std_t: Tensor) -> Tensor:
    std_d, std_t = std_d.reshape(-1), std_t.reshape(-1)
    if not bool((std_t >= 0).all()):
        raise ValueError("the chain's transition returned a negative or NaN std; it must be >= 0")
    if not torch.equal(std_d, std_t):
        raise ValueError(
            "draft and target kernels have different std (learned variance?); block verification of Gaussian "
            "steps needs a std fixed by the schedule: use a fixed variance_type"
        )
    return std_t


def _refuse_unreachable(log_p: Tensor, equal_laws) -> None:
    """A position with weight 1 and J = K has no residual and cannot be reached by the rule (the
    next position's weight is 1 too, so the rule stops there or later): reaching it is a bug."""
    full = (log_p.cpu() >= 0)
    if bool(full.any()) and bool((full & equal_laws()).any()):
        raise RuntimeError("block verification reached a position with weight 1 and equal draft and target laws "
                           "(no residual): the cut rule is broken")


_BLOCKS = {gau.GaussianKernel: GaussianBlock, cat.CategoricalKernel: CategoricalBlock, cat.MaskedKernel: MaskedBlock}


def block_kernel(kernel):
    """The block-verification side of ``kernel`` (Gaussian, categorical or masked); a clear error otherwise."""
    for base in getattr(kernel, "__mro__", (type(kernel),)):
        if base in _BLOCKS:
            return _BLOCKS[base]
    if getattr(kernel, "__name__", None) == "MaximalKernel":
        raise ValueError("verify='block' has its own rule for a window of Gaussian steps with one std shared by draft "
                         "and target, and takes no step coupling; the Γ-maximal kernel (coupling='maximal', or a "
                         "learned variance) is step by step: pass verify='step' with it, or coupling='reflection' "
                         "(or none) with verify='block'")
    raise ValueError(f"verify='block' supports the Gaussian and categorical kernels; {kernel!r} has no block rule: "
                     "use verify='step'")
