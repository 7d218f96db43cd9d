"""Flow matching: our FlowMatchSDEScheduler's law, and speculative sampling of every flow scheduler.

Data are Gaussian (``x0 ~ N(mu, s^2)`` per coordinate), so the exact velocity
``v(x, t) = E[eps | x_t] - E[x0 | x_t]`` is known in closed form and the tests need no network.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LTXEulerAncestralRFScheduler

from specdiff.schedulers import FlowMatchSDEScheduler, SpeculativeScheduler
from specdiff.testing import assert_same_law

MU, S = 0.7, 0.4  # the data law, per coordinate
DIM = 6


def gaussian_velocity(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The exact flow velocity for x0 ~ N(MU, S^2) and x_t = (1 - t) x0 + t eps."""
    t = (timesteps.float() / 1000).view(-1, *[1] * (x.ndim - 1))
    var = (1 - t) ** 2 * S**2 + t**2
    centred = x - (1 - t) * MU
    return t * centred / var - (MU + (1 - t) * S**2 * centred / var)


def plain_loop(scheduler, x, generator, num_inference_steps):
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        x = scheduler.step(gaussian_velocity(x, t.expand(x.shape[0])), t, x, generator=generator).prev_sample
    return x


def test_churn_zero_is_the_flow_match_euler_ode_bit_for_bit():
    x = torch.randn(8, DIM, generator=torch.Generator().manual_seed(0))
    ode = plain_loop(FlowMatchEulerDiscreteScheduler(shift=3.0), x, None, 12)
    sde = plain_loop(FlowMatchSDEScheduler(shift=3.0, churn=0.0), x, torch.Generator().manual_seed(1), 12)
    assert torch.equal(ode, sde)


@pytest.mark.parametrize("churn", [0.5, 2.0])
def test_flow_sde_samples_the_data_law(churn):
    """With the exact velocity, the Euler-Maruyama chain lands near N(MU, S^2): a smoke test of the
    continuous-time law, whose KS tests do not resolve the discretisation error (a 4.6-sigma variance
    gap at 100 steps); the exact discrete-time law is tested in
    test_flow_sde_has_the_exact_law_of_its_discretised_chain."""
    n = 4000
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(2))
    out = plain_loop(FlowMatchSDEScheduler(churn=churn), x, torch.Generator().manual_seed(3), 100)
    exact = MU + S * torch.randn(n, DIM, generator=torch.Generator().manual_seed(4))
    assert_same_law(out, exact, alpha=1e-3)


def test_flow_sde_scheduler_converts_from_a_flow_pipeline_config_and_reloads(tmp_path):
    base = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.4)
    sde = FlowMatchSDEScheduler.from_config(base.config, churn=0.8)
    assert sde.config.shift == 3.0 and sde.config.base_shift == 0.4 and sde.config.churn == 0.8
    spec = SpeculativeScheduler.from_scheduler(sde, window=4)
    spec.save_pretrained(tmp_path)
    loaded = SpeculativeScheduler.from_pretrained(tmp_path)
    assert isinstance(loaded.base_scheduler, FlowMatchSDEScheduler) and loaded.base_scheduler.config.churn == 0.8


