"""Gaussian steps coupled by the Γ-maximal coupling: accept with min(1, q/p), else draw the exact residual.

The original speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023) applied to one
Gaussian step: the drafted state ``y ~ p = N(m_D, σ_D²)`` is kept with probability
``min(1, q(y)/p(y))``, ``q = N(m_T, σ_T²)``; a rejected step is redrawn from the residual
``(q - p)+ / TV(p, q)``. The output then has law ``min(p, q) + (q - p)+ = q`` exactly, and the
acceptance ``1 - TV`` is the largest any coupling achieves (for equal σ: ``2Φ(-‖Δ‖/2)``, as for
reflection). Unlike reflection it also couples steps whose σ differ (a network-predicted variance),
and σ may be per element (a diagonal covariance) as well as per row.

Notation (the README's table): ``Δ = (m_D - m_T)/σ`` elementwise, ``δ = ‖Δ‖``, ``e = Δ/δ``,
``z`` the draft's noise (``y = m_D + σ_D z``), ``h = δ/2``.

**Equal σ: the residual in one dimension.** In the whitened coordinates ``w = (y - m_T)/σ`` the
target is ``N(0, I)`` and the draft ``N(Δ, I)``. Split ``w = t e + w⊥``: both laws are
``N(·, 1)(t) ⊗ N(0, I⊥)(w⊥)`` with the same orthogonal factor, so
``(q - p)+ = (φ(t) - φ(t - δ))+ ⊗ N(0, I⊥)``. The one-dimensional part lives on ``t < h``; with
``s = h - t > 0`` its density is ``∝ φ(s - h) - φ(s + h)`` and its tail is
``S(s) = Φ(h - s) - Φ(-h - s)`` (``S(0) = TV``). One uniform from the step's residual stream gives
``s`` by inverting ``S(s)/S(0)`` (safeguarded Newton in float64, at most a fixed number of steps:
bounded time, no network call, no loop in d dimensions).

The orthogonal part is *reused from the draft*: ``w⊥ = z - <z, e> e``. This is exact: ``z⊥`` is
``N(0, I⊥)`` and independent of ``<z, e>``; the acceptance test depends on ``z`` only through
``log r = -<z, Δ> - ½δ²``, i.e. through ``<z, e>``, and on the independent ``u``; so given a
rejection, ``z⊥`` is still ``N(0, I⊥)``, independent of the fresh ``t``. The rejected output is
therefore ``(q - p)+/TV`` exactly, and the committed state has law ``q``. (A fresh ``w⊥`` from the
residual stream would be exact too; reusing ``z⊥`` costs one number instead of ``d``, and keeps the
output next to the draft, as the reflection does.)

**Unequal σ: the residual by rejection from the target.** Propose ``y' ~ q`` (from the step's
residual stream), keep it with probability ``(1 - p(y')/q(y'))+`` (float64 log densities), repeat.
A proposal is kept with probability ``TV``, so a rejected step costs ``1/TV`` proposals on average
and a step ``TV · 1/TV = 1`` Gaussian draw of the state's size on average, never a network call.
The count is random and unbounded; the loop stops with an error (never a biased sample) after
:data:`MAX_RESIDUAL_PROPOSALS`. Whatever ``TV`` is, a step reaches the cap with probability
``TV (1 - TV)^cap <= 1/(e·cap)`` (3.5e-7 at the default 2**20), and the worst such step draws
``cap`` proposals of the state's size before giving up.

Randomness: a drafted step uses its keyed ``z`` and ``u`` (as reflection does); the residual
draws come from the step's private stream (:meth:`specdiff.noise.NoiseStreams.residual_generators`),
used once, since a rejected step is committed. A row's draws never depend on the other rows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .gaussian import GaussianKernel, _as, draft_affine, transition

#: The rejection residual (unequal σ) gives up with an error after this many proposals of one
#: step; the chance that a step reaches it is at most ``1/(e · MAX_RESIDUAL_PROPOSALS)``.
MAX_RESIDUAL_PROPOSALS = 1 << 20

_SMALL_H = 1e-4  # below it, S(s)/S(0) from its series in h (the difference of Φ's cancels)
_REACH = 40.0  # S(h + 40) <= Φ(-40) ~ e^-804: far below any float64 uniform
_ITERATIONS = 100  # Newton/bisection steps at most (measured: at most 22, about 5 on average)


def _log_s(s: Tensor, h: Tensor, slope: bool = False):
    """``log S(s)`` up to a constant of ``h`` (the same for every ``s``): the unnormalised log tail
    of the 1-D residual (``s >= 0``, ``h > 0``, float64, broadcast); with ``slope=True`` also its
    derivative in ``s``.

    ``S(s) = Φ(h - s) - Φ(-h - s)``, ``S'(s) = -(φ(s - h) - φ(s + h))``. For ``h >= 1e-4`` from
    ``log Φ`` (``log_ndtr``, accurate in the far tail) and ``log(1 - exp(·))``; below, where the two
    Φ cancel, from ``S(s) = 2h φ(s) [1 + A(s)]``, ``A = (s²-1)h²/6 + (s⁴-6s²+3)h⁴/120 + O(s⁶h⁶)``
    (the next term is under 1e-18 for ``s <= h + 40``), without its factor ``2h φ(0)``."""
    big = h >= _SMALL_H
    out = torch.zeros_like(s + h)
    grad = torch.zeros_like(out) if slope else None
    if bool(big.any()):
        a, b = torch.special.log_ndtr(h - s), torch.special.log_ndtr(-h - s)
        log_tail = a + torch.log(-torch.expm1(b - a))
        out = torch.where(big, log_tail, out)
        if slope:  # -r/S with log r = log φ(s - h) + log(1 - e^{-2sh})
            log_r = -0.5 * (s - h).square() - 0.5 * math.log(2 * math.pi) + torch.log(-torch.expm1(-2 * s * h))
            grad = torch.where(big, -torch.exp(log_r - log_tail), grad)
    if not bool(big.all()):
        h2, s2 = h.square(), s.square()
        series = (s2 - 1) * h2 / 6 + (s2.square() - 6 * s2 + 3) * h2.square() / 120
        out = torch.where(big, out, -0.5 * s2 + torch.log1p(series))
        if slope:
            d_series = s * h2 / 3 + (4 * s2 - 12) * s * h2.square() / 120
            grad = torch.where(big, grad, -s + d_series / (1 + series))
    return (out, grad) if slope else out


def _log_tail(s: Tensor, h: Tensor) -> Tensor:
    """``log S(s) - log S(0)``: the log of the 1-D residual's normalised tail."""
    return _log_s(s, h) - _log_s(torch.zeros_like(h), h)


