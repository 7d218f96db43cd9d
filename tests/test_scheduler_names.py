"""Samplers by name and the stochastic sibling of a deterministic scheduler (issue 20, items 1 and 6).

A name builds ``Class.from_config(model_scheduler.config, **overrides)``; a sibling is a new
stochastic scheduler built the same way. Exactness of the path: wrapped at ``window=1`` the
sibling reproduces its own plain diffusers loop bit for bit, and at ``window=4`` its samples have
that loop's law (two-sample test at alpha = 1e-3, fixed seeds)."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
)
from test_speculative_scheduler import DIM, MixtureDenoiser, initial

from specdiff.schedulers import SAMPLERS, SpeculativeScheduler, scheduler_from_name, stochastic_sibling
from specdiff.schedulers.names import DETERMINISTIC, family_of
from specdiff.testing import assert_same_law


def model_schedule():
    """A model's own (non-default) noise schedule, which every sampler built from it must keep."""
    return DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


@pytest.mark.parametrize("name", [n for n, s in SAMPLERS.items() if s.family == "diffusion"])
def test_a_name_builds_its_class_from_the_models_config(name):
    base = model_schedule()
    built = scheduler_from_name(name, base)
    entry = SAMPLERS[name]
    assert type(built).__name__ == entry.class_name
    assert built.config.num_train_timesteps == 500 and built.config.beta_schedule == "squaredcos_cap_v2"
    assert built.config.prediction_type == "v_prediction"
    for key, value in entry.overrides.items():
        assert built.config[key] == value
    assert type(base) is DDPMScheduler and base.config.num_train_timesteps == 500  # the original is untouched


def test_flow_names_build_on_flow_models_and_are_refused_on_noise_level_models():
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert family_of(flow) == "flow" and family_of(model_schedule()) == "diffusion"
    stochastic = scheduler_from_name("flow-euler-stochastic", flow)
    assert type(stochastic) is FlowMatchEulerDiscreteScheduler and stochastic.config.stochastic_sampling
    sde = scheduler_from_name("flow-sde", flow, churn=1.5)
    assert type(sde).__name__ == "FlowMatchSDEScheduler" and sde.config.churn == 1.5 and sde.config.shift == 3.0
    with pytest.raises(ValueError, match="flow-matching models.*DDPMScheduler.*ddpm, ddim, euler-a, dpmpp-2m-sde"):
        scheduler_from_name("flow-sde", model_schedule())
    with pytest.raises(ValueError, match="noise-level.*FlowMatchEulerDiscreteScheduler.*flow-euler-stochastic"):
        scheduler_from_name("euler-a", flow)


def test_unknown_and_deterministic_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown sampler 'k-lms'; the samplers: " + ", ".join(SAMPLERS)):
        scheduler_from_name("k-lms", model_schedule())
    for name, sibling in DETERMINISTIC.items():
        assert sibling in SAMPLERS
        with pytest.raises(ValueError, match=f"{name} is a deterministic.*stochastic sibling is {sibling}"):
            scheduler_from_name(name, model_schedule())


def test_config_options_apply_only_where_the_class_takes_them():
    built = scheduler_from_name("dpmpp-2m-sde", model_schedule(), use_karras_sigmas=True)
    assert built.config.use_karras_sigmas and built.config.algorithm_type == "sde-dpmsolver++"
    assert not scheduler_from_name("dpmpp-2m-sde", model_schedule(), use_karras_sigmas=None).config.use_karras_sigmas
    with pytest.raises(ValueError, match="use_karras_sigmas does not apply to ddpm"):
        scheduler_from_name("ddpm", model_schedule(), use_karras_sigmas=True)
    with pytest.raises(ValueError, match="churn does not apply to euler-a"):
        scheduler_from_name("euler-a", model_schedule(), churn=1.0)


def test_a_schedule_that_never_clipped_is_not_clipped_by_ddpm_or_ddim():
    """DDPM and DDIM clip x0 by default; a model whose scheduler has no clip_sample never clipped."""
    from_euler = EulerDiscreteScheduler(num_train_timesteps=100)
    assert scheduler_from_name("ddpm", from_euler).config.clip_sample is False
    assert scheduler_from_name("ddim", from_euler).config.clip_sample is False
    clipping = DDPMScheduler(clip_sample=True, clip_sample_range=2.0)
    assert scheduler_from_name("ddim", clipping).config.clip_sample is True


# -- the stochastic sibling ---------------------------------------------------------------------------

