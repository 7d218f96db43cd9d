"""The protocols a sampler implements to be accelerated (SPEC §5).

A chain is a Markov sampler ``x_{k+1} ~ K_k(. | x_k)``, k = 0..num_steps-1, whose kernel
needs one network call at ``x_k``. ``step`` is always a ``LongTensor[B]`` of per-row
step indices, so one call can serve rows at different steps.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class GaussianChain(Protocol):
    """A sampler whose every step is Gaussian given the network output:
    ``x_{k+1} = mean + std * z``, ``z ~ N(0, I)``, with ``std`` fixed by the schedule.

    A chain whose mean also needs the prediction of the previous step (multistep
    solvers) sets ``uses_previous_prediction = True``; its ``transition`` then takes
    ``previous=`` (``None`` on the first step).
    """

    num_steps: int

    def predict(self, x: Tensor, step: Tensor) -> Tensor:
        """The network call, batched over rows."""

    def transition(self, x: Tensor, step: Tensor, prediction: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, std)`` of step ``step`` from ``x``; ``std`` is one value per row."""


@runtime_checkable
class CategoricalChain(Protocol):
    """A discrete sampler: each position of ``x`` (integer tokens) moves independently
    given the network output, to the categorical law returned by ``transition``."""

    num_steps: int

    def predict(self, x: Tensor, step: Tensor) -> Tensor:
        """The network call: logits or probabilities, batched over rows."""

    def transition(self, x: Tensor, step: Tensor, prediction: Tensor) -> Tensor:
        """Per-position next-state probabilities, shape ``(*x.shape, vocab)``."""