def residual_1d(h: Tensor, u: Tensor) -> Tensor:
    """Draws ``t`` of the normalised 1-D residual ``(φ(t) - φ(t - 2h))+ / TV`` (float64, one per
    entry of ``h > 0``), by the inverse of its tail at ``u ∈ (0, 1]``: ``t = h - s`` with
    ``S(s)/S(0) = u``. Newton's method on ``log S`` inside a bracket, first ``[0, h + 40]``, that
    every step shrinks (a bisection step where Newton's would not land strictly inside), to float64
    resolution; at most a fixed number of steps. Each row stops on its own, so its result never
    depends on the other rows."""
    h, u = _as(h, torch.float64), _as(u, torch.float64)
    log_u = torch.log(u)
    level = log_u + _log_s(torch.zeros_like(h), h)
    lo, hi = torch.zeros_like(h), h + _REACH
    # Start near the answer: the Rayleigh law (h -> 0), the truncated N(h, 1) (large h).
    guess = torch.where(h < 1, torch.sqrt(-2 * log_u), h - torch.special.ndtri(u))
    x = torch.minimum(torch.maximum(torch.nan_to_num(guess, nan=1.0), lo), hi)
    done = torch.zeros_like(h, dtype=torch.bool)
    eps = 4 * torch.finfo(torch.float64).eps
    for _ in range(_ITERATIONS):
        f, slope = _log_s(x, h, slope=True)
        f = f - level
        above = f > 0  # the tail at x is still heavier than u: the root lies right of x
        lo, hi = torch.where(~done & above, x, lo), torch.where(~done & ~above, x, hi)
        newton = x - f / slope
        scale = torch.clamp(x.abs(), min=1.0)  # t = h - s is wanted to float64 resolution at scale >= 1
        close = (f == 0) | (torch.isfinite(newton) & ((newton - x).abs() <= eps * scale))
        inside = torch.isfinite(newton) & (newton > lo) & (newton < hi)
        x = torch.where(done | close, x, torch.where(inside, newton, 0.5 * (lo + hi)))
        done = done | close | ((hi - lo) <= eps * scale)
        if bool(done.all()):
            break
    return h - x