SIBLINGS = {  # deterministic scheduler -> (its sibling's class, the sibling's step options)
    "pndm": (lambda: PNDMScheduler(), DDPMScheduler, {}),
    "euler": (lambda: EulerDiscreteScheduler(), EulerAncestralDiscreteScheduler, {}),
    "dpm++-2m": (lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++"), DPMSolverMultistepScheduler, {}),
    "ddim-eta-0": (lambda: DDIMScheduler(clip_sample=False), DDIMScheduler, {"eta": 1.0}),
    "flow-euler": (lambda: FlowMatchEulerDiscreteScheduler(), FlowMatchEulerDiscreteScheduler, {}),
}


def plain_diffusers_samples(scheduler, model, latents, generator, step_kwargs):
    """diffusers' own loop (flow-matching schedulers have no scale_model_input)."""
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        output = model(model_input, t.expand(latents.shape[0]))
        latents = scheduler.step(output, t, latents, generator=generator, **step_kwargs).prev_sample
    return latents


def toy_model(x, t):
    """Any deterministic network will do for a bit-for-bit comparison of two loops."""
    return torch.tanh(x) * 0.7 + 0.001 * t.to(x.dtype).view(-1, *[1] * (x.ndim - 1))


@pytest.mark.parametrize("family", SIBLINGS)
def test_a_refused_deterministic_scheduler_runs_through_the_switch(family):
    factory, cls, options = SIBLINGS[family]
    deterministic = factory()
    with pytest.raises(ValueError, match=r"deterministic.*stochastic_sibling\(scheduler\).*--stochastic"):
        SpeculativeScheduler.from_scheduler(deterministic, window=4)
    sibling = stochastic_sibling(deterministic)
    assert type(sibling.scheduler) is cls and sibling.options == options
    assert "different sampler" in sibling.note
    if cls is DPMSolverMultistepScheduler:
        assert sibling.scheduler.config.algorithm_type == "sde-dpmsolver++"
        assert sibling.scheduler.config.solver_order == 2
    if cls is FlowMatchEulerDiscreteScheduler:
        assert sibling.scheduler.config.stochastic_sampling
    assert sibling.scheduler is not deterministic
    with pytest.raises(ValueError, match="deterministic"):  # the original is not converted in place
        SpeculativeScheduler.from_scheduler(deterministic, window=4)
    # window=1: the plain diffusers loop of the sibling, bit for bit (DDIM and flow frozen on their model
    # output: carrying x0 they rebuild eps / the velocity from it, equal to float rounding only).
    frozen = "model_output" if family.startswith(("ddim", "flow")) else "sample"
    spec = sibling.speculative(window=1, frozen_prediction=frozen)
    plain = type(sibling.scheduler).from_config(sibling.scheduler.config)
    plain.set_timesteps(12)
    x = torch.randn(6, DIM, generator=torch.Generator().manual_seed(0)) * getattr(plain, "init_noise_sigma", 1.0)
    want = plain_diffusers_samples(plain, toy_model, x, torch.Generator().manual_seed(1), options)
    out = spec.sample(toy_model, x, num_inference_steps=12, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.sample, want)


def test_the_sibling_of_euler_samples_the_law_of_euler_ancestral():
    """Whole sampler: speculative (window 4) vs the sibling's own diffusers loop, alpha = 1e-3."""
    sibling = stochastic_sibling(EulerDiscreteScheduler())
    plain = EulerAncestralDiscreteScheduler.from_config(sibling.scheduler.config)
    plain.set_timesteps(20)
    model, n = MixtureDenoiser(plain), 2000
    want = plain_diffusers_samples(plain, model, initial(plain, n, seed=10), torch.Generator().manual_seed(11), {})
    out = sibling.speculative(window=4).sample(model, initial(plain, n, seed=20), num_inference_steps=20,
                                               generator=torch.Generator().manual_seed(21))
    assert_same_law(out.sample, want, alpha=1e-3)
    assert 0 < out.stats.acceptance_rate < 1 and out.stats.target_calls < 20


def test_a_stochastic_scheduler_is_its_own_sibling_and_ddim_takes_the_eta_asked_for():
    same = stochastic_sibling(DDPMScheduler(num_train_timesteps=300))
    assert type(same.scheduler) is DDPMScheduler and same.scheduler.config.num_train_timesteps == 300
    assert "already stochastic" in same.note and same.options == {}
    assert stochastic_sibling(DDIMScheduler(), eta=0.3).options == {"eta": 0.3}
    with pytest.raises(ValueError, match=r"eta must be in \(0, 1\]"):
        stochastic_sibling(DDIMScheduler(), eta=0.0)


def test_the_sibling_of_a_third_order_solver_is_second_order_and_karras_sigmas_are_kept_or_reported():
    dpm = stochastic_sibling(DPMSolverMultistepScheduler(solver_order=3, use_karras_sigmas=True)).scheduler
    assert dpm.config.solver_order == 2 and dpm.config.use_karras_sigmas
    euler = stochastic_sibling(EulerDiscreteScheduler(use_karras_sigmas=True))
    assert "not carried over: Karras sigmas" in euler.note


def test_the_docs_page_lists_the_samplers_and_siblings_of_the_code():
    from pathlib import Path

    from specdiff.schedulers.names import sampler_table, sibling_table

    page = (Path(__file__).resolve().parents[1] / "docs" / "cli-schedulers.md").read_text()
    for marker, table in (("samplers", sampler_table()), ("siblings", sibling_table())):
        start, end = page.index(f"<!-- {marker}:start -->"), page.index(f"<!-- {marker}:end -->")
        assert page[start:end].split("\n", 1)[1].strip() == table, f"regenerate the {marker} table"
