"""Tools to certify exactness: an analytic model with a known denoiser, and a
two-sample checker.

:class:`GaussianMixtureDDPM` is a DDPM ancestral sampler whose data law is a Gaussian
mixture, so its denoiser ``E[x_0 | x_t]`` is available in closed form: a "network" that
is exact, cheap and deterministic row by row. Use it to check that a sampler change
keeps the law (:func:`two_sample_test`) and to measure acceptance without training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy import stats as sps
from torch import Tensor

from .kernels import GaussianKernel


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's 1000-step linear schedule, respaced to ``num_steps`` steps spanning the same noise."""
    base = torch.cumprod(1 - torch.linspace(beta_start, beta_end, 1000, dtype=torch.float64), 0)
    alphas_cumprod = base[torch.linspace(0, 999, num_steps).round().long()]
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return 1 - alphas_cumprod / previous


class GaussianMixtureDDPM:
    """DDPM ancestral sampling (``fixed_small`` variance) of ``sum_k w_k N(mu_k, s^2 I)``
    with its exact denoiser; a :class:`~specdiff.GaussianChain`.

    Step k runs from diffusion time ``t = num_steps - 1 - k`` to ``t - 1``; the last step
    (t = 0) is deterministic. ``prediction_type`` chooses what ``predict`` returns
    (``"epsilon"`` or ``"sample"``), hence what a frozen drafter freezes.
    """

    kernel = GaussianKernel

    def __init__(
        self,
        means: Tensor,
        scale: float = 0.1,
        weights: Tensor | None = None,
        num_steps: int = 1000,
        prediction_type: str = "epsilon",
    ):
        if prediction_type not in ("epsilon", "sample"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'sample', got {prediction_type!r}")
        self.means = means.to(torch.float64)
        self.scale = float(scale)
        k = self.means.shape[0]
        self.weights = (torch.full((k,), 1.0 / k) if weights is None else weights).to(torch.float64)
        self.num_steps = num_steps
        self.prediction_type = prediction_type
        self.betas = linear_betas(num_steps)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)
        self.predict_calls = 0

    @classmethod
    def random(cls, dim: int = 2, components: int = 4, seed: int = 0, **kwargs) -> GaussianMixtureDDPM:
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(components, dim, generator=g, dtype=torch.float64)
        return cls(means / math.sqrt(dim) * 1.5, **kwargs)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _on(self, device) -> tuple[Tensor, Tensor, Tensor]:
        """``alphas_cumprod``, ``means``, ``weights`` on ``device``: copied there once, so that a call
        on a GPU never waits for a copy from the host."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.alphas_cumprod, self.means, self.weights
        cache = self.__dict__.setdefault("_device_tables", {})
        if device not in cache:
            cache[device] = tuple(t.to(device) for t in (self.alphas_cumprod, self.means, self.weights))
        return cache[device]

    def _coefficients(self, step: Tensor, like: Tensor):
        alphas_cumprod = self._on(like.device)[0]
        t = self.num_steps - 1 - (step if step.device == like.device else step.to(like.device))
        ab = alphas_cumprod[t]
        ab_prev = torch.where(t > 0, alphas_cumprod[(t - 1).clamp(min=0)], torch.ones_like(ab))
        shape = (-1, *[1] * (like.ndim - 1))
        work = torch.promote_types(like.dtype, torch.float32)  # half-precision latents, float32 maths
        return [c.to(device=like.device, dtype=work).view(shape) for c in (ab, ab_prev)]

    def predict(self, x: Tensor, step: Tensor) -> Tensor:
        self.predict_calls += 1
        ab, _ = self._coefficients(step, x)
        _, means, weights = self._on(x.device)
        flat, root = x.to(torch.float64).flatten(1), ab.flatten().to(torch.float64)[:, None, None]
        var = root.square() * self.scale**2 + 1 - root.square()  # marginal variance at t
        centred = flat[:, None, :] - root * means[None]  # [B, K, d]
        logits = weights.log() - centred.square().sum(-1) / (2 * var[..., 0])
        resp = torch.softmax(logits, dim=1)
        x0 = (resp[..., None] * (means[None] + root * self.scale**2 / var * centred)).sum(1)
        x0 = x0.view_as(x).to(x.dtype)
        if self.prediction_type == "sample":
            return x0
        return ((x - ab.sqrt() * x0) / (1 - ab).sqrt()).to(x.dtype)

    def transition(self, x: Tensor, step: Tensor, prediction: Tensor) -> tuple[Tensor, Tensor]:
        ab, ab_prev = self._coefficients(step, x)
        x0 = prediction if self.prediction_type == "sample" else (x - (1 - ab).sqrt() * prediction) / ab.sqrt()
        alpha = ab / ab_prev
        # DDPM eq. (7): posterior q(x_{t-1} | x_t, x_0) mean and variance.
        mean = ab_prev.sqrt() * (1 - alpha) / (1 - ab) * x0 + alpha.sqrt() * (1 - ab_prev) / (1 - ab) * x
        std = ((1 - ab_prev) / (1 - ab) * (1 - alpha)).sqrt()
        return mean, std.flatten()

    def sample_prior(self, n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
        return torch.randn(n, self.dim, generator=generator, dtype=dtype)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.means[k] + self.scale * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)


@dataclass
class TwoSampleResult:
    """Kolmogorov–Smirnov tests on projections, Bonferroni-corrected at level ``alpha``:
    ``passed`` is False when some projection's p-value is below ``alpha / len(p_values)``."""

    p_values: list[float]
    directions: list[str]
    alpha: float

    @property
    def min_p(self) -> float:
        return min(self.p_values)

    @property
    def passed(self) -> bool:
        return self.min_p >= self.alpha / len(self.p_values)

    def __str__(self) -> str:
        worst = self.p_values.index(self.min_p)
        verdict = "same law not rejected" if self.passed else "laws DIFFER"
        return (
            f"{verdict}: min p = {self.min_p:.3g} on {self.directions[worst]} over {len(self.p_values)} "
            f"projections (family-wise alpha = {self.alpha})"
        )