def residual_cdf(t: Tensor, h: Tensor) -> Tensor:
    """The CDF of the normalised 1-D residual at ``t``: ``S(h - t) / S(0)`` below ``h`` (``= (Φ(t) -
    Φ(t - 2h)) / TV``), 1 above; what :func:`residual_1d` inverts, for tests."""
    t, h = _as(t, torch.float64), _as(h, torch.float64)
    return torch.exp(_log_tail((h - t).clamp(min=0), h))


def _std_like(std: Tensor, x: Tensor, rows: int) -> Tensor:
    """A transition's std as ``[rows, 1, ..., 1]`` (one per row) or ``[rows, *x.shape[1:]]`` (one per
    element), in float32 or wider."""
    std = torch.as_tensor(std, device=x.device)
    ones = [1] * (x.ndim - 1)
    if std.numel() == rows:
        std = std if std.dim() == x.ndim and std.shape[0] == rows else std.reshape(rows, *ones)
    elif std.numel() == 1:
        std = std.reshape(1, *ones).expand(rows, *ones)
    elif std.numel() == rows * math.prod(x.shape[1:]):
        std = std.reshape(rows, *x.shape[1:])
    else:
        raise ValueError(
            f"transition returned std of shape {tuple(std.shape)}; it must hold one value per row or one per "
            f"element of the state ({tuple(x.shape)})"
        )
    return _as(std, torch.promote_types(std.dtype, torch.float32))  # σ z never in half precision


def _flat(t: Tensor, shape: torch.Size) -> Tensor:
    """``t`` broadcast to ``shape``, as float64 ``[B, d]``; a per-row ``t`` as ``[B, 1]`` (no copy per element)."""
    t = _as(t, torch.float64)
    if t.dim() == len(shape) and math.prod(t.shape[1:]) == 1:
        return t.reshape(t.shape[0], 1).expand(shape[0], 1)
    return t.expand(shape).reshape(shape[0], -1)


class _Laws:
    """The float64 rows of a draft/target pair, and how each row is coupled (``s_d``/``s_t`` are
    ``[B, 1]`` for a per-row std, ``[B, d]`` per element: every sum over elements broadcasts first)."""

    def __init__(self, law_draft, law_target, z: Tensor, committed: bool):
        (m_d, s_d), (m_t, s_t) = law_draft, law_target
        shape = m_t.shape
        self.m_d, self.m_t, self.s_d, self.s_t = (_flat(t, shape) for t in (m_d, m_t, s_d, s_t))
        self.z = _flat(z.to(m_t.device), shape)
        for name, s in (("draft", self.s_d), ("target", self.s_t)):
            # A NaN law may sit at a draft that a rejection discards (the round verifies drafts past the
            # first rejection): its test fails (NaN log ratio), and only a row that is committed must
            # be finite. A negative std is a broken chain wherever it shows.
            bad = (s < 0) | (s.isnan() if committed else False)
            if bool(bad.any()):
                raise ValueError(f"the {name} kernel has a negative or NaN std; it must be >= 0 (0 = a deterministic "
                                 "step; a learned variance must be >= 0)")
        zero_d, zero_t = self.s_d == 0, self.s_t == 0
        self.det_d, self.det_t = zero_d.all(1), zero_t.all(1)
        if bool(((zero_d.any(1) & ~self.det_d) | (zero_t.any(1) & ~self.det_t)).any()):
            raise ValueError(
                "a std is 0 on some elements of a row and positive on others; a row's step must be either "
                "deterministic (std 0 everywhere) or have a positive std everywhere"
            )
        self.equal = (self.s_d == self.s_t).all(1)  # one σ shared: the 1-D residual; else by rejection
        self.random = ~self.det_d & ~self.det_t
        sigma = torch.where(self.random[:, None], self.s_t, 1.0)
        self.delta = (self.m_d - self.m_t) / sigma  # Δ (used where equal & random)

    def log_ratio(self) -> Tensor:
        """``log q(y) - log p(y)`` at the draft ``y = m_D + σ_D z`` per row (random rows; float64).
        Exactly 0 for equal laws."""
        eq = -(self.z * self.delta).sum(1) - 0.5 * self.delta.square().sum(1)
        if bool(self.equal.all()):
            return eq
        ratio = self.s_d / self.s_t
        w = (self.m_d - self.m_t) / self.s_t + ratio * self.z  # (y - m_T) / σ_T
        general = (-0.5 * w.square() + 0.5 * self.z.square() + torch.log(ratio)).sum(1)
        return torch.where(self.equal, eq, general)


