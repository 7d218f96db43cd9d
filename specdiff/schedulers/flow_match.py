"""Flow matching (rectified flow) steps: two diffusers schedulers and our own SDE scheduler.

Flow models (SD3, FLUX, LTX-Video) interpolate ``x_t = (1 - t) x0 + t eps`` with ``t = sigma``
in [0, 1] and predict the velocity ``v = eps - x0``, so ``x0 = x - sigma v`` and
``eps = x + (1 - sigma) v``. Their default sampler, the Euler ODE step
``x + (sigma_next - sigma) v`` of ``FlowMatchEulerDiscreteScheduler``, is deterministic: given
the model output there is nothing for a coupling to accept or correct. Three stochastic
samplers are Gaussian given the model output, and have adapters here:

* ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``: re-noise the predicted x0
  to the next level, ``mean = (1 - sigma_next) x0``, ``std = sigma_next``.
* ``LTXEulerAncestralRFScheduler`` (``eta > 0``): the ancestral Euler step of k-diffusion /
  ComfyUI for rectified flows (a partial re-noising governed by ``eta``).
* :class:`FlowMatchSDEScheduler` (ours): Euler-Maruyama on the flow's reverse SDE with a
  user-set ``churn``, the marginal-preserving family between the ODE (``churn=0``) and
  strongly stochastic samplers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from .base import SWITCH, SchedulerAdapter, register_adapter, step_table

# -- our flow-matching SDE scheduler ----------------------------------------------------------------


@dataclass
class FlowMatchSDESchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class FlowMatchSDEScheduler(FlowMatchEulerDiscreteScheduler):
    r"""Euler-Maruyama on the reverse SDE of a flow-matching model, with noise level ``churn``.

    The law. With ``x_t = (1 - t) x0 + t eps`` and the model's velocity ``v``, the score is
    ``grad log p_t(x) = -eps_hat / t`` with ``eps_hat = x + (1 - t) v``. For any noise
    ``g(t)``, the reverse-time SDE (``t`` decreasing)

        dx = [v + g(t)^2 / (2 t) eps_hat] dt + g(t) dW

    has the same marginals ``p_t`` as the probability-flow ODE ``dx = v dt`` (the Fokker-Planck
    equations agree). We take ``g(t)^2 = 2 churn t^2``, the noise relative to the current
    level, so one Euler-Maruyama step from ``sigma`` to ``sigma_next`` (``h = sigma - sigma_next``) is

        x_next = x + (sigma_next - sigma) v - churn sigma h eps_hat + sigma sqrt(2 churn h) z,

    a Gaussian kernel with ``mean = x + (sigma_next - sigma) v - churn sigma h eps_hat`` and
    ``std = sigma sqrt(2 churn h)`` fixed by the schedule, which is what speculative sampling
    needs (larger ``churn`` = more noise per step = higher acceptance; it also changes the
    sampler's discretisation error, not its continuous-time law). The last step (to
    ``sigma = 0``) is the plain Euler step, which lands on the predicted x0 without noise.
    ``churn = 0`` is exactly ``FlowMatchEulerDiscreteScheduler``'s deterministic Euler step.

    Timesteps and sigmas (shift, dynamic shifting with ``mu``, Karras/exponential/beta
    sigmas) are ``FlowMatchEulerDiscreteScheduler``'s, so
    ``FlowMatchSDEScheduler.from_config(pipe.scheduler.config, churn=0.5)`` converts an SD3 or
    FLUX pipeline's scheduler.
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        churn: float = 0.5,
    ):
        if not churn >= 0:
            raise ValueError(f"churn must be >= 0 (0 is the deterministic Euler ODE step); got {churn!r}")
        super().__init__(
            num_train_timesteps=num_train_timesteps, shift=shift, use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift, max_shift=max_shift, base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len, shift_terminal=shift_terminal, use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas, use_beta_sigmas=use_beta_sigmas,
            time_shift_type=time_shift_type,
        )  # fmt: skip

    def step_coefficients(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(dt, c_eps, std)`` of step ``index``: ``mean = x + dt v - c_eps eps_hat``."""
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        dt = sigma_next - sigma
        if sigma_next == 0:  # the last step: plain Euler, onto the predicted x0
            return dt, torch.zeros(()), torch.zeros(())
        h = sigma - sigma_next
        churn = self.config.churn
        return dt, churn * sigma * h, sigma * (2 * churn * h) ** 0.5

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        **kwargs,
    ) -> FlowMatchSDESchedulerOutput | tuple:
        """One Euler-Maruyama step (see the class docstring); noise from ``generator``."""
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError("pass one of scheduler.timesteps as timestep, not an integer index")
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        dt, c_eps, std = self.step_coefficients(self.step_index)
        x = sample.to(torch.float32)  # as FlowMatchEulerDiscreteScheduler: step in float32
        v = model_output.to(torch.float32)
        prev = x + dt * v
        if std > 0:
            eps_hat = x + (1 - sigma) * v
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            prev = prev - c_eps * eps_hat + std * noise
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        x0 = (x - sigma * v).to(model_output.dtype)
        if not return_dict:
            return (prev, x0)
        return FlowMatchSDESchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# -- adapters ------------------------------------------------------------------------------------------


class _FlowAdapter(SchedulerAdapter):
    """Shared by the flow adapters: velocity prediction, ``x = (1 - sigma) x0 + sigma eps``,
    the network sees the state unscaled, at the scheduler's (float) timesteps."""

    prediction_types = ("flow_prediction",)

    def __init__(self, scheduler):
        self.check(scheduler)
        super().__init__(scheduler)
        self.prediction_type = "flow_prediction"
        sigmas = scheduler.sigmas.detach().cpu()
        if scheduler.timesteps is not None and len(sigmas) == self.num_steps:
            # LTX with explicit sigmas: the timesteps include the terminal 0, whose step() is a no-op.
            self.timesteps, self.num_steps = self.timesteps[:-1], self.num_steps - 1
        if scheduler.timesteps is None or len(sigmas) != self.num_steps + 1:
            raise ValueError(
                f"{self.scheduler_name} needs one more sigma than timesteps (call set_timesteps first)"
            )
        self.all_sigmas = sigmas
        self.sigmas = sigmas[:-1].clone()

    @classmethod
    def check(cls, scheduler, **options) -> None:
        if scheduler.config.get("invert_sigmas", False):
            raise ValueError(f"{type(scheduler).__name__} with invert_sigmas=True (Mochi) is not supported")

    def signal_and_noise(self, step: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        sigma = self.rows(self.sigmas, step, like)
        return 1 - sigma, sigma

    def x0_from_output(self, model_output: Tensor, x: Tensor, step: Tensor) -> Tensor:
        # diffusers upcasts to float32 for the step
        return x.to(torch.float32) - self.rows(self.sigmas, step, x) * model_output.to(torch.float32)

    def transition(self, x: Tensor, step: Tensor, prediction: Tensor, previous: Tensor | None = None):
        return self.transition_from_x0(x, step, self.x0_from_output(prediction, x, step))


_USE_STOCHASTIC = (
    "Use FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=True), "
    "or specdiff's FlowMatchSDEScheduler.from_config(pipe.scheduler.config, churn=0.5); " + SWITCH
)


@register_adapter("FlowMatchEulerDiscreteScheduler")
class FlowMatchEulerAdapter(_FlowAdapter):
    """``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``: ``x_next = (1 - s') x0 + s' z``."""

    support = "`stochastic_sampling=True` (SD3/FLUX flow matching), shifts, Karras/exponential/beta sigmas"

    @classmethod
    def check(cls, scheduler, **options) -> None:
        super().check(scheduler)
        if not scheduler.config.get("stochastic_sampling", False):
            raise ValueError(
                "FlowMatchEulerDiscreteScheduler with stochastic_sampling=False is a deterministic (ODE) solver: "
                "given the model output its step has no noise, so there is nothing for a maximal coupling to "
                f"accept or correct. {_USE_STOCHASTIC}"
            )

    def __init__(self, scheduler):
        super().__init__(scheduler)
        sigma_next = self.all_sigmas[1:]
        self.coef_x0 = step_table([1.0 - s for s in sigma_next])
        self.std = sigma_next.clone()

    def transition_from_x0(self, x: Tensor, step: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
        return self.rows(self.coef_x0, step, x) * x0, self.at(self.std, step, x)


@register_adapter("LTXEulerAncestralRFScheduler")
class LTXEulerAncestralAdapter(_FlowAdapter):
    """``LTXEulerAncestralRFScheduler`` (``eta > 0``): with ``sigma_down = sigma_next (1 + (sigma_next /
    sigma - 1) eta)``, ``mean = (1 - sigma_next) / (1 - sigma_down) [r x + (1 - r) x0]`` where
    ``r = sigma_down / sigma``, and ``std = s_noise sqrt(sigma_next^2 - sigma_down^2 (1 - sigma_next)^2 /
    (1 - sigma_down)^2)``; the last step (to 0) lands on x0."""

    support = "`eta > 0`, custom sigmas"

    @classmethod
    def check(cls, scheduler, **options) -> None:
        super().check(scheduler)
        if not (scheduler.config.eta > 0 and scheduler.config.s_noise > 0):
            raise ValueError(
                "LTXEulerAncestralRFScheduler with eta=0 or s_noise=0 is deterministic: given the model output its "
                "step has no noise, so there is nothing for a maximal coupling to accept or correct. Use eta > 0 "
                "(eta=1.0 is its default)"
            )

    def __init__(self, scheduler):
        super().__init__(scheduler)
        eta, s_noise = float(self.config.eta), float(self.config.s_noise)
        ratio, coef, std = [], [], []
        for k in range(self.num_steps):
            # Same operations, in the same order, as LTXEulerAncestralRFScheduler.step.
            sigma, sigma_next = self.all_sigmas[k], self.all_sigmas[k + 1]
            if sigma_next.abs().item() < 1e-8:
                ratio.append(torch.zeros(())), coef.append(torch.ones(())), std.append(torch.zeros(()))
                continue
            sigma_down = sigma_next * (1.0 + (sigma_next / sigma - 1.0) * eta)
            alpha_next, alpha_down = 1.0 - sigma_next, 1.0 - sigma_down
            ratio.append(sigma_down / sigma)
            coef.append(alpha_next / (alpha_down + 1e-12))
            renoise = (sigma_next**2 - sigma_down**2 * alpha_next**2 / (alpha_down**2 + 1e-12)).clamp(min=0.0).sqrt()
            std.append(renoise * s_noise)
        self.ratio, self.coef, self.std = step_table(ratio), step_table(coef), step_table(std)

    def transition_from_x0(self, x: Tensor, step: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
        ratio = self.rows(self.ratio, step, x)
        mean = ratio * x.to(torch.float32) + (1.0 - ratio) * x0
        # The last step is x0 itself (ratio 0, coef 1); multiplying by 1 keeps it exact.
        return self.rows(self.coef, step, x) * mean, self.at(self.std, step, x)


@register_adapter("FlowMatchSDEScheduler")
class FlowMatchSDEAdapter(_FlowAdapter):
    """:class:`FlowMatchSDEScheduler` (``churn > 0``): ``mean = x + dt v - c_eps eps_hat``."""

    support = "specdiff's flow-matching SDE, `churn > 0` (Euler–Maruyama; best for speculation)"

    native_prediction = "model_output"

    @classmethod
    def check(cls, scheduler, **options) -> None:
        super().check(scheduler)
        if not scheduler.config.churn > 0:
            raise ValueError(
                "FlowMatchSDEScheduler with churn=0 is the deterministic Euler ODE step: there is nothing for a "
                "maximal coupling to accept or correct. Use churn > 0 (e.g. churn=0.5)"
            )

    def __init__(self, scheduler):
        super().__init__(scheduler)
        tables = [scheduler.step_coefficients(k) for k in range(self.num_steps)]
        self.dt, self.c_eps, self.std = (step_table(list(column)) for column in zip(*tables))

    def transition(self, x: Tensor, step: Tensor, prediction: Tensor, previous: Tensor | None = None):
        sample, v = x.to(torch.float32), prediction.to(torch.float32)
        sigma = self.rows(self.sigmas, step, x)
        mean = sample + self.rows(self.dt, step, x) * v
        eps_hat = sample + (1 - sigma) * v
        # Rows at the last step have c_eps = 0: subtracting 0 * eps_hat leaves the Euler step exact.
        mean = mean - self.rows(self.c_eps, step, x) * eps_hat
        return mean, self.at(self.std, step, x)

    def transition_from_x0(self, x: Tensor, step: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
        v = (x.to(torch.float32) - x0) / self.rows(self.sigmas, step, x)
        return self.transition(x, step, v)
