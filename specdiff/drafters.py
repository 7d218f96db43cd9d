"""Drafters: where the cheap guesses come from.

A drafter returns the *prediction* used to build the draft mean of a drafted step; the
sampler then applies the chain's own ``transition`` to it at the drafted state and step.
Exactness never depends on the drafter, only the acceptance rate does. To add one,
subclass :class:`Drafter` (a few lines) and pass an instance as ``drafter=``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor


class Drafter:
    """Base class. ``network_calls`` says whether ``predict`` runs a network (counted
    in ``stats.draft_calls``)."""

    network_calls: bool = False

    def predict(self, x: Tensor, step: Tensor, frozen: Tensor) -> Tensor:
        """Prediction for drafted states ``x`` at ``step``; ``frozen`` is the last
        prediction the target made for each row's sample."""
        raise NotImplementedError


class FrozenTargetDrafter(Drafter):
    """Training-free (the paper's Eq. 7): reuse the target's last prediction at every
    drafted state and step. No network call."""

    def predict(self, x: Tensor, step: Tensor, frozen: Tensor) -> Tensor:
        return frozen

    def __repr__(self) -> str:
        return "FrozenTargetDrafter()"


class ModelDrafter(Drafter):
    """An independent (cheaper) model with the chain's ``predict(x, step)`` signature."""

    network_calls = True

    def __init__(self, predict: Callable[[Tensor, Tensor], Tensor]):
        self.model_predict = predict

    def predict(self, x: Tensor, step: Tensor, frozen: Tensor) -> Tensor:
        return self.model_predict(x, step).to(frozen.dtype)

    def __repr__(self) -> str:
        return f"ModelDrafter({self.model_predict!r})"


def as_drafter(drafter: Drafter | Callable | str | None) -> Drafter:
    """``None`` or ``"frozen"`` -> frozen target; a callable -> :class:`ModelDrafter`."""
    if drafter is None or drafter == "frozen":
        return FrozenTargetDrafter()
    if isinstance(drafter, Drafter):
        return drafter
    if callable(drafter):
        return ModelDrafter(drafter)
    raise TypeError(
        f"drafter must be None/'frozen', a Drafter, or a callable predict(x, step); got {drafter!r}"
    )
