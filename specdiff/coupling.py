"""Maximal couplings: accept a drafted step, or correct it, so the result has the
target's law exactly.

Notation (SPEC §2, the paper's symbols on the right):

    mean_draft   m_D    mean of the draft kernel   N(m_D, std² I)
    mean_target  m_T    mean of the target kernel  N(m_T, std² I)
    noise        z      x_draft = m_D + std * z
    delta        Δ      (m_D - m_T) / std, summed over every dimension of a row
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rows(t: Tensor, batch: int) -> Tensor:
    """View a per-row quantity (scalar, ``[B]`` or ``[B, 1, ...]``) as ``[B]``."""
    if t.numel() == 1:
        return t.reshape(1).expand(batch)
    if t.numel() != batch:
        raise ValueError(
            f"std must hold one value per row (got shape {tuple(t.shape)} for {batch} rows): "
            "the reflection coupling needs an isotropic std shared by draft and target"
        )
    return t.reshape(batch)


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
    ``P(accepted) = 2 Φ(-‖Δ‖/2)``, the largest any coupling can achieve. Pass ``noise``
    (the ``z`` that made ``x_draft``) to skip recomputing it from ``x_draft``.

    Rows with ``std == 0`` are deterministic: the output is ``mean_target``, accepted
    only when the means are equal.
    """
    batch = x_draft.shape[0]
    work = torch.promote_types(x_draft.dtype, torch.float32)  # never fp16 arithmetic
    std = _rows(torch.as_tensor(std, device=x_draft.device), batch).to(work)
    u = _rows(torch.as_tensor(u, device=x_draft.device), batch).to(work)
    m_d, m_t = mean_draft.to(work).flatten(1), mean_target.to(work).flatten(1)

    stochastic = std > 0
    safe_std = torch.where(stochastic, std, torch.ones_like(std))[:, None]
    z = (x_draft.to(work).flatten(1) - m_d) / safe_std if noise is None else noise.to(work).flatten(1)
    delta = (m_d - m_t) / safe_std
    delta_sq = delta.square().sum(1)

    # log r = log N(x_D; m_T) - log N(x_D; m_D) = -<z, Δ> - ½‖Δ‖²; accept iff log u <= min(0, log r).
    log_ratio = -(z * delta).sum(1) - 0.5 * delta_sq
    accepted = torch.log(u) <= log_ratio.clamp(max=0.0)
    # ‖Δ‖ below float resolution: the two kernels coincide; accept without dividing by ‖Δ‖.
    tiny = delta_sq.sqrt() <= torch.finfo(work).eps ** 0.5
    accepted = torch.where(stochastic, accepted | tiny, (m_d == m_t).all(1))

    # Rejected: reflect z through the hyperplane orthogonal to e = Δ/‖Δ‖ (no new randomness).
    e = delta / delta_sq.sqrt().clamp_min(torch.finfo(work).tiny)[:, None]
    reflected = m_t + safe_std * (z - 2 * (e * z).sum(1, keepdim=True) * e)
    reflected = torch.where(stochastic[:, None], reflected, m_t)

    x = torch.where(accepted[:, None], x_draft.flatten(1), reflected.to(x_draft.dtype))
    return x.view_as(x_draft), accepted


def acceptance_probability(mean_draft: Tensor, mean_target: Tensor, std: Tensor | float) -> Tensor:
    """``2 Φ(-‖Δ‖/2)`` per row: the acceptance of the reflection coupling (1 - TV)."""
    batch = mean_draft.shape[0]
    std = _rows(torch.as_tensor(std, dtype=torch.float64, device=mean_draft.device), batch)
    delta = (mean_draft.double() - mean_target.double()).flatten(1).norm(dim=1) / std
    return torch.special.erfc(delta / (2 * 2**0.5))
