"""Kernels: how one step is drawn, accepted and corrected, for each kind of chain.

A kernel is a small stateless object with

    noise                         "normal" or "uniform": what the caller's generator draws per step
    law(chain, x, step, prediction, previous) -> law      the step's law given a prediction
    draw(law, noise, like) -> y                           the step drawn from its own keyed noise
    accept(law_draft, law_target, y, noise, u) -> bool    the maximal-coupling test of a drafted step
    correct(law_draft, law_target, y, noise, generators) -> (x, draws)
                                                          a draw from the target coupled to a rejection
    draft_window(chain, x, steps, predictions, noise) -> (y, laws) or None
                                                          optional: a window whose predictions are
                                                          known up front, drafted at once (None: the
                                                          round drafts it step by step)

A law is a tuple of tensors with one leading row per state. The round
(:mod:`specdiff.round`) is written once against this interface; adding a coupling is one file.

Gaussian steps have two couplings (``coupling=``): ``"reflection"`` (:class:`GaussianKernel`, one
std shared by draft and target, no new randomness on rejection) and ``"maximal"``
(:class:`MaximalKernel`, accept with min(1, q/p) and draw the exact residual; also for a std that
differs between draft and target, e.g. a learned variance). Both accept with the same probability
when the std is shared. Categorical steps are always coupled by min(1, K/J) with the exact
residual: that is their Γ-maximal coupling.
"""

from .categorical import CategoricalKernel, MaskedKernel
from .gaussian import GaussianKernel
from .maximal import MaximalKernel

COUPLINGS = ("reflection", "maximal")


def kernel_for(chain, x_init, coupling: str | None = None):
    """The kernel of a chain started at ``x_init``: categorical for integer states (a
    :class:`~specdiff.CategoricalChain`), Gaussian for floating-point ones; a chain may name its
    own with a ``kernel`` attribute.

    ``coupling`` (``None``: the chain's own) picks the coupling of Gaussian steps: ``"reflection"``
    or ``"maximal"``. A chain whose std comes from the network (its kernel is
    :class:`MaximalKernel`) refuses ``"reflection"``; categorical chains accept ``"maximal"`` (what
    they do) and refuse ``"reflection"``."""
    kernel = getattr(chain, "kernel", None)
    if kernel is None:
        kernel = GaussianKernel if x_init.is_floating_point() else CategoricalKernel
    if coupling is None:
        return kernel
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {COUPLINGS} (or None: the chain's own); got {coupling!r}")
    if issubclass(kernel, MaximalKernel):
        if coupling == "reflection":
            raise ValueError(
                f"{type(chain).__name__} has steps whose std comes from the network (learned variance), so draft "
                "and target kernels have different std and the reflection coupling does not apply; use "
                "coupling='maximal' (the default for this chain)"
            )
        return kernel
    if issubclass(kernel, GaussianKernel):
        return kernel if coupling == "reflection" else MaximalKernel
    if coupling == "maximal":
        return kernel  # a categorical step's min(1, K/J) with the exact residual is its Γ-maximal coupling
    raise ValueError(
        f"coupling='reflection' couples Gaussian steps; {type(chain).__name__} steps with {kernel.__name__}, "
        "which is the Γ-maximal coupling (coupling='maximal' or None)"
    )


__all__ = ["COUPLINGS", "CategoricalKernel", "GaussianKernel", "MaskedKernel", "MaximalKernel", "kernel_for"]
