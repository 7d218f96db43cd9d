"""Gaussian steps: draw ``N(m, σ²I)``, accept by the reflection maximal coupling, or reflect.

Notation (the README's table; the paper's symbols on the right):

    mean_draft   m_D    mean of the draft kernel   N(m_D, σ² I)
    mean_target  m_T    mean of the target kernel  N(m_T, σ² I)
    std          σ      fixed by the noise schedule, one value per row
    noise        z      the drafted state is y = m_D + σ z
    delta        Δ      (m_D - m_T) / σ, over every dimension of a row

The test and the reflection always run in float32 or wider on the very means that produced
the drafted states; the states themselves may be fp16/bf16 (they are rounded after the draw,
by the plain sampler exactly as here).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _per_row(t: Tensor | float, batch: int, device) -> Tensor:
    """A per-row quantity (scalar, ``[B]`` or ``[B, 1, ...]``) as ``[B]``."""
    t = torch.as_tensor(t, device=device)
    if t.numel() == 1:
        return t.reshape(1).expand(batch)
    if t.numel() != batch:
        raise ValueError(
            f"std must hold one value per row (got shape {tuple(t.shape)} for {batch} rows): "
            "the reflection coupling needs an isotropic std shared by draft and target"
        )
    return t.reshape(batch)


def _delta(mean_draft: Tensor, mean_target: Tensor, std: Tensor) -> Tensor:
    """``Δ = (m_D - m_T) / σ`` as ``[B, d]`` in float32 or wider (rows with σ = 0 get Δ = 0)."""
    work = torch.promote_types(torch.promote_types(mean_draft.dtype, mean_target.dtype), torch.float32)
    work = torch.promote_types(work, std.dtype) if std.is_floating_point() else work
    sigma = _as(torch.where(std > 0, std, 1.0), work)[:, None]
    return (_as(mean_draft, work).flatten(1) - _as(mean_target, work).flatten(1)) / sigma


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without the call when it is already (the round's hot path counts calls)."""
    return t if t.dtype == dtype else t.to(dtype)


def log_ratio(delta: Tensor, z: Tensor) -> Tensor:
    """``log r = log N(y; m_T, σ²) - log N(y; m_D, σ²) = -<z, Δ> - ½‖Δ‖²`` per row, in float64.

    Exactly 0 when Δ = 0, so equal means always accept (``log u <= 0``); any Δ != 0, however
    small, is put to the test: there is no "close enough" shortcut, which would keep the draft
    law for small Δ."""
    delta, z = _as(delta, torch.float64), _as(z.flatten(1), torch.float64)
    return -(z * delta).sum(1) - 0.5 * delta.square().sum(1)


def reflect(z: Tensor, delta: Tensor) -> Tensor:
    """``z - 2 <e, z> e`` with ``e = Δ / ‖Δ‖``: the noise of the target draw coupled to a rejected
    draft (no new randomness). ``Δ`` is rescaled by its largest entry first, so ``e`` is a unit
    vector even when ‖Δ‖² underflows."""
    flat = _as(z.flatten(1), delta.dtype)
    scaled = delta / delta.abs().amax(1, keepdim=True).clamp_min(torch.finfo(delta.dtype).tiny)
    e = scaled / scaled.norm(dim=1, keepdim=True).clamp_min(torch.finfo(delta.dtype).tiny)
    return (flat - 2 * (e * flat).sum(1, keepdim=True) * e).view(z.shape)


