"""Every scheduler adapter reproduces its diffusers scheduler's own ``step()``.

For each supported configuration we run diffusers' plain loop (``scale_model_input`` ->
model -> ``step(generator=...)``) and the adapter's chain through ``sample_baseline`` with
the same seeded generator, and require the trajectories to be bit-identical. A second
check evaluates the adapter on ONE batch whose rows sit at different steps (as in a
speculative verification call) and requires each row to land on the recorded next state.
Unsupported configurations must raise an error that says why and what to use instead.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LTXEulerAncestralRFScheduler,
    PNDMScheduler,
)

from specdiff import sample_baseline, speculative_sample
from specdiff.schedulers import (
    FlowMatchSDEScheduler,
    SchedulerChain,
    SpeculativeScheduler,
    adapter_for,
    supported_schedulers,
)

SHAPE = (2, 3, 4, 4)


def toy_model(x, t):
    """A deterministic, nonlinear, row-wise 'network' that depends on each row's timestep;
    large enough that clipping and thresholding of x0 are active at high noise."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *[1] * (x.ndim - 1))
    return 1.5 * torch.tanh(0.7 * x + torch.sin(t / 97.0)) + 0.1 * torch.cos(3 * x)


def ddpm(**kw):
    return DDPMScheduler(num_train_timesteps=1000, **kw)


def ddim(**kw):
    return DDIMScheduler(num_train_timesteps=1000, **kw)


def euler(**kw):
    return EulerAncestralDiscreteScheduler(num_train_timesteps=1000, **kw)


def dpm(**kw):
    return DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="sde-dpmsolver++", **kw)


# (id, scheduler factory, set_timesteps kwargs, step() kwargs)
CASES = []
for variance in ("fixed_small", "fixed_small_log", "fixed_large"):
    for prediction in ("epsilon", "sample", "v_prediction"):
        CASES.append(
            (
                f"ddpm-{variance}-{prediction}",
                lambda v=variance, p=prediction: ddpm(variance_type=v, prediction_type=p),
                {"num_inference_steps": 10},
                {},
            )
        )
CASES += [
    ("ddpm-no-clip", lambda: ddpm(clip_sample=False), {"num_inference_steps": 10}, {}),
    ("ddpm-thresholding", lambda: ddpm(thresholding=True, sample_max_value=1.5), {"num_inference_steps": 10}, {}),
    ("ddpm-clip-range-2", lambda: ddpm(clip_sample_range=2.0), {"num_inference_steps": 10}, {}),
    ("ddpm-leading-offset1", lambda: ddpm(steps_offset=1), {"num_inference_steps": 10}, {}),
    ("ddpm-trailing-13", lambda: ddpm(timestep_spacing="trailing"), {"num_inference_steps": 13}, {}),
    ("ddpm-linspace-13", lambda: ddpm(timestep_spacing="linspace"), {"num_inference_steps": 13}, {}),
    ("ddpm-custom-timesteps", lambda: ddpm(), {"timesteps": [999, 800, 650, 401, 200, 57, 10, 0]}, {}),
    (
        "ddpm-cosine-zero-snr-v",
        lambda: ddpm(
            beta_schedule="squaredcos_cap_v2",
            rescale_betas_zero_snr=True,
            prediction_type="v_prediction",
            timestep_spacing="trailing",
        ),
        {"num_inference_steps": 10},
        {},
    ),
    ("ddpm-all-train-steps", lambda: DDPMScheduler(num_train_timesteps=40), {}, {}),
]
for eta in (1.0, 0.5):
    for prediction in ("epsilon", "sample", "v_prediction"):
        CASES.append(
            (
                f"ddim-eta{eta}-{prediction}",
                lambda p=prediction: ddim(prediction_type=p),
                {"num_inference_steps": 10},
                {"eta": eta},
            )
        )
