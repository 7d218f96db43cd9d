"""DDPM ancestral step (Ho et al. 2020, eq. 6-7) for ``DDPMScheduler``.

    x0      from the model output (epsilon / sample / v_prediction), then clipped or thresholded
    mean    = sqrt(a_prev) * beta_t / (1 - a_t) * x0 + sqrt(alpha_t) * (1 - a_prev) / (1 - a_t) * x
    std     = sqrt(posterior variance)  (fixed_small, fixed_small_log)  or  sqrt(beta_t)  (fixed_large)

with ``alpha_t = a_t / a_prev``, ``beta_t = 1 - alpha_t``. ``t_prev`` is the next entry of
``scheduler.timesteps`` (-1, i.e. ``a_prev = 1``, after the last), which is what diffusers'
``previous_timestep`` does for every spacing and for custom timesteps. Noise is added only
when the timestep ``t > 0`` (diffusers' rule), so a schedule ending at t = 0 ends with a
deterministic step.

Learned variance (``variance_type="learned"`` / ``"learned_range"``, improved DDPM): the network
outputs ``2C`` channels ``[prediction, v]`` and the step's std is per element, from ``v``:
``std = sqrt(v)`` (``learned``: ``v`` is the variance), or ``std = exp(½ (f log β_t + (1 - f) log β̃_t))``
with ``f = (v + 1) / 2`` (``learned_range``; ``β̃_t`` the clamped posterior variance), as
diffusers' ``_get_variance``. The prediction the chain carries keeps the ``v`` channels, so a
draft's std comes from the drafter's prediction; draft and target std then differ, which the
Γ-maximal coupling handles (the chain's kernel is :class:`~specdiff.kernels.MaximalKernel`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SchedulerAdapter, register_adapter, step_table, threshold_sample


@register_adapter("DDPMScheduler", "DDPMParallelScheduler")
class DDPMAdapter(SchedulerAdapter):
    """Gaussian step of ``DDPMScheduler`` for variance types ``fixed_small``, ``fixed_small_log``,
    ``fixed_large``, and (std from the network, Γ-maximal coupling) ``learned``, ``learned_range``."""

    # README's table is generated from this line (a test keeps them equal): learned / learned_range are
    # supported too (Γ-maximal coupling); the lead adds them here and in the README together.
    support = ("variance `fixed_small`, `fixed_small_log`, `fixed_large`, `learned`, `learned_range` (the latter two "
               "by the Γ-maximal coupling); every prediction type, clipping, thresholding")

    @classmethod
    def check(cls, scheduler, **options) -> None:
        super().check(scheduler)
        variance_type = scheduler.config.variance_type
        if variance_type == "fixed_large_log":
            raise ValueError(
                "DDPMScheduler with variance_type='fixed_large_log' is not supported: diffusers takes the square "
                "root of a log-variance there, which is NaN at every step. Use variance_type='fixed_large' "
                "(the same variance, beta_t, computed correctly)"
            )
        if variance_type not in ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"):
            raise ValueError(f"unknown DDPMScheduler variance_type {variance_type!r}")

    def __init__(self, scheduler):
        self.check(scheduler)
        super().__init__(scheduler)
        cfg = scheduler.config
        self.clip_sample, self.clip_sample_range = cfg.clip_sample, cfg.clip_sample_range
        self.thresholding = cfg.thresholding
        self.dynamic_thresholding_ratio, self.sample_max_value = cfg.dynamic_thresholding_ratio, cfg.sample_max_value
        self.variance_type = cfg.variance_type
        self.std_from_network = cfg.variance_type in ("learned", "learned_range")  # per element, from the output

        # Same operations, in the same order, as DDPMScheduler.step / _get_variance, on all steps at
        # once: +, -, *, / and sqrt (``** 0.5``) round the same elementwise; log and exp, whose
        # vectorised kernels may round differently, are taken one step at a time (step_table).
        alphas_cumprod = scheduler.alphas_cumprod.detach().cpu()
        timesteps = torch.tensor([int(t) for t in self.timesteps])
        previous = torch.cat([timesteps[1:], torch.tensor([-1])])
        a_t = alphas_cumprod[timesteps]
        a_prev = torch.where(previous >= 0, alphas_cumprod[previous.clamp(min=0)], torch.tensor(1.0))
        b_t, b_prev = 1 - a_t, 1 - a_prev
        alpha_t = a_t / a_prev
        beta_t = 1 - alpha_t
        variance = torch.clamp((1 - a_prev) / (1 - a_t) * beta_t, min=1e-20)
        if cfg.variance_type == "fixed_small":
            std = variance**0.5
        elif cfg.variance_type == "fixed_small_log":
            std = step_table([torch.exp(0.5 * torch.log(v)) for v in variance])
        elif cfg.variance_type == "fixed_large":
            std = beta_t**0.5
        else:  # learned: 1 marks a noisy step (its std comes from the network)
            std = torch.ones_like(beta_t)
        self.sqrt_a, self.sqrt_b = a_t**0.5, b_t**0.5
        self.coef_x0, self.coef_x = (a_prev**0.5 * beta_t) / b_t, alpha_t**0.5 * b_prev / b_t
        self.std = torch.where(timesteps == 0, torch.zeros(()), std)
        # learned_range's end points, as _get_variance computes them
        self.min_log = step_table([torch.log(v) for v in variance]) if self.std_from_network else None
        self.max_log = step_table([torch.log(b) for b in beta_t]) if self.std_from_network else None

    def signal_and_noise(self, step: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        return self.rows(self.sqrt_a, step, like), self.rows(self.sqrt_b, step, like)

    def _split(self, output: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(prediction, v)``: a learned-variance output's ``2C`` channels split (``v`` None otherwise)."""
        if not self.std_from_network:
            return output, None
        if output.ndim < 2 or output.shape[1] != 2 * x.shape[1]:
            raise ValueError(
                f"DDPMScheduler with variance_type={self.variance_type!r} needs a model output with twice the "
                f"state's channels, [prediction, variance] ({2 * x.shape[1]}); got shape {tuple(output.shape)}"
            )
        return torch.split(output, x.shape[1], dim=1)

    def x0_from_output(self, model_output: Tensor, x: Tensor, step: Tensor) -> Tensor:
        """Predicted x0 (DDPM eq. 15), before clipping; with a learned variance, ``[x0, v]`` (the
        variance channels carried along)."""
        model_output, v = self._split(model_output, x)
        x0 = self._x0(model_output, x, step)
        return x0 if v is None else torch.cat([x0, v.to(x0.dtype)], dim=1)

    def _x0(self, model_output: Tensor, x: Tensor, step: Tensor) -> Tensor:
        sqrt_a, sqrt_b = self.signal_and_noise(step, x)
        if self.prediction_type == "epsilon":
            x0 = (x - sqrt_b * model_output) / sqrt_a
        elif self.prediction_type == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = sqrt_a * x - sqrt_b * model_output
        return x0

    def affine_from_x0(self, step: Tensor, x0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(shift, scale, std)``: the step's mean from x0 is ``shift + scale * x`` (this is how
        :meth:`transition_from_x0` computes it, so a caller batching ``shift`` over many steps
        gets the same bits). With a learned variance ``x0`` is ``[x0, v]`` and ``std`` is per element."""
        std = self.at(self.std, step, x0)
        if self.std_from_network:
            x0, v = torch.split(x0, x0.shape[1] // 2, dim=1)
            std = self._learned_std(v, step, std)
        if self.thresholding:
            x0 = threshold_sample(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        elif self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return self.rows(self.coef_x0, step, x0) * x0, self.rows(self.coef_x, step, x0), std

    def _learned_std(self, v: Tensor, step: Tensor, noisy: Tensor) -> Tensor:
        """The per-element std of a learned variance, with diffusers' operations (0 where ``t = 0``)."""
        if self.variance_type == "learned":
            std = v**0.5
        else:
            frac = (v + 1) / 2
            max_log, min_log = self.rows(self.max_log, step, v), self.rows(self.min_log, step, v)
            std = torch.exp(0.5 * (frac * max_log + (1 - frac) * min_log))
        return torch.where(noisy.view(-1, *[1] * (v.ndim - 1)) > 0, std, 0.0)

    def transition_from_x0(self, x: Tensor, step: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
        shift, scale, std = self.affine_from_x0(step, x0)
        return shift + scale * x, std

    def transition(self, x: Tensor, step: Tensor, prediction: Tensor, previous: Tensor | None = None):
        return self.transition_from_x0(x, step, self.x0_from_output(prediction, x, step))
