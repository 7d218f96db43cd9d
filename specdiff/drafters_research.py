"""Drafters beyond the frozen one, written against the new driver's memory interface.

``Drafter.predict(x, step, memory)``: ``memory`` holds the target's last prediction for each
row's sample (``prediction``, made at ``step``), the one before (``previous``) and the
sample index (``sample``). Measured on the bundled digits DDPM in the README's
"Performance" section; the winner gets promoted to :mod:`specdiff.drafters`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .drafters import DraftMemory, Drafter


class ExtrapolatedDrafter(Drafter):
    """Linear extrapolation of the target's prediction across steps:
    ``prediction + beta * (step - memory.step) * (prediction - previous)``."""

    def __init__(self, beta: float = 0.5):
        self.beta = beta

    def predict(self, x: Tensor, step: Tensor, memory: DraftMemory) -> Tensor:
        lag = (step - memory.step).to(memory.prediction.dtype).view(-1, *[1] * (x.ndim - 1))
        return memory.prediction + self.beta * lag * (memory.prediction - memory.previous)

    def __repr__(self) -> str:
        return f"ExtrapolatedDrafter(beta={self.beta})"


class PicardDrafter(Drafter):
    """Reuse, at each drafted step, the target's prediction *at that same step* from an
    earlier round when there is one (Picard iteration's idea, with exact verification).

    After a rejection at position r, the round's verify call has also evaluated the target
    at the discarded drafts y_{r+1..L} (steps n+r+1..n+L). The next round redrafts those
    steps from the reflected state with the same step noise, so its states stay close to
    the discarded ones, and a time-aligned prediction beats the frozen one (made r+1 or more
    steps earlier). Elsewhere it falls back to the frozen prediction. It only reads target
    outputs of past calls, so the output law is unchanged.

    Use ``drafter = PicardDrafter(); chain = drafter.watch(chain)`` and sample ``chain``.
    """

    def __init__(self):
        self._ahead: dict[int, dict[int, Tensor]] = {}  # sample -> step -> target prediction

    def watch(self, chain) -> _Watched:
        """``chain`` whose target calls this drafter records (same law, same calls)."""
        return _Watched(chain, self)

    def record(self, prediction: Tensor, step: Tensor, sample: Tensor) -> None:
        steps, samples = step.tolist(), sample.tolist()
        first: dict[int, int] = {}
        for s, k in zip(samples, steps):
            first[s] = min(k, first.get(s, k))
        for s, start in first.items():  # predictions before the rows' earliest step are never asked again
            old = self._ahead.get(s, {})
            self._ahead[s] = {k: p for k, p in old.items() if k >= start}
        for i, (s, k) in enumerate(zip(samples, steps)):
            self._ahead[s][k] = prediction[i]

    def predict(self, x: Tensor, step: Tensor, memory: DraftMemory) -> Tensor:
        out = memory.prediction
        found = [(i, self._ahead.get(s, {}).get(k)) for i, (s, k) in
                 enumerate(zip(memory.sample.tolist(), step.tolist()))]
        found = [(i, p) for i, p in found if p is not None]
        if found:
            out = out.clone()
            rows = torch.tensor([i for i, _ in found], device=out.device)
            out[rows] = torch.stack([p for _, p in found]).to(out.dtype)
        return out

    def __repr__(self) -> str:
        return "PicardDrafter()"


class _Watched:
    """A chain whose ``predict`` also hands each call's outputs to a :class:`PicardDrafter`."""

    uses_sample_index = True

    def __init__(self, chain, drafter: PicardDrafter):
        self.chain, self.drafter = chain, drafter

    def __getattr__(self, name):
        return getattr(self.chain, name)

    def predict(self, x: Tensor, step: Tensor, sample: Tensor | None = None) -> Tensor:
        if sample is None:
            sample = torch.arange(x.shape[0], device=x.device)
        if getattr(self.chain, "uses_sample_index", False):
            prediction = self.chain.predict(x, step, sample=sample)
        else:
            prediction = self.chain.predict(x, step)
        self.drafter.record(prediction, step, sample)
        return prediction