CASES += [
    (
        "ddim-thresholding",
        lambda: ddim(thresholding=True, sample_max_value=1.5),
        {"num_inference_steps": 10},
        {"eta": 1.0},
    ),
    (
        "ddim-no-clip-alpha-not-one",
        lambda: ddim(clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        {"num_inference_steps": 10},
        {"eta": 0.7},
    ),
    (
        "ddim-use-clipped-output",
        lambda: ddim(),
        {"num_inference_steps": 10},
        {"eta": 1.0, "use_clipped_model_output": True},
    ),
    ("ddim-trailing-divisible", lambda: ddim(timestep_spacing="trailing"), {"num_inference_steps": 10}, {"eta": 1.0}),
]
for prediction in ("epsilon", "v_prediction"):
    for spacing in ("linspace", "leading", "trailing"):
        CASES.append(
            (
                f"euler-a-{prediction}-{spacing}",
                lambda p=prediction, s=spacing: euler(
                    prediction_type=p, timestep_spacing=s, steps_offset=int(s == "leading")
                ),
                {"num_inference_steps": 10},
                {},
            )
        )
CASES.append(
    (
        "euler-a-scaled-linear",
        lambda: euler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        {"num_inference_steps": 7},
        {},
    )
)
for order in (1, 2):
    for solver in ("midpoint", "heun"):
        for prediction in ("epsilon", "sample", "v_prediction"):
            CASES.append(
                (
                    f"dpm-sde-o{order}-{solver}-{prediction}",
                    lambda o=order, s=solver, p=prediction: dpm(solver_order=o, solver_type=s, prediction_type=p),
                    {"num_inference_steps": 10},
                    {},
                )
            )
CASES += [
    (
        "dpm-sde-16-steps-no-lower-order-final",
        lambda: dpm(lower_order_final=False, final_sigmas_type="sigma_min"),
        {"num_inference_steps": 16},
        {},
    ),
    ("dpm-sde-16-steps-lower-order-final", lambda: dpm(final_sigmas_type="sigma_min"), {"num_inference_steps": 16}, {}),
    (
        "dpm-sde-euler-at-final",
        lambda: dpm(euler_at_final=True, lower_order_final=False, final_sigmas_type="sigma_min"),
        {"num_inference_steps": 16},
        {},
    ),
    ("dpm-sde-karras", lambda: dpm(use_karras_sigmas=True), {"num_inference_steps": 12}, {}),
    (
        "dpm-sde-thresholding",
        lambda: dpm(thresholding=True, prediction_type="epsilon", sample_max_value=1.5),
        {"num_inference_steps": 10},
        {},
    ),
    ("dpm-sde-trailing", lambda: dpm(timestep_spacing="trailing"), {"num_inference_steps": 9}, {}),
    (
        "dpm-sde-flow",
        lambda: dpm(use_flow_sigmas=True, prediction_type="flow_prediction"),
        {"num_inference_steps": 10},
        {},
    ),
]

CASES += [
    (
        "flow-euler-stochastic",
        lambda: FlowMatchEulerDiscreteScheduler(stochastic_sampling=True),
        {"num_inference_steps": 10},
        {},
    ),
    (
        "flow-euler-stochastic-shift3-karras",
        lambda: FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=3.0, use_karras_sigmas=True),
        {"num_inference_steps": 9},
        {},
    ),
    (
        "flow-euler-stochastic-dynamic-shift",
        lambda: FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, use_dynamic_shifting=True),
        {"num_inference_steps": 10, "mu": 0.8},
        {},
    ),
    ("ltx-euler-a-rf", lambda: LTXEulerAncestralRFScheduler(), {"num_inference_steps": 10}, {}),
    ("ltx-euler-a-rf-eta0.5", lambda: LTXEulerAncestralRFScheduler(eta=0.5), {"num_inference_steps": 10}, {}),
    (
        "ltx-euler-a-rf-custom-sigmas",
        lambda: LTXEulerAncestralRFScheduler(),
        {"sigmas": [1.0, 0.9, 0.7, 0.45, 0.2, 0.05, 0.0]},
        {},
    ),
    ("flow-sde-churn0.5", lambda: FlowMatchSDEScheduler(churn=0.5), {"num_inference_steps": 10}, {}),
    ("flow-sde-churn2-shift3", lambda: FlowMatchSDEScheduler(churn=2.0, shift=3.0), {"num_inference_steps": 12}, {}),
]