def reflection_coupling(
    x_draft: Tensor,
    mean_draft: Tensor,
    mean_target: Tensor,
    std: Tensor | float,
    u: Tensor,
    *,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reflection maximal coupling of ``N(mean_draft, std²I)`` and ``N(mean_target, std²I)``.

    Given the draft sample ``x_draft`` and an independent ``u ~ U(0, 1)`` per row, returns
    ``(x, accepted)`` with ``x ~ N(mean_target, std²I)`` exactly and
    ``P(accepted) = 2 Φ(-‖Δ‖/2)``, the largest any coupling achieves. Pass ``noise`` (the ``z``
    that made ``x_draft``) to skip recomputing it. Rows with ``std == 0`` are deterministic: the
    output is ``mean_target``, accepted only when the means are equal.
    """
    batch = x_draft.shape[0]
    std = _per_row(std, batch, x_draft.device)
    if not bool((std >= 0).all()):  # NaN fails too: a σ < 0 or NaN would pass as a deterministic step
        raise ValueError("std must be >= 0 per row (0 = a deterministic step); got a negative or NaN value")
    u = torch.as_tensor(u, device=x_draft.device)
    if u.numel() != batch or not bool(((u >= 0) & (u <= 1)).all()):
        raise ValueError(f"u must hold one independent uniform in [0, 1] per row ({batch} rows); got shape "
                         f"{tuple(u.shape)}: a shared u couples the rows' decisions")
    u = u.reshape(batch)
    delta = _delta(mean_draft, mean_target, std)
    if noise is None:
        sigma = torch.where(std > 0, std, torch.ones_like(std)).to(delta.dtype)[:, None]
        noise = (x_draft.to(delta.dtype).flatten(1) - mean_draft.to(delta.dtype).flatten(1)) / sigma
    accepted = _accept(delta, noise, std, u)
    x = torch.where(
        accepted.view(-1, *[1] * (x_draft.ndim - 1)), x_draft, _correct(mean_target, std, noise, delta, x_draft)
    )
    return x, accepted


def _accept(delta: Tensor, z: Tensor, std: Tensor, u: Tensor) -> Tensor:
    """``log u <= min(0, log r)``; a deterministic row (σ = 0) accepts only equal means."""
    test = torch.log(_as(u, torch.float64)) <= log_ratio(delta, z).clamp(max=0.0)
    return torch.where(std > 0, test, (delta == 0).all(1))


def _correct(mean_target: Tensor, std: Tensor, z: Tensor, delta: Tensor, like: Tensor) -> Tensor:
    """``m_T + σ reflect(z)``, rounded to the states' dtype (``m_T`` where σ = 0)."""
    shape = (-1, *[1] * (like.ndim - 1))
    sigma = _as(std, delta.dtype).view(shape)
    x = _as(mean_target, delta.dtype) + sigma * reflect(z.reshape(like.shape), delta)
    return _as(x, like.dtype)


def acceptance_probability(mean_draft: Tensor, mean_target: Tensor, std: Tensor | float) -> Tensor:
    """``2 Φ(-‖Δ‖/2)`` per row: the acceptance of the reflection coupling (1 - TV)."""
    batch = mean_draft.shape[0]
    std = _per_row(torch.as_tensor(std, dtype=torch.float64), batch, mean_draft.device)
    delta = (mean_draft.double() - mean_target.double()).flatten(1).norm(dim=1) / std
    return torch.special.erfc(delta / (2 * 2**0.5))


def draft_affine(x: Tensor, shift: Tensor, scale: Tensor, std: Tensor, z: Tensor):
    """``y_0 = x``, ``y_{j+1} = shift_j + scale_j y_j + std_j z_j`` (``shift``/``scale`` rows ``[L * B, ...]``,
    ``std``/``z`` ``[L, B, ...]``): the drafted window and its laws, as :meth:`GaussianKernel.draft_window`
    returns them."""
    L, batch = z.shape[0], z.shape[1]
    noise = (std * z).unbind(0)
    shift, scale = shift.view(L, batch, *shift.shape[1:]).unbind(0), scale.view(L, batch, *scale.shape[1:]).unbind(0)
    y, means = [x], []
    for j in range(L):
        means.append(shift[j] + scale[j] * y[j])
        y.append(_as(means[-1] + noise[j], x.dtype))
    return torch.stack(y), (torch.stack(means), std)


def transition(chain, x: Tensor, step: Tensor, prediction: Tensor, previous: Tensor):
    """The chain's ``(mean, std)``, with ``previous=`` for a chain that declares it reads it."""
    if getattr(chain, "uses_previous_prediction", False):
        return chain.transition(x, step, prediction, previous=previous)
    return chain.transition(x, step, prediction)


class GaussianKernel:
    """A step ``y = m + σ z`` of a :class:`~specdiff.GaussianChain`; law = ``(mean, std)``.

    ``law`` keeps the mean in the chain's working dtype (float32 or wider): the coupling must see
    the mean that produced the draft, not a copy rounded to the states' dtype."""

    noise = "normal"  # the caller's generator draws z ~ N(0, I) in the states' shape and dtype

    @staticmethod
    def law(chain, x: Tensor, step: Tensor, prediction: Tensor, previous: Tensor) -> tuple[Tensor, Tensor]:
        mean, std = transition(chain, x, step, prediction, previous)
        std = torch.as_tensor(std, device=x.device)
        batch, ones = x.shape[0], [1] * (x.ndim - 1)
        if std.numel() == batch:  # the usual case: one value per row, no expand needed
            std = std if std.dim() == x.ndim and std.shape[0] == batch else std.reshape(batch, *ones)
        elif std.numel() == 1:
            std = std.reshape(1, *ones).expand(batch, *ones)
        else:
            raise ValueError(
                f"transition returned std of shape {tuple(std.shape)}; the reflection coupling needs one value per "
                "row (an isotropic std fixed by the schedule): use coupling='maximal' for a per-element std"
            )
        wide = torch.promote_types(std.dtype, torch.float32)  # σ z never in half precision
        return mean, std if std.dtype == wide else std.to(wide)

    @staticmethod
    def draft_window(chain, x: Tensor, steps: Tensor, predictions: Tensor, z: Tensor):
        """Draft a window whose predictions are known up front, at once: ``y_0 = x``, ``y_{j+1} =
        draw(law_j, z_j)`` for ``steps``/``predictions``/``z`` of shape ``[L, B, ...]``. Returns
        ``(y [L + 1, B, ...], (mean, std) [L, B, ...])``, the very tensors ``law`` and ``draw`` would
        make position by position, or ``None`` unless the chain's mean is affine in the state
        (``chain.affine``: ``transition_affine``), when only ``mean_j = shift_j + scale_j * y_j`` is
        sequential and the rest is one batch for the window."""
        if not getattr(chain, "affine", False) or getattr(chain, "uses_previous_prediction", False):
            return None
        L, batch, ones = z.shape[0], z.shape[1], [1] * (x.ndim - 1)
        shift, scale, std = chain.transition_affine(steps.flatten(), predictions.flatten(0, 1))
        std = torch.as_tensor(std, device=x.device)
        if std.numel() != L * batch:
            raise ValueError(
                f"transition_affine returned std of shape {tuple(std.shape)}; it must hold one value per row"
            )
        std = _as(std.reshape(L, batch, *ones), torch.promote_types(std.dtype, torch.float32))
        return draft_affine(x, shift, scale, std, z)

    @staticmethod
    def draw(law: tuple[Tensor, Tensor], z: Tensor, like: Tensor) -> Tensor:
        mean, std = law
        y = mean + std * z
        return y if y.dtype == like.dtype else y.to(like.dtype)

    @staticmethod
    def accept(law_draft, law_target, y: Tensor, z: Tensor, u: Tensor) -> Tensor:
        """Whether each drafted step ``y ~ N(m_D, σ²)`` is kept (float64 test)."""
        (m_d, std_d), (m_t, std_t) = law_draft, law_target
        std_d, std_t = std_d.reshape(-1), std_t.reshape(-1)
        # One host read for both checks. NaN fails the first: a σ < 0 or NaN would pass as a
        # deterministic step. Same schedule, same function: σ is bit-identical, or not a shared σ.
        nonnegative, shared = torch.stack([(std_t >= 0).all(), (std_d == std_t).all()]).tolist()
        if not nonnegative:
            raise ValueError("the chain's transition returned a negative or NaN std; it must be >= 0 (0 = a "
                             "deterministic step)")
        if not shared:
            raise ValueError(
                "draft and target kernels have different std (learned variance?); the reflection "
                "coupling needs a std fixed by the schedule: use coupling='maximal' (exact for unequal std), "
                "or a fixed variance_type"
            )
        return _accept(
            _delta(m_d, m_t, std_t), z.flatten(1), std_t, u if u.device == std_t.device else u.to(std_t.device)
        )

    @staticmethod
    def correct(law_draft, law_target, y: Tensor, z: Tensor, generators) -> tuple[Tensor, Tensor]:
        """The target draw coupled to a rejected step: its reflection (no new randomness: the
        residual streams ``generators`` are not used)."""
        (m_d, _), (m_t, std_t) = law_draft, law_target
        std_t = std_t.reshape(-1)
        x = _correct(m_t, std_t, z, _delta(m_d, m_t, std_t), y)
        return x, torch.zeros(len(y), dtype=torch.long)
