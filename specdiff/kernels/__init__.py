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
"""

from .categorical import CategoricalKernel, MaskedKernel
from .gaussian import GaussianKernel


def kernel_for(chain, x_init):
    """The kernel of a chain started at ``x_init``: categorical for integer states (a
    :class:`~specdiff.CategoricalChain`), Gaussian for floating-point ones; a chain may name its
    own with a ``kernel`` attribute."""
    kernel = getattr(chain, "kernel", None)
    if kernel is not None:
        return kernel
    return GaussianKernel if x_init.is_floating_point() else CategoricalKernel


__all__ = ["CategoricalKernel", "GaussianKernel", "MaskedKernel", "kernel_for"]
