"""Drafters: where the cheap guesses come from.

A drafter returns the *prediction* (the same quantity the chain's ``predict`` returns) used to
build the draft law of a drafted step; the sampler applies the chain's own ``transition`` to it
at the drafted state and step. Exactness never depends on the drafter, only acceptance does.

The prediction space is the chain's: for a :class:`~specdiff.schedulers.SchedulerChain` it is
the quantity named by its ``frozen_prediction`` (x0 by default), for a raw
:class:`~specdiff.GaussianChain` whatever its ``predict`` returns, for a
:class:`~specdiff.CategoricalChain` its logits/probabilities.

To add one, subclass :class:`Drafter` and implement ``predict(x, step, memory)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DraftMemory:
    """What the target has said about each row's sample, for a drafter to reuse.

    * ``prediction``: the target's last prediction for the sample (what the frozen drafter returns);
    * ``step``: the step it was made at (``n`` after a fully accepted round, ``n - 1`` after a rejection);
    * ``previous``: the target's prediction one step before that (``prediction`` itself when unknown);
    * ``sample``: the batch index of each row (per-sample conditioning);
    * ``same_step``: where ``has_same_step``, the target's prediction *at the drafted step*, made by
      the last verify call on a draft that a rejection discarded (a nearby state); ``None`` if no row
      has one.
    """

    prediction: Tensor
    step: Tensor
    previous: Tensor
    sample: Tensor
    same_step: Tensor | None = None
    has_same_step: Tensor | None = None


class Drafter:
    """Base class. ``network_calls`` says whether ``predict`` runs a network (counted in
    ``stats.draft_calls``); ``reuses_target`` that it only returns the target's own (already
    checked) predictions; ``uses_state = False`` that ``predict`` never reads ``x`` (it is then
    passed ``None``, and the sampler may ask for a whole window's predictions before drafting it)."""

    network_calls: bool = False
    reuses_target: bool = False
    uses_state: bool = True

    def predict(self, x: Tensor, step: Tensor, memory: DraftMemory) -> Tensor:
        """Prediction for drafted states ``x`` (one row each) at ``step``."""
        raise NotImplementedError


class FrozenTargetDrafter(Drafter):
    """Training-free (the paper's frozen-target drafter): reuse the target's last prediction
    at every drafted state and step. No network call."""

    reuses_target = True
    uses_state = False

    def predict(self, x: Tensor, step: Tensor, memory: DraftMemory) -> Tensor:
        return memory.prediction

    def __repr__(self) -> str:
        return "FrozenTargetDrafter()"


class PicardDrafter(Drafter):
    """The frozen drafter, except where the target has already predicted the drafted step: after a
    rejection, the verify call also evaluated the discarded drafts, and the next round redrafts the
    same steps from the corrected state with the same step noise, so those time-aligned predictions
    (Picard iteration's idea) are closer than the frozen one. No network call; exact like any
    drafter (they depend on the noise of earlier steps only)."""

    reuses_target = True
    uses_state = False

    def predict(self, x: Tensor, step: Tensor, memory: DraftMemory) -> Tensor:
        if memory.same_step is None:
            return memory.prediction
        has = memory.has_same_step.view(-1, *[1] * (memory.prediction.ndim - 1))
        return torch.where(has, memory.same_step, memory.prediction)

    def __repr__(self) -> str:
        return "PicardDrafter()"


def takes_sample(fn: Callable) -> bool:
    """Whether ``fn`` accepts the ``sample=`` keyword (per-sample conditioning)."""
    try:
        return "sample" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class ModelDrafter(Drafter):
    """An independent (cheaper) network with the signature of the chain's ``predict``:
    ``predict(x, step)`` (plus ``sample=`` if it takes it) returning the chain's prediction."""

    network_calls = True

    def __init__(self, predict: Callable[..., Tensor]):
        self.model_predict = predict
        self._takes_sample = takes_sample(predict)

    def predict(self, x: Tensor, step: Tensor, memory: DraftMemory) -> Tensor:
        extra = {"sample": memory.sample} if self._takes_sample else {}
        return self.model_predict(x, step, **extra).to(memory.prediction.dtype)

    def __repr__(self) -> str:
        return f"ModelDrafter({self.model_predict!r})"


def as_drafter(drafter: Drafter | Callable | str | None) -> Drafter:
    """``None`` or ``"frozen"`` -> frozen target; ``"picard"`` -> :class:`PicardDrafter`; a callable
    -> :class:`ModelDrafter`."""
    if drafter is None or (isinstance(drafter, str) and drafter == "frozen"):
        return FrozenTargetDrafter()
    if isinstance(drafter, str) and drafter == "picard":
        return PicardDrafter()
    if isinstance(drafter, Drafter):
        return drafter
    if callable(drafter) and not isinstance(drafter, str):
        return ModelDrafter(drafter)
    raise TypeError(
        f"drafter must be None/'frozen', 'picard', a specdiff.Drafter, or a callable with the signature of the "
        f"chain's predict(x, step); got {drafter!r}"
    )
