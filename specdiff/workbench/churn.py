"""The high-dimensional churn protocol: a Gaussian-mixture flow-matching model sampled by a
stochastic ("churn") reverse SDE, with the exact posterior-mean velocity.

Protocol (as published by a research peer; see the README's Performance section): data
``x_0`` from an isotropic mixture of 5 components in d = 512 (means uniform in [-2, 2]^d,
standard deviations uniform in [0.10, 0.25], mixture drawn by ``numpy.random.default_rng(20260714)``),
interpolant ``x_s = (1 - s) x_0 + s ξ`` with ``s`` on the uniform grid from 1 to 0 in T = 30
steps, churn ε = 0.06. One step from ``s`` to ``s' = s + ds`` (``ds < 0``):

    g² = 2s / (1 - s),  score = -(x + (1 - s) v) / s,
    mean = x + ds (v - ε² g² score / 2),  std = ε g √(-ds).

The first (s = 1) and last (s' = 0) steps have no noise and are run outside the chain, so
the chain has T - 2 = 28 stochastic steps. ``predict`` returns the velocity ``v``; the
frozen drafter therefore freezes ``v`` and re-applies the kernel at the drafted state.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class ChurnMixtureChain:
    """A :class:`specdiff.GaussianChain` on the churn protocol (module docstring)."""

    def __init__(self, dim: int = 512, components: int = 5, num_steps: int = 30, churn: float = 0.06,
                 mixture_seed: int = 20260714):
        rng = np.random.default_rng(mixture_seed)
        self.means = torch.as_tensor(rng.uniform(-2.0, 2.0, size=(components, dim)))
        self.stds = torch.as_tensor(rng.uniform(0.10, 0.25, components))
        self.dim, self.churn, self.total_steps = dim, churn, num_steps
        self.grid = torch.cat([torch.linspace(1000.0, 1.0, num_steps, dtype=torch.float64) / 1000, torch.zeros(1)])
        self.num_steps = num_steps - 2  # the stochastic steps 1 .. T-2

    def velocity(self, x: Tensor, s: Tensor) -> Tensor:
        """``E[ξ - x_0 | x_s = x]`` for the mixture (``s`` one value per row)."""
        s = s.view(-1, 1, 1)
        a = 1 - s
        var = a**2 * self.stds.view(1, -1, 1) ** 2 + s**2  # [rows, components, 1]
        diff = x[:, None, :] - a * self.means[None]
        logits = -0.5 * (diff**2).sum(-1, keepdim=True) / var - 0.5 * self.dim * var.log()
        weights = torch.softmax(logits, dim=1)
        x0 = (weights * (self.means[None] + a * self.stds.view(1, -1, 1) ** 2 / var * diff)).sum(1)
        return (x - x0) / s.view(-1, 1)

    def _s(self, step: Tensor) -> tuple[Tensor, Tensor]:
        k = step.cpu() + 1
        return self.grid[k].view(-1, 1), self.grid[k + 1].view(-1, 1)

    def predict(self, x: Tensor, step: Tensor) -> Tensor:
        return self.velocity(x, self._s(step)[0])

    def transition(self, x: Tensor, step: Tensor, prediction: Tensor) -> tuple[Tensor, Tensor]:
        s, s_next = self._s(step)
        ds = s_next - s
        g2 = 2 * s / (1 - s)
        score = -(x + (1 - s) * prediction) / s
        mean = x + ds * (prediction - 0.5 * self.churn**2 * g2 * score)
        return mean, (self.churn * g2.sqrt() * (-ds).sqrt()).view(-1)

    def initial_state(self, n: int, generator: torch.Generator) -> Tensor:
        """Noise at s = 1 moved by the deterministic first step (Euler)."""
        x = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        s, s_next = self.grid[0], self.grid[1]
        return x + (s_next - s) * self.velocity(x, torch.full((n,), float(s), dtype=torch.float64))

    def finish(self, x: Tensor) -> Tensor:
        """The deterministic last step to s = 0."""
        s = self.grid[-2]
        return x - s * self.velocity(x, torch.full((x.shape[0],), float(s), dtype=torch.float64))


class ChurnX0Chain(ChurnMixtureChain):
    """The same chain (same law) carrying the x0 prediction ``x - s v`` instead of the velocity, so
    a frozen drafter freezes x0 and re-derives ``v = (y - x0) / s`` at the drafted state: ASD's
    drift (the posterior mean, :mod:`.asd`)."""

    def predict(self, x: Tensor, step: Tensor) -> Tensor:
        return x - self._s(step)[0] * super().predict(x, step)

    def transition(self, x: Tensor, step: Tensor, prediction: Tensor) -> tuple[Tensor, Tensor]:
        return super().transition(x, step, (x - prediction) / self._s(step)[0])


def std_per_step(chain: ChurnMixtureChain) -> list[float]:
    steps = torch.arange(chain.num_steps)
    return chain.transition(
        torch.zeros(chain.num_steps, chain.dim), steps, torch.zeros(chain.num_steps, chain.dim)
    )[1].tolist()


