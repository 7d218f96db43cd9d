"""DDIM step with ``eta > 0`` (Song et al. 2021, eq. 12 and 16) for ``DDIMScheduler``.

    x0, eps from the model output; x0 clipped or thresholded (eps re-derived from the
            clipped x0 only with use_clipped_model_output)
    std     = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    mean    = sqrt(a_prev) * x0 + sqrt(1 - a_prev - std^2) * eps

``t_prev`` is the next entry of ``scheduler.timesteps`` (``final_alpha_cumprod`` after the
last). diffusers' ``DDIMScheduler.step`` instead uses the stride formula
``t - num_train_timesteps // num_inference_steps``, which agrees with the schedule for
``timestep_spacing="leading"`` (the default; there the adapter equals ``step()`` bit for
bit) but not in general for ``"trailing"`` or ``"linspace"``, where ``step()`` jumps to a
timestep that is not the next one in the schedule (diffusers issues #11347, #12633). For
those spacings the adapter takes the mathematically correct step between consecutive
scheduled timesteps, so it differs from ``step()``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SWITCH, SchedulerAdapter, register_adapter, step_table, threshold_sample


@register_adapter("DDIMScheduler", "DDIMParallelScheduler")
class DDIMAdapter(SchedulerAdapter):
    """Gaussian step of ``DDIMScheduler`` with ``eta > 0`` (``eta`` is a ``step()`` argument in
    diffusers, so it is passed here explicitly)."""

    options = ("eta", "use_clipped_model_output")
    support = "`eta > 0` (a step option: `from_scheduler(s, eta=1.0)`); every prediction type, clipping, thresholding"

    @classmethod
    def check(cls, scheduler, eta: float | None = None, use_clipped_model_output: bool | None = None) -> None:
        super().check(scheduler)
        if eta is None or eta <= 0:
            raise ValueError(
                f"DDIMScheduler with eta={eta or 0.0} is deterministic: given the model output its step adds no "
                "noise, so there is nothing to speculate on. Pass eta > 0 (eta=1.0 is DDPM's posterior "
                "variance on the DDIM timesteps), or use DDPMScheduler; " + SWITCH
            )
        if eta > 1:
            raise ValueError(f"DDIM eta must be in (0, 1]; got {eta} (sqrt(1 - a_prev - std^2) would be NaN)")

    def __init__(self, scheduler, eta: float | None = None, use_clipped_model_output: bool | None = None):
        self.check(scheduler, eta=eta)
        super().__init__(scheduler)
        if scheduler.num_inference_steps is None:
            raise ValueError("call scheduler.set_timesteps(num_inference_steps) before building the DDIM adapter")
        cfg = scheduler.config
        self.eta = float(eta)
        self.use_clipped_model_output = bool(use_clipped_model_output)
        self.clip_sample, self.clip_sample_range = cfg.clip_sample, cfg.clip_sample_range
        self.thresholding = cfg.thresholding
        self.dynamic_thresholding_ratio, self.sample_max_value = cfg.dynamic_thresholding_ratio, cfg.sample_max_value

        alphas_cumprod = scheduler.alphas_cumprod.detach().cpu()
        final = torch.as_tensor(scheduler.final_alpha_cumprod)
        timesteps = [int(t) for t in self.timesteps]
        sqrt_a, sqrt_b, sqrt_a_prev, coef_eps, std = [], [], [], [], []
        for k, t in enumerate(timesteps):
            t_prev = timesteps[k + 1] if k + 1 < len(timesteps) else -1
            # Same operations, in the same order, as DDIMScheduler.step / _get_variance.
            a_t = alphas_cumprod[t]
            a_prev = alphas_cumprod[t_prev] if t_prev >= 0 else final
            b_t, b_prev = 1 - a_t, 1 - a_prev
            variance = (b_prev / b_t) * (1 - a_t / a_prev)
            std_t = self.eta * variance ** (0.5)
            sqrt_a.append(a_t ** (0.5))
            sqrt_b.append(b_t ** (0.5))
            sqrt_a_prev.append(a_prev ** (0.5))
            coef_eps.append((1 - a_prev - std_t**2) ** (0.5))
            std.append(std_t)
        self.sqrt_a, self.sqrt_b, self.sqrt_a_prev = step_table(sqrt_a), step_table(sqrt_b), step_table(sqrt_a_prev)
        self.coef_eps, self.std = step_table(coef_eps), step_table(std)
        if not torch.isfinite(self.coef_eps).all():
            raise ValueError(f"eta={eta} gives NaN DDIM coefficients on this schedule; use a smaller eta")

    def signal_and_noise(self, step: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        return self.rows(self.sqrt_a, step, like), self.rows(self.sqrt_b, step, like)

    def x0_from_output(self, model_output: Tensor, x: Tensor, step: Tensor) -> Tensor:
        """Predicted x0 (DDIM eq. 12), before clipping."""
        return self._x0_eps(model_output, x, step)[0]

    def _x0_eps(self, model_output: Tensor, x: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
        sqrt_a, sqrt_b = self.signal_and_noise(step, x)
        if self.prediction_type == "epsilon":
            return (x - sqrt_b * model_output) / sqrt_a, model_output
        if self.prediction_type == "sample":
            return model_output, (x - sqrt_a * model_output) / sqrt_b
        # v_prediction
        return sqrt_a * x - sqrt_b * model_output, sqrt_a * model_output + sqrt_b * x

    def transition(self, x: Tensor, step: Tensor, prediction: Tensor, previous: Tensor | None = None):
        return self._step(x, step, *self._x0_eps(prediction, x, step))

    def transition_from_x0(self, x: Tensor, step: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
        sqrt_a, sqrt_b = self.signal_and_noise(step, x)
        return self._step(x, step, x0, (x - sqrt_a * x0) / sqrt_b)

    def _step(self, x: Tensor, step: Tensor, x0: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        if self.thresholding:
            x0 = threshold_sample(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        elif self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        if self.use_clipped_model_output:
            sqrt_a, sqrt_b = self.signal_and_noise(step, x)
            eps = (x - sqrt_a * x0) / sqrt_b
        mean = self.rows(self.sqrt_a_prev, step, x) * x0 + self.rows(self.coef_eps, step, x) * eps
        return mean, self.at(self.std, step, x)