SCHEDULERS = {
    "flow-euler-stochastic": lambda: FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=2.0),
    "ltx-euler-ancestral-rf": lambda: LTXEulerAncestralRFScheduler(eta=1.0),
    "flow-sde": lambda: FlowMatchSDEScheduler(churn=1.0, shift=2.0),
}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_speculative_flow_sampler_has_the_law_of_the_plain_one(name):
    spec = SpeculativeScheduler.from_scheduler(SCHEDULERS[name](), window=4)
    n = 2000
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(5))

    # A draft velocity that is off, so that rejections (reflections) happen.
    def draft(x, t):
        return 1.1 * gaussian_velocity(x, t) + 0.05

    out = spec.sample(
        gaussian_velocity, x, num_inference_steps=20, drafter=draft, generator=torch.Generator().manual_seed(6)
    )
    plain = spec.sample_baseline(
        gaussian_velocity, x, num_inference_steps=20, generator=torch.Generator().manual_seed(7)
    )
    assert 0 < out.stats.acceptance_rate < 1 and out.stats.target_calls < 20
    assert_same_law(out.sample, plain, alpha=1e-3)
    window_one = spec.sample(
        gaussian_velocity, x, num_inference_steps=20, window=1, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(window_one.sample, plain)


# -- the discrete chain's exact law -----------------------------------------------------------------
# The velocity above is affine in x, v = a(t) x + b(t), so each Euler-Maruyama step is the affine
# Gaussian map x -> A x + B + std z and the output of the *discretised* chain is exactly
# N(m_N, V_N) per coordinate, with (m, V) <- (A m + B, A^2 V + std^2) from N(0, 1). Testing against
# that law, not the continuous-time N(MU, S^2), catches a drift or churn coefficient that is off by
# the order of the discretisation error (at 20 steps the two variances are > 10 test sigmas apart).

# Two-sided z-tests at 4 sigma (alpha = 6.3e-5 each); 2 churns x 2 samplers x 2 moments = 8 tests,
# family-wise alpha < 1e-3.
Z_MAX = 4.0
MOMENT_STEPS, MOMENT_N = 20, 4000
# The chain steps in float32 (as diffusers does), so its map matches the float64 formula to float32
# rounding (measured: below 3e-7); a coefficient error of the discretisation order is ~1e-4.
STEP_ATOL = 2e-6


def velocity_affine(t: float) -> tuple[float, float]:
    """``(a, b)`` with ``gaussian_velocity(x, t) = a x + b`` (t in [0, 1]), in float64."""
    var = (1 - t) ** 2 * S**2 + t**2
    a = (t - (1 - t) * S**2) / var
    return a, -MU - a * (1 - t) * MU


def formula_steps(scheduler, churn: float) -> list[tuple[float, float, float]]:
    """``(A, B, std)`` per step, derived from FlowMatchSDEScheduler's documented update
    ``x + (s' - s) v - churn s h eps_hat + s sqrt(2 churn h) z`` (h = s - s', eps_hat =
    x + (1 - s) v; the last step, to s' = 0, is the plain Euler step), in float64."""
    sigmas = scheduler.sigmas.double().tolist()
    steps = []
    for k, t in enumerate(scheduler.timesteps.double().tolist()):
        a, b = velocity_affine(t / 1000)  # the velocity sees the timestep, the step uses sigma
        s, s_next = sigmas[k], sigmas[k + 1]
        h = s - s_next
        c_eps, std = (churn * s * h, s * math.sqrt(2 * churn * h)) if s_next > 0 else (0.0, 0.0)
        steps.append((1 - h * a - c_eps * (1 + (1 - s) * a), -h * b - c_eps * (1 - s) * b, std))
    return steps


def chain_steps(chain, points: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The chain's own ``(mean, std)`` at each step for the states ``points`` (one per row)."""
    out = []
    for k in range(chain.num_steps):
        step = torch.full((len(points),), k)
        out.append(chain.transition(points, step, chain.predict(points, step)))
    return out


def output_moments(steps) -> tuple[float, float]:
    mean, var = 0.0, 1.0  # the latents are N(0, 1)
    for scale, shift, std in steps:
        mean, var = scale * mean + shift, scale**2 * var + std**2
    return mean, var


def moment_z_scores(sample: torch.Tensor, mean: float, var: float) -> tuple[float, float]:
    """z-scores of the sample mean and variance (pooled over coordinates, which are i.i.d.)
    under N(mean, var): the output of the affine-Gaussian chain is exactly Gaussian."""
    flat = sample.double().flatten()
    n = flat.numel()
    return (flat.mean().item() - mean) / math.sqrt(var / n), (flat.var().item() / var - 1) / math.sqrt(2 / (n - 1))


@pytest.mark.parametrize("churn", [0.5, 2.0])
def test_flow_sde_has_the_exact_law_of_its_discretised_chain(churn):
    spec = SpeculativeScheduler.from_scheduler(FlowMatchSDEScheduler(churn=churn, shift=2.0), window=4)
    spec.set_timesteps(MOMENT_STEPS)
    formula = formula_steps(spec.base_scheduler, churn)
    # (a) Every step of the chain is the affine Gaussian map of the formula.
    points = torch.linspace(-3, 3, 7).view(-1, 1)
    chain = chain_steps(spec.chain(gaussian_velocity), points)
    for k, ((mean, std), (scale, shift, std_k)) in enumerate(zip(chain, formula)):
        expected = scale * points.double() + shift
        assert (mean.double() - expected).abs().max() < STEP_ATOL, f"step {k}: mean"
        assert (std.double() - std_k).abs().max() < STEP_ATOL, f"step {k}: std"
    # The same output law from the chain's own maps (read off at x = 0 and 1) and from the formula.
    own = [(float(m[4] - m[3]), float(m[3]), float(s[0])) for m, s in chain]  # points[3] = 0, [4] = 1
    mean, var = output_moments(formula)
    assert output_moments(own) == pytest.approx((mean, var), abs=10 * STEP_ATOL)
    # Power: the continuous-time law N(MU, S^2) is far outside the acceptance region.
    scalars = MOMENT_N * DIM
    assert abs(S**2 / var - 1) / math.sqrt(2 / (scalars - 1)) > 2 * Z_MAX
    # (b) The plain and the speculative sampler's moments are the chain's.
    x = torch.randn(MOMENT_N, DIM, generator=torch.Generator().manual_seed(8))
    run = {"num_inference_steps": MOMENT_STEPS}
    plain = spec.sample_baseline(gaussian_velocity, x, generator=torch.Generator().manual_seed(9), **run)

    def draft(x, t):
        return 1.1 * gaussian_velocity(x, t) + 0.05

    out = spec.sample(gaussian_velocity, x, drafter=draft, generator=torch.Generator().manual_seed(10), **run)
    assert out.stats.proposed - out.stats.accepted >= MOMENT_N  # rejections on every row, on average
    for name, sample in (("plain", plain), ("speculative", out.sample)):
        z_mean, z_var = moment_z_scores(sample, mean, var)
        assert abs(z_mean) < Z_MAX and abs(z_var) < Z_MAX, f"{name}: z(mean) = {z_mean:.2f}, z(var) = {z_var:.2f}"