def diffusers_loop(scheduler, x, generator, step_kwargs, record=False):
    """diffusers' plain sampling loop; optionally records (x_k, x_{k+1}) per step."""
    states = [x]
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        output = toy_model(model_input, t.expand(x.shape[0]))
        x = scheduler.step(output, t, x, generator=generator, **step_kwargs).prev_sample
        states.append(x)
    return states if record else x


def build(factory, timestep_kwargs):
    scheduler = factory()
    if timestep_kwargs:
        scheduler.set_timesteps(**timestep_kwargs)
    return scheduler


def x_init(scheduler, seed=0):
    scale = getattr(scheduler, "init_noise_sigma", 1.0)  # flow schedulers have none: the prior is N(0, I)
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * scale


def assert_reproduces(got, want, case, frozen):
    """Bit for bit, except where the chain converts between parameterisations (DDIM carrying
    x0 rebuilds eps from it; the flow SDE carrying x0 rebuilds the velocity), which agrees to
    float rounding."""
    name, factory = case[0], case[1]
    converts = name.startswith("flow-sde") or (name.startswith("ddim") and factory().config.prediction_type != "sample")
    if frozen == "sample" and converts:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want), f"max |diff| = {(got - want).abs().max():.3g}"


FROZEN = ["model_output", "sample"]


@pytest.mark.parametrize("frozen", FROZEN)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_adapter_reproduces_scheduler_step_bit_for_bit(case, frozen):
    _, factory, timestep_kwargs, step_kwargs = case
    scheduler = build(factory, timestep_kwargs)
    chain = SchedulerChain(adapter_for(scheduler, **step_kwargs), toy_model, frozen)  # before the loop mutates it
    x = x_init(scheduler)

    expected = diffusers_loop(scheduler, x, torch.Generator().manual_seed(1), step_kwargs)
    got = sample_baseline(chain, x, generator=torch.Generator().manual_seed(1))

    assert torch.isfinite(expected).all()
    assert_reproduces(got, expected, case, frozen)


@pytest.mark.parametrize("frozen", FROZEN)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_adapter_steps_rows_at_different_steps_in_one_batch(case, frozen):
    """One transition call on rows at mixed steps (a verification batch) matches step() per row."""
    _, factory, timestep_kwargs, step_kwargs = case
    scheduler = build(factory, timestep_kwargs)
    chain = SchedulerChain(adapter_for(scheduler, **step_kwargs), toy_model, frozen)
    x = x_init(scheduler)
    states = diffusers_loop(copy.deepcopy(scheduler), x, torch.Generator().manual_seed(3), step_kwargs, record=True)
    # Replay the noise each step drew (one batch-shaped draw per step).
    replay = torch.Generator().manual_seed(3)
    noise = [torch.randn(SHAPE, generator=replay) for _ in range(chain.num_steps)]

    pairs = [(b, k) for k in range(chain.num_steps) for b in range(SHAPE[0])]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()
    rows = torch.tensor([pairs[i][0] for i in order])
    steps = torch.tensor([pairs[i][1] for i in order])
    xs = torch.stack([states[k][b] for b, k in zip(rows.tolist(), steps.tolist())])
    prediction = chain.predict(xs, steps)
    previous = chain.predict(
        torch.stack([states[max(k - 1, 0)][b] for b, k in zip(rows.tolist(), steps.tolist())]), (steps - 1).clamp(min=0)
    )
    previous = torch.where((steps > 0).view(-1, 1, 1, 1), previous, prediction)
    mean, std = chain.transition(xs, steps, prediction, previous=previous)
    z = torch.stack([noise[k][b] for b, k in zip(rows.tolist(), steps.tolist())])
    got = (mean + std.view(-1, 1, 1, 1) * z).to(xs.dtype)
    want = torch.stack([states[k + 1][b] for b, k in zip(rows.tolist(), steps.tolist())])
    # DDPM draws no noise at t = 0; the replayed tensor there is unused (std = 0).
    assert_reproduces(got, want, case, frozen)


