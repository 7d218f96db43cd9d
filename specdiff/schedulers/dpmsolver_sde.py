"""SDE-DPM-Solver++ (Lu et al. 2022, "DPM-Solver++", the SDE variant; a.k.a. DPM++ 2M SDE)
for ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")``, solver order 1 and 2.

With ``alpha, sigma`` the VP scales of a noise level, ``lambda = log(alpha / sigma)``,
``h = lambda_to - lambda_from`` and ``D0`` the data prediction (x0) at the current state:

    first order    mean = sigma_to / sigma_from * e^{-h} x + alpha_to (1 - e^{-2h}) D0
    second order   mean = first order + c * (D0 - D1) / r0,     r0 = h_prev / h
                   c = alpha_to (1 - e^{-2h}) / 2                       (midpoint)
                   c = alpha_to ((1 - e^{-2h}) / (-2h) + 1)             (heun)
    std            = sigma_to sqrt(1 - e^{-2h})

``D1`` is the data prediction of the *previous* step, so the chain carries data predictions
(``prediction()`` converts the model output exactly as ``convert_model_output`` does,
thresholding included) and sets ``uses_previous_prediction``. As in diffusers, the first
step is first order, and so is the last when ``lower_order_final`` applies (fewer than 15
steps, ``euler_at_final``, or ``final_sigmas_type="zero"``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SWITCH, SchedulerAdapter, register_adapter, step_table, threshold_sample


@register_adapter("DPMSolverMultistepScheduler")
class DPMSolverSDEAdapter(SchedulerAdapter):
    """Gaussian step of ``DPMSolverMultistepScheduler`` with ``algorithm_type="sde-dpmsolver++"``."""

    support = '`algorithm_type="sde-dpmsolver++"`, `solver_order` 1 or 2 (midpoint/heun), Karras/flow sigmas'
    uses_previous_prediction = True
    native_prediction = "sample"  # the chain carries x0 (DPM-Solver++'s data prediction)
    prediction_types = ("epsilon", "sample", "v_prediction", "flow_prediction")

    @classmethod
    def check(cls, scheduler, **options) -> None:
        super().check(scheduler)
        cfg = scheduler.config
        if cfg.algorithm_type == "dpmsolver++" or cfg.algorithm_type == "dpmsolver":
            raise ValueError(
                f"DPMSolverMultistepScheduler with algorithm_type={cfg.algorithm_type!r} is a deterministic (ODE) "
                "solver: its step adds no noise, so there is nothing to speculate on. Use "
                "algorithm_type='sde-dpmsolver++' (DPM++ SDE), e.g. "
                "DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type='sde-dpmsolver++'); " + SWITCH
            )
        if cfg.algorithm_type != "sde-dpmsolver++":
            raise ValueError(
                f"DPMSolverMultistepScheduler with algorithm_type={cfg.algorithm_type!r} is not supported "
                "(deprecated in diffusers); use algorithm_type='sde-dpmsolver++'"
            )
        if cfg.solver_order not in (1, 2):
            raise ValueError(
                f"DPMSolverMultistepScheduler with solver_order={cfg.solver_order} is not supported: a third-order "
                "step needs the two previous model outputs and the speculative chain carries one. Use "
                "solver_order=2 (DPM++ 2M SDE) or 1"
            )

    def __init__(self, scheduler):
        self.check(scheduler)
        super().__init__(scheduler)
        if scheduler.num_inference_steps is None:
            raise ValueError("call scheduler.set_timesteps(num_inference_steps) before building the DPM-Solver adapter")
        cfg = scheduler.config
        self.thresholding = cfg.thresholding
        self.dynamic_thresholding_ratio, self.sample_max_value = cfg.dynamic_thresholding_ratio, cfg.sample_max_value
        self.learned_variance = cfg.variance_type in ("learned", "learned_range")
        sigmas = scheduler.sigmas.detach().cpu()
        n = self.num_steps

        def alpha_sigma(sigma: Tensor) -> tuple[Tensor, Tensor]:  # _sigma_to_alpha_sigma_t
            if cfg.use_flow_sigmas:
                return 1 - sigma, sigma
            alpha = 1 / ((sigma**2 + 1) ** 0.5)
            return alpha, sigma * alpha

        tables = {name: [] for name in ("alpha", "sigma", "coef_x", "coef_x0", "coef_d1", "inv_r0", "std", "second")}
        for k in range(n):
            # Same operations, in the same order, as step / convert_model_output / *_update.
            alpha_s0, sigma_s0 = alpha_sigma(sigmas[k])
            alpha_t, sigma_t = alpha_sigma(sigmas[k + 1])
            lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
            lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
            h = lambda_t - lambda_s0
            tables["alpha"].append(alpha_s0)
            tables["sigma"].append(sigma_s0)
            tables["coef_x"].append(sigma_t / sigma_s0 * torch.exp(-h))
            tables["coef_x0"].append(alpha_t * (1 - torch.exp(-2.0 * h)))
            tables["std"].append(sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)))
            lower_order_final = k == n - 1 and (
                cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
            )
            second = cfg.solver_order == 2 and k > 0 and not lower_order_final
            tables["second"].append(torch.tensor(second))
            if second:
                alpha_s1, sigma_s1 = alpha_sigma(sigmas[k - 1])
                lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
                r0 = (lambda_s0 - lambda_s1) / h
                tables["inv_r0"].append(1.0 / r0)
                if cfg.solver_type == "midpoint":
                    tables["coef_d1"].append(0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))))
                else:  # heun
                    tables["coef_d1"].append(alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0))
            else:
                tables["inv_r0"].append(torch.zeros(()))
                tables["coef_d1"].append(torch.zeros(()))
        for name, values in tables.items():
            setattr(self, name, step_table(values))
        self.flow = cfg.use_flow_sigmas

    def signal_and_noise(self, step: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        return self.rows(self.alpha, step, like), self.rows(self.sigma, step, like)

    def prediction(self, model_output: Tensor, x: Tensor, step: Tensor) -> Tensor:
        """The data prediction x0, as ``convert_model_output`` computes it."""
        alpha, sigma = self.signal_and_noise(step, x)
        if self.prediction_type == "epsilon":
            if self.learned_variance:
                model_output = model_output[:, :3]  # diffusers keeps the first 3 (mean) channels
            x0 = (x - sigma * model_output) / alpha
        elif self.prediction_type == "sample":
            # A copy: x0 is kept as the next step's D1, and a network may reuse its output buffer
            # (CUDA graphs, static-IO runtimes), which would silently turn D1 into the next D0.
            x0 = model_output.clone()
        elif self.prediction_type == "v_prediction":
            x0 = alpha * x - sigma * model_output
        else:  # flow_prediction: sigma_t is the raw sigma
            x0 = x - sigma * model_output
        if self.thresholding:
            x0 = threshold_sample(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        return x0

    def transition(self, x: Tensor, step: Tensor, prediction: Tensor, previous: Tensor | None = None):
        sample = x.to(torch.float32)  # diffusers upcasts the sample for this step
        mean = self.rows(self.coef_x, step, x) * sample + self.rows(self.coef_x0, step, x) * prediction
        second = self.at(self.second, step, x)
        if previous is not None and bool(second.any()):
            # D1 = (D0 - D_prev) / r0; rows at a first-order step keep the first-order mean exactly.
            d1 = self.rows(self.inv_r0, step, x) * (prediction - previous)
            mean = torch.where(second.view(-1, *[1] * (x.ndim - 1)), mean + self.rows(self.coef_d1, step, x) * d1, mean)
        elif bool(second.any()):
            raise ValueError("a second-order DPM-Solver step needs the previous data prediction (previous=)")
        return mean, self.at(self.std, step, x)
