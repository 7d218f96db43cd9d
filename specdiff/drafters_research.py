"""Drafters measured against the frozen one (the Picard drafter, which won, is
:class:`specdiff.drafters.PicardDrafter`, ``drafter="picard"``).

``Drafter.predict(x, step, memory)``: ``memory`` holds the target's last prediction for each
row's sample (``prediction``, made at ``step``), the one before (``previous``) and the
sample index (``sample``). Measured on the bundled digits DDPM in the README's
"Performance" section; the winner gets promoted to :mod:`specdiff.drafters`.
"""

from __future__ import annotations

from torch import Tensor

from .drafters import Drafter, DraftMemory


class ExtrapolatedDrafter(Drafter):
    """Linear extrapolation of the target's prediction across steps:
    ``prediction + beta * (step - memory.step) * (prediction - previous)``."""

    def __init__(self, beta: float = 0.5):
        self.beta = beta

    def predict(self, x: Tensor, step: Tensor, memory: DraftMemory) -> Tensor:
        lag = (step - memory.step).to(memory.prediction.dtype).view(-1, *[1] * (memory.prediction.ndim - 1))
        return memory.prediction + self.beta * lag * (memory.prediction - memory.previous)

    def __repr__(self) -> str:
        return f"ExtrapolatedDrafter(beta={self.beta})"