class MaximalKernel:
    """A step ``y = m + σ z`` coupled by the Γ-maximal coupling; law = ``(mean, std)`` with ``std``
    one value per row or one per element, possibly different for draft and target (module docstring).

    ``law``/``draw`` are the reflection kernel's (the plain sampler draws the same bits whichever
    coupling speculates); ``accept`` and ``correct`` differ."""

    noise = "normal"

    @staticmethod
    def law(chain, x: Tensor, step: Tensor, prediction: Tensor, previous: Tensor) -> tuple[Tensor, Tensor]:
        mean, std = transition(chain, x, step, prediction, previous)
        return mean, _std_like(std, x, x.shape[0])

    @staticmethod
    def draft_window(chain, x: Tensor, steps: Tensor, predictions: Tensor, z: Tensor):
        """As :meth:`GaussianKernel.draft_window <specdiff.kernels.GaussianKernel.draft_window>`, with
        a std per row or per element."""
        if not getattr(chain, "affine", False) or getattr(chain, "uses_previous_prediction", False):
            return None
        L, batch = z.shape[0], z.shape[1]
        shift, scale, std = chain.transition_affine(steps.flatten(), predictions.flatten(0, 1))
        std = _std_like(std, z.flatten(0, 1), L * batch)
        return draft_affine(x, shift, scale, std.view(L, batch, *std.shape[1:]), z)

    draw = staticmethod(GaussianKernel.draw)  # the same step: y = m + σ z, in the states' dtype

    @staticmethod
    def accept(law_draft, law_target, y: Tensor, z: Tensor, u: Tensor) -> Tensor:
        """``log u <= min(0, log q(y) - log p(y))`` for the draft ``y = m_D + σ_D z`` (float64).
        Deterministic rows: equal means accept; a deterministic side facing a random one never does."""
        laws = _Laws(law_draft, law_target, z, committed=False)
        u = _as(u.to(laws.z.device), torch.float64)
        test = torch.log(u) <= laws.log_ratio().clamp(max=0.0)
        both_det = laws.det_d & laws.det_t
        same = (laws.m_d == laws.m_t).all(1)
        return torch.where(laws.random, test, both_det & same)

    @staticmethod
    def correct(law_draft, law_target, y: Tensor, z: Tensor, generators) -> tuple[Tensor, Tensor]:
        """A draw from the residual ``(q - p)+ / TV`` of each rejected row (module docstring), from the
        row's residual stream; returns ``(x, draws)``: the states and the residual draws per row
        (1 for the one-dimensional residual, the proposals used for the rejection residual)."""
        laws = _Laws(law_draft, law_target, z, committed=True)
        rows = laws.m_t.shape[0]
        streams = generators()
        if len(streams) != rows:
            raise ValueError(f"need one residual generator per row: {len(streams)} for {rows} rows")
        x = laws.m_t.clone()  # deterministic target: its mean
        draws = torch.zeros(rows, dtype=torch.long)
        one_d = (laws.random & laws.equal).nonzero().squeeze(1)
        if one_d.numel():
            x[one_d] = _one_dimensional(laws, one_d, [streams[r] for r in one_d.tolist()])
            draws[one_d.cpu()] = 1
        # Rejection from q: unequal σ, or a deterministic draft facing a random target (p is a point
        # mass: the residual is q itself, the first proposal is kept).
        by_rejection = ((laws.random & ~laws.equal) | (laws.det_d & ~laws.det_t)).nonzero().squeeze(1)
        if by_rejection.numel():
            picked, used = _by_rejection(laws, by_rejection, [streams[r] for r in by_rejection.tolist()])
            x[by_rejection] = picked
            draws[by_rejection.cpu()] = used
        return _as(x.view(y.shape), y.dtype), draws


