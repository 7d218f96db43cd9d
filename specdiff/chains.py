"""The contracts of the core: what a chain implements to be accelerated, and what a kernel does.

A chain is a Markov sampler ``x_{k+1} ~ K_k(. | x_k)``, k = 0..num_steps-1, whose kernel
needs one network call at ``x_k``. ``step`` is always a ``LongTensor[B]`` of per-row
step indices, so one call can serve rows at different steps.

Optional chain capabilities (class attributes the core reads; all default to the safe value):

==============================  =========  ============================================================
attribute                       default    meaning (and whether it affects correctness)
==============================  =========  ============================================================
``time_conditioned``            ``True``   **correctness**: ``False`` declares that ``predict`` ignores
                                           ``step`` (a masked-diffusion network). The round then reuses
                                           a prediction while a state repeats, and ``cached=True``
                                           becomes legal. Declaring ``False`` for a network that reads
                                           the time makes the output wrong.
``uses_previous_prediction``    ``False``  **correctness**: ``transition`` takes ``previous=`` (the
                                           prediction one step earlier: multistep solvers). The round
                                           carries it; a chain that reads it without declaring it is
                                           handed nothing.
``uses_sample_index``           ``False``  ``predict(x, step, sample=)`` also receives the batch index
                                           of each row (per-sample conditioning: prompts). Needed for
                                           correctness by a chain whose rows are conditioned.
``kernel``                      by dtype   the :class:`Kernel` of the chain's steps (Gaussian for float
                                           states, categorical for integer ones).
``affine`` + ``transition_affine``  off    speed only: the mean is ``shift + scale * x``, so a window
                                           with known predictions is drafted in one batch.
``draft_frozen``                absent     speed only: a categorical chain drafts a frozen window at once.
``latency_key``                 derived    speed only: the key of the automatic window's calibration.
==============================  =========  ============================================================
"""

from __future__ import annotations

from collections.abc import Callable
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


class Kernel(Protocol):
    """How a step of a chain is drawn, tested and corrected: the paper's coupling, once per law.

    ``law`` is a tuple of tensors with rows first (e.g. ``(mean, std)``); the round stacks and
    indexes it part by part, so a kernel never sees the round's grid. Randomness comes only from
    the arguments: ``z`` (the step's keyed noise, of kind ``noise``), ``u`` (the step's acceptance
    uniform) and ``generators()`` (the step's keyed residual streams), so a sample's draws never
    depend on the window or on the other samples of the batch.
    """

    noise: str  # "normal" (Gaussian z in the states' shape) or "uniform" (per-position uniforms)

    @staticmethod
    def law(chain, x: Tensor, step: Tensor, prediction: Tensor, previous: Tensor) -> tuple[Tensor, ...]:
        """The step's law from states ``x`` given the network's ``prediction`` (and ``previous``)."""

    @staticmethod
    def draw(law: tuple[Tensor, ...], z: Tensor, like: Tensor) -> Tensor:
        """A draw of ``law`` from the noise ``z``, in ``like``'s dtype: the plain sampler's step."""

    @staticmethod
    def accept(law_draft: tuple, law_target: tuple, y: Tensor, z: Tensor, u: Tensor) -> Tensor:
        """Whether each drafted step ``y = draw(law_draft, z)`` is kept, with probability at most
        ``min(1, K(y)/J(y))`` as a maximal coupling needs, decided by ``u``."""

    @staticmethod
    def correct(law_draft: tuple, law_target: tuple, y: Tensor, z: Tensor,
                generators: Callable[[], list]) -> tuple[Tensor, Tensor]:
        """For rejected rows: a draw that makes the step's output exactly ``law_target``
        (reflection, or the residual ``(K - J)+``); returns it and the residual draws each used."""