def test_adapter_never_mutates_the_live_scheduler():
    scheduler = dpm(solver_order=2)
    scheduler.set_timesteps(10)
    before = (
        scheduler.step_index,
        scheduler.lower_order_nums,
        list(scheduler.model_outputs),
        scheduler.timesteps.clone(),
    )
    chain = SchedulerChain(adapter_for(scheduler), toy_model)
    sample_baseline(chain, torch.randn(SHAPE), generator=torch.Generator().manual_seed(0))
    assert (scheduler.step_index, scheduler.lower_order_nums, list(scheduler.model_outputs)) == before[:3]
    assert torch.equal(scheduler.timesteps, before[3])


# -- DDIM off the "leading" spacing: the mathematically correct step ------------------------------


def ddim_reference(scheduler, x, generator, eta):
    """DDIM (Song et al. eq. 12, 16) in float64 between CONSECUTIVE scheduled timesteps."""
    ab = scheduler.alphas_cumprod.double()
    ts = scheduler.timesteps.tolist()
    x = x.double()
    for k, t in enumerate(ts):
        a_t = ab[t]
        a_prev = ab[ts[k + 1]] if k + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        eps = toy_model(x.float(), torch.full((x.shape[0],), t)).double()
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        z = torch.randn(x.shape, generator=generator).double()
        x = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps + std * z
    return x


@pytest.mark.parametrize("spacing,steps", [("trailing", 13), ("linspace", 13), ("linspace", 10)])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_adapter_takes_the_correct_step_where_diffusers_stride_is_wrong(spacing, steps, eta):
    scheduler = ddim(timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    stride = scheduler.config.num_train_timesteps // steps
    gaps = (scheduler.timesteps[:-1] - scheduler.timesteps[1:]).tolist()
    assert any(g != stride for g in gaps), "this case should exercise diffusers' stride bug"

    x = x_init(scheduler)
    chain = SchedulerChain(adapter_for(scheduler, eta=eta), toy_model)
    got = sample_baseline(chain, x, generator=torch.Generator().manual_seed(5))
    want = ddim_reference(scheduler, x, torch.Generator().manual_seed(5), eta)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    # ...and diffusers' own step() does not take that step.
    plain = diffusers_loop(scheduler, x, torch.Generator().manual_seed(5), {"eta": eta})
    assert (plain.double() - want).abs().max() > 1e-3


def test_ddim_eta_one_equals_ddpm_posterior_on_the_same_timesteps():
    """Mathematical cross-check: DDIM with eta = 1 is DDPM's posterior step (no clipping)."""
    d = ddim(timestep_spacing="linspace", clip_sample=False)
    d.set_timesteps(13)
    p = ddpm(clip_sample=False)
    p.set_timesteps(timesteps=d.timesteps.tolist())
    x = x_init(d)
    got = sample_baseline(
        SchedulerChain(adapter_for(d, eta=1.0), toy_model), x, generator=torch.Generator().manual_seed(2)
    )
    want = sample_baseline(SchedulerChain(adapter_for(p), toy_model), x, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# -- re-parameterised frozen predictions keep the chain ---------------------------------------------


@pytest.mark.parametrize("frozen", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize(
    "factory,step_kwargs",
    [
        (lambda: ddpm(), {}),
        (lambda: ddpm(prediction_type="v_prediction"), {}),
        (lambda: ddim(prediction_type="sample"), {"eta": 1.0}),
        (lambda: euler(), {}),
        (lambda: euler(prediction_type="v_prediction"), {}),
    ],
    ids=["ddpm-eps", "ddpm-v", "ddim-sample", "euler-eps", "euler-v"],
)
def test_frozen_prediction_reparameterisation_keeps_the_same_chain(factory, step_kwargs, frozen):
    scheduler = build(factory, {"num_inference_steps": 10})
    x = x_init(scheduler)
    plain = SchedulerChain(adapter_for(scheduler, **step_kwargs), toy_model, "model_output")
    reparam = SchedulerChain(adapter_for(scheduler, **step_kwargs), toy_model, frozen_prediction=frozen)
    a = sample_baseline(plain, x, generator=torch.Generator().manual_seed(4))
    b = sample_baseline(reparam, x, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "case",
    [
        c
        for c in CASES
        if c[0]
        in (
            "ddpm-fixed_small-epsilon",
            "ddim-eta1.0-epsilon",
            "euler-a-epsilon-linspace",
            "dpm-sde-o2-midpoint-epsilon",
        )
    ],
    ids=lambda c: c[0],
)
def test_speculative_window_one_reproduces_diffusers_loop(case):
    _, factory, timestep_kwargs, step_kwargs = case
    scheduler = build(factory, timestep_kwargs)
    chain = SchedulerChain(adapter_for(scheduler, **step_kwargs), toy_model)
    x = x_init(scheduler)
    expected = diffusers_loop(scheduler, x, torch.Generator().manual_seed(1), step_kwargs)
    out = speculative_sample(chain, x, window=1, generator=torch.Generator().manual_seed(1))
    assert_reproduces(out.sample, expected, case, "sample")


# -- clear errors for what cannot be sampled speculatively ------------------------------------------


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: ddpm(variance_type="learned"), "network predicts the step's variance"),
        (lambda: ddpm(variance_type="learned_range"), "variance_type='fixed_small'"),
        (lambda: ddpm(variance_type="fixed_large_log"), "NaN at every step"),
        (lambda: dpm(solver_order=3), "solver_order=2"),
        (lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++"), "algorithm_type='sde-dpmsolver++'"),
        (lambda: PNDMScheduler(), "deterministic (ODE) solver"),
        (lambda: EulerDiscreteScheduler(), "EulerAncestralDiscreteScheduler"),
        (lambda: euler(prediction_type="sample"), "prediction_type='sample'"),
        (lambda: FlowMatchEulerDiscreteScheduler(), "stochastic_sampling=True"),
        (lambda: LTXEulerAncestralRFScheduler(eta=0.0), "Use eta > 0"),
        (lambda: FlowMatchSDEScheduler(churn=0.0), "Use churn > 0"),
    ],
    ids=[
        "ddpm-learned",
        "ddpm-learned-range",
        "ddpm-fixed-large-log",
        "dpm-order-3",
        "dpm-ode",
        "pndm",
        "euler-ode",
        "euler-sample",
        "flow-euler-ode",
        "ltx-eta0",
        "flow-sde-churn0",
    ],
)
def test_unsupported_configurations_raise_clear_errors(make, message):
    scheduler = make()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match=re.escape(message)):
        adapter_for(scheduler)
    with pytest.raises(ValueError, match="cannot|not supported|deterministic"):
        SpeculativeScheduler.from_scheduler(scheduler)