def two_sample_test(
    a: Tensor, b: Tensor, *, num_projections: int = 16, alpha: float = 1e-3, seed: int = 0
) -> TwoSampleResult:
    """Do samples ``a`` and ``b`` (``[n, ...]``) come from the same law?

    Two-sample KS tests on the first coordinates, ``num_projections`` random unit
    directions (seeded) and the norm; the family-wise significance level is ``alpha``.
    """
    a, b = a.flatten(1).double().cpu(), b.flatten(1).double().cpu()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"samples have different dimensions: {a.shape[1]} vs {b.shape[1]}")
    dim = a.shape[1]
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(num_projections, dim, generator=g, dtype=torch.float64)
    dirs = torch.cat([torch.eye(dim, dtype=torch.float64)[: min(dim, 4)], dirs / dirs.norm(dim=1, keepdim=True)])
    names = [f"axis {i}" for i in range(min(dim, 4))] + [f"random direction {i}" for i in range(num_projections)]
    pa, pb = a @ dirs.T, b @ dirs.T
    p_values = [float(sps.ks_2samp(pa[:, i].numpy(), pb[:, i].numpy()).pvalue) for i in range(dirs.shape[0])]
    p_values.append(float(sps.ks_2samp(a.norm(dim=1).numpy(), b.norm(dim=1).numpy()).pvalue))
    return TwoSampleResult(p_values, names + ["norm"], alpha)


def assert_same_law(a: Tensor, b: Tensor, **kwargs) -> TwoSampleResult:
    """:func:`two_sample_test`, raising ``AssertionError`` with the details when it rejects."""
    result = two_sample_test(a, b, **kwargs)
    if not result.passed:
        raise AssertionError(str(result))
    return result