def _one_dimensional(laws: _Laws, at: Tensor, streams: list[torch.Generator]) -> Tensor:
    """``m_T + σ (t e + z⊥)`` for rows ``at`` (equal σ), ``t`` from :func:`residual_1d`."""
    delta, z, sigma = laws.delta[at], laws.z[at], laws.s_t[at]
    scaled = delta / delta.abs().amax(1, keepdim=True).clamp_min(torch.finfo(delta.dtype).tiny)
    e = scaled / scaled.norm(dim=1, keepdim=True)
    # ‖Δ‖ > 0 on a rejected row (Δ = 0 gives log r = 0: always accepted).
    h = 0.5 * (delta.abs().amax(1) * scaled.norm(dim=1))
    u = torch.stack([1 - torch.rand((), generator=g, dtype=torch.float64) for g in streams]).to(h.device)  # (0, 1]
    t = residual_1d(h, u)
    z_perp = z - (z * e).sum(1, keepdim=True) * e
    # Whitened coordinates are relative to m_T with e pointing to m_D: t < h is the target's side.
    return laws.m_t[at] + sigma * (t[:, None] * e + z_perp)


def _by_rejection(laws: _Laws, at: Tensor, streams: list[torch.Generator], *, first_block: int = 4):
    """Exact draws from ``(q - p)+ / TV`` for rows ``at`` by rejection from ``q``; returns
    ``(states [R, d], proposals used [R])``. Each row draws blocks (4, 8, ... proposals: the sizes
    depend only on how many the row has drawn) of ``z' ~ N(0, I)`` and uniforms ``v`` from its own
    stream, and keeps the first ``y' = m_T + σ_T z'`` with ``v < 1 - p(y')/q(y')``: the first
    success of an i.i.d. sequence, whatever the blocks."""
    m_d, m_t, s_d, s_t = laws.m_d[at], laws.m_t[at], laws.s_d[at], laws.s_t[at]
    rows, d = m_t.shape
    det_d = laws.det_d[at]
    out = torch.empty_like(m_t)
    used = torch.zeros(rows, dtype=torch.long)
    max_block = max(1, min(1024, (1 << 22) // max(d, 1)))
    pending, block, drawn = torch.arange(rows), first_block, 0
    while pending.numel():
        if drawn >= MAX_RESIDUAL_PROPOSALS:
            raise RuntimeError(
                f"the Γ-maximal coupling's residual found no sample in {MAX_RESIDUAL_PROPOSALS} proposals (the draft "
                "and target kernels of a step are nearly equal, so (q - p)+ has little mass; this happens with "
                "probability below 1/(e * cap) per step). Raise specdiff.kernels.maximal.MAX_RESIDUAL_PROPOSALS, "
                "or use coupling='reflection' where draft and target share one std"
            )
        take = min(block, MAX_RESIDUAL_PROPOSALS - drawn)
        noise, v = [], []
        for r in pending.tolist():
            noise.append(torch.randn((take, d), generator=streams[r], dtype=torch.float64))
            v.append(torch.rand(take, generator=streams[r], dtype=torch.float64))
        dev = m_t.device
        zp, v = torch.stack(noise).to(dev), torch.stack(v).to(dev)  # [P, take, d], [P, take]
        p = pending.to(dev)
        proposals = m_t[p, None] + s_t[p, None] * zp
        sd = torch.where(det_d[p, None], 1.0, s_d[p])  # a point-mass draft has no density: every proposal kept
        w = (proposals - m_d[p, None]) / sd[:, None]
        log_p_over_q = (-0.5 * w.square() + 0.5 * zp.square() + torch.log(s_t[p] / sd)[:, None]).sum(-1)
        keep_prob = torch.where(det_d[p, None], 1.0, -torch.expm1(log_p_over_q.clamp(max=0.0)))
        keep = (v < keep_prob).cpu()
        hit = keep.any(1)
        first = keep.to(torch.int8).argmax(1)
        done = pending[hit]
        out[done.to(dev)] = proposals[hit.to(dev), first[hit].to(dev)]
        used[done] = drawn + first[hit] + 1
        pending, drawn, block = pending[~hit], drawn + take, min(2 * block, max_block)
    return out, used