@pytest.mark.parametrize("eta", [None, 0.0])
def test_ddim_without_eta_is_refused_as_deterministic(eta):
    scheduler = ddim()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match=r"deterministic.*eta > 0.*DDPMScheduler"):
        adapter_for(scheduler, eta=eta)
    with pytest.raises(ValueError, match="eta > 0"):
        SpeculativeScheduler.from_scheduler(scheduler, eta=eta)


def test_brownian_tree_dpm_sde_scheduler_is_refused_by_name():
    # DPMSolverSDEScheduler needs torchsde to even instantiate; the refusal comes first.
    with pytest.raises(ValueError, match=r"Brownian tree.*sde-dpmsolver\+\+"):
        SpeculativeScheduler(base_scheduler_class="DPMSolverSDEScheduler")


def test_eta_is_refused_for_schedulers_without_it():
    scheduler = ddpm()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="eta.*do\\(es\\) not apply"):
        adapter_for(scheduler, eta=1.0)


def test_supported_schedulers_lists_the_four_families():
    names = set(supported_schedulers())
    assert {"DDPMScheduler", "DDIMScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"} <= names


def test_float_timesteps_reach_the_model_per_row():
    scheduler = euler()
    scheduler.set_timesteps(10)
    seen = []
    chain = SchedulerChain(adapter_for(scheduler), lambda x, t: seen.append(t) or toy_model(x, t))
    chain.predict(torch.randn(3, 3, 4, 4), torch.tensor([0, 4, 9]))
    np.testing.assert_array_equal(seen[0].numpy(), scheduler.timesteps[[0, 4, 9]].numpy())
