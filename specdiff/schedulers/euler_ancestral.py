"""Euler ancestral step (Karras et al. 2022 / k-diffusion ``sample_euler_ancestral``) for
``EulerAncestralDiscreteScheduler``.

In sigma space (``x = x0 + sigma * eps``), from ``sigma = sigmas[k]`` to ``sigma_to = sigmas[k+1]``:

    sigma_up   = sqrt(sigma_to^2 (sigma^2 - sigma_to^2) / sigma^2)
    sigma_down = sqrt(sigma_to^2 - sigma_up^2)
    mean       = x + (x - x0) / sigma * (sigma_down - sigma)
    std        = sigma_up

The network sees ``x / sqrt(sigma^2 + 1)`` (``scale_model_input``), per row. The step index
is the row's own, never the scheduler's ``_step_index`` counter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SchedulerAdapter, register_adapter, step_table


@register_adapter("EulerAncestralDiscreteScheduler")
class EulerAncestralAdapter(SchedulerAdapter):
    """Gaussian step of ``EulerAncestralDiscreteScheduler`` (epsilon or v_prediction)."""

    prediction_types = ("epsilon", "v_prediction")  # diffusers raises for "sample"
    support = "epsilon and v prediction, every sigma schedule"

    def __init__(self, scheduler):
        self.check(scheduler)
        super().__init__(scheduler)
        sigmas = scheduler.sigmas.detach().cpu()
        if len(sigmas) != self.num_steps + 1:
            raise ValueError(
                f"EulerAncestralDiscreteScheduler has {len(sigmas)} sigmas for {self.num_steps} timesteps; "
                "expected one more sigma than timesteps (call set_timesteps first)"
            )
        input_scale, c_out, c_skip, dt, sigma_up = [], [], [], [], []
        for k in range(self.num_steps):
            # Same operations, in the same order, as scale_model_input / step.
            sigma, sigma_to = sigmas[k], sigmas[k + 1]
            input_scale.append((sigma**2 + 1) ** 0.5)
            c_out.append(-sigma / (sigma**2 + 1) ** 0.5)
            c_skip.append(sigma**2 + 1)
            up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
            down = (sigma_to**2 - up**2) ** 0.5
            dt.append(down - sigma)
            sigma_up.append(up)
        self.sigmas = sigmas[:-1].clone()
        self.input_scale, self.c_out, self.c_skip = step_table(input_scale), step_table(c_out), step_table(c_skip)
        self.dt, self.sigma_up = step_table(dt), step_table(sigma_up)

    def scale_model_input(self, x: Tensor, step: Tensor) -> Tensor:
        # In the latents' dtype, as diffusers returns it: a half-precision network refuses float32 input.
        return (x / self.rows(self.input_scale, step, x)).to(x.dtype)

    def signal_and_noise(self, step: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        sigma = self.rows(self.sigmas, step, like)
        return torch.ones_like(sigma), sigma

    def x0_from_output(self, model_output: Tensor, x: Tensor, step: Tensor) -> Tensor:
        sample = x.to(torch.float32)  # diffusers upcasts the sample for this step
        if self.prediction_type == "epsilon":
            return sample - self.rows(self.sigmas, step, x) * model_output
        # v_prediction: c_out * v + c_skip * x
        return model_output * self.rows(self.c_out, step, x) + (sample / self.rows(self.c_skip, step, x))

    def transition_from_x0(self, x: Tensor, step: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
        sample = x.to(torch.float32)
        derivative = (sample - x0) / self.rows(self.sigmas, step, x)
        mean = sample + derivative * self.rows(self.dt, step, x)
        return mean, self.at(self.sigma_up, step, x)

    def transition(self, x: Tensor, step: Tensor, prediction: Tensor, previous: Tensor | None = None):
        return self.transition_from_x0(x, step, self.x0_from_output(prediction, x, step))
