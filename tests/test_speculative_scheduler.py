"""``SpeculativeScheduler``: config round trip, drop-in delegation, and exactness.

Exactness is checked two ways: ``window=1`` reproduces diffusers' plain loop bit for bit,
and for ``window > 1`` the samples pass a two-sample test against diffusers' plain loop
on an analytic Gaussian-mixture denoiser (so the network is exact and cheap), for every
scheduler family, with the frozen drafter and with an independent (wrong) draft model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    SchedulerMixin,
)

import specdiff
from specdiff.schedulers import SpeculativeScheduler
from specdiff.testing import assert_same_law

DIM = 4
MEANS = torch.tensor([[1.2, -0.8, 0.5, 0.0], [-1.0, 0.9, -0.6, 0.7]])
DATA_STD = 0.25


class MixtureDenoiser:
    """Exact noise prediction for data ~ 1/2 N(m_1, s^2 I) + 1/2 N(m_2, s^2 I) under the VP
    forward process of ``scheduler``, at any (possibly fractional) timestep. Works on the
    variance-preserving model input, so it also serves Euler's scaled input."""

    def __init__(self, scheduler, means=MEANS, calls=None):
        ab = scheduler.alphas_cumprod.double()
        self.sigma_table = ((1 - ab) / ab).sqrt().numpy()
        self.means = means.double()
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        sigma = torch.from_numpy(
            np.interp(t.double().cpu().numpy(), np.arange(len(self.sigma_table)), self.sigma_table)
        )
        a = (1 / (1 + sigma**2))[:, None]  # alpha_bar at t
        xd = x.double().flatten(1)
        var = a * DATA_STD**2 + 1 - a
        centred = xd[:, None, :] - a.sqrt()[:, None] * self.means[None]
        resp = torch.softmax(-centred.square().sum(-1) / (2 * var), dim=1)
        x0 = (resp[..., None] * (self.means[None] + (a.sqrt() * DATA_STD**2 / var)[:, None] * centred)).sum(1)
        eps = (xd - a.sqrt() * x0) / (1 - a).sqrt()
        return eps.to(x.dtype).view_as(x)


FAMILIES = {
    "ddpm": (lambda: DDPMScheduler(clip_sample=False), {}),
    "ddim-eta-0.8": (lambda: DDIMScheduler(clip_sample=False), {"eta": 0.8}),
    "euler-ancestral": (lambda: EulerAncestralDiscreteScheduler(), {}),
    "dpm++-2m-sde": (lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2), {}),
}


def plain_diffusers_samples(scheduler, model, latents, generator, step_kwargs):
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(
            model(model_input, t.expand(latents.shape[0])), t, latents, generator=generator, **step_kwargs
        ).prev_sample
    return latents


def initial(scheduler, n, seed):
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma


# -- exactness --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_window_one_reproduces_the_plain_diffusers_loop_bit_for_bit(family):
    factory, step_kwargs = FAMILIES[family]
    base = factory()
    base.set_timesteps(12)
    # DDIM carrying x0 (the default) rebuilds eps from it: equal to float rounding only, so
    # the bit-for-bit check freezes DDIM's model output instead.
    frozen = "model_output" if family.startswith("ddim") else "sample"
    spec = SpeculativeScheduler.from_scheduler(base, window=1, frozen_prediction=frozen, **step_kwargs)
    model = MixtureDenoiser(base)
    x = initial(base, 8, seed=0)
    want = plain_diffusers_samples(base, model, x, torch.Generator().manual_seed(1), step_kwargs)
    out = spec.sample(model, x, num_inference_steps=12, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.sample, want)
    assert out.stats.target_calls == 12  # one network call per step, like the plain loop


@pytest.mark.parametrize("drafter", ["frozen", "model"])
@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_samples_have_the_law_of_the_plain_diffusers_loop(family, drafter):
    factory, step_kwargs = FAMILIES[family]
    base = factory()
    base.set_timesteps(20)
    model = MixtureDenoiser(base)
    n = 2000
    want = plain_diffusers_samples(
        base, model, initial(base, n, seed=10), torch.Generator().manual_seed(11), step_kwargs
    )

    spec = SpeculativeScheduler.from_scheduler(base, window=4, **step_kwargs)
    draft = MixtureDenoiser(base, means=MEANS * 0.8) if drafter == "model" else "frozen"
    out = spec.sample(
        model,
        initial(base, n, seed=20),
        num_inference_steps=20,
        generator=torch.Generator().manual_seed(21),
        drafter=draft,
    )

    assert torch.isfinite(out.sample).all()
    assert_same_law(out.sample, want, alpha=1e-3)
    stats = out.stats
    assert 0 < stats.acceptance_rate < 1, "the test should exercise both accepted and reflected steps"
    assert stats.target_calls < 20, stats.summary()
    assert (stats.draft_calls > 0) == (drafter == "model")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_samplers_have_the_law_of_diffusers_own_half_precision_loop(family, dtype):
    """specdiff's half-precision samplers against diffusers' ``scheduler.step`` loop in the same dtype
    (not against specdiff's own plain sampler): the speculative one at window 4 with a wrong draft model,
    so that reflections happen, and the plain one have its law. Not bit for bit: e.g. diffusers' DDPM step
    computes in the half dtype and rounds differently from specdiff's adapter."""
    factory, step_kwargs = FAMILIES[family]
    base = factory()
    base.set_timesteps(20)
    model = MixtureDenoiser(base)
    n = 2000
    x = initial(base, n, seed=30).to(dtype)
    want = plain_diffusers_samples(base, model, x, torch.Generator().manual_seed(31), step_kwargs)
    assert want.dtype == dtype
    spec = SpeculativeScheduler.from_scheduler(base, window=4, **step_kwargs)
    draft = MixtureDenoiser(base, means=MEANS * 0.8)
    out = spec.sample(
        model, initial(base, n, seed=32).to(dtype), num_inference_steps=20, drafter=draft,
        generator=torch.Generator().manual_seed(33),
    )  # fmt: skip
    assert out.sample.dtype == dtype
    assert out.stats.proposed - out.stats.accepted >= n // 4, out.stats.summary()  # reflections happened
    x = initial(base, n, seed=34).to(dtype)
    plain = spec.sample_baseline(model, x, generator=torch.Generator().manual_seed(35))
    # Two law tests at 5e-4 each: alpha 1e-3 per (family, dtype) case.
    assert_same_law(out.sample, want, alpha=5e-4)
    assert_same_law(plain, want, alpha=5e-4)


def test_speculative_generator_list_makes_each_sample_independent_of_its_batch():
    base = DDPMScheduler(clip_sample=False)
    spec = SpeculativeScheduler.from_scheduler(base, window=3)
    model = MixtureDenoiser(base)
    x = initial(base, 4, seed=0)

    def gens():
        return [torch.Generator().manual_seed(100 + i) for i in range(4)]

    full = spec.sample(model, x, num_inference_steps=15, generator=gens()).sample
    alone = spec.sample(model, x[2:3], num_inference_steps=15, generator=gens()[2:3]).sample
    assert torch.equal(full[2:3], alone)
    capped = spec.sample(model, x, num_inference_steps=15, generator=gens(), max_rows=2)  # exact micro-batches
    assert torch.equal(capped.sample, full) and capped.stats.peak_rows == 2


# -- config: save / load, from_config, options --------------------------------------------------------


@pytest.mark.parametrize(
    "base,options",
    [
        (DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large", steps_offset=1), {"window": 5}),
        (DDPMScheduler(trained_betas=np.linspace(1e-4, 0.02, 1000)), {"frozen_prediction": "sample"}),
        (DDIMScheduler(set_alpha_to_one=False), {"eta": 0.5, "use_clipped_model_output": True}),
        (EulerAncestralDiscreteScheduler(timestep_spacing="trailing"), {"window": 2}),
        (DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True), {"window": 6}),
    ],
    ids=["ddpm", "ddpm-trained-betas", "ddim", "euler-a", "dpm-sde"],
)
def test_save_pretrained_round_trips_offline(tmp_path, base, options):
    spec = SpeculativeScheduler.from_scheduler(base, **options)
    spec.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "SpeculativeScheduler"
    assert saved["base_scheduler_class"] == type(base).__name__

    loaded = SpeculativeScheduler.from_pretrained(tmp_path, local_files_only=True)
    assert type(loaded.base_scheduler) is type(base)

    def strip(c):
        return {k: v for k, v in dict(c).items() if not k.startswith("_")}

    assert strip(loaded.config) == strip(spec.config)
    assert torch.equal(loaded.base_scheduler.alphas_cumprod, base.alphas_cumprod)
    for k, v in options.items():
        assert loaded.config[k] == v


def test_from_config_wraps_a_saved_plain_scheduler_config(tmp_path):
    DDPMScheduler(variance_type="fixed_large").save_pretrained(tmp_path)
    config = DDPMScheduler.load_config(tmp_path)
    spec = SpeculativeScheduler.from_config(config, window=3)
    assert isinstance(spec.base_scheduler, DDPMScheduler)
    assert spec.base_scheduler.config.variance_type == "fixed_large" and spec.config.window == 3


def test_from_config_on_a_live_plain_config_says_to_use_from_scheduler():
    with pytest.raises(ValueError, match=r"from_scheduler"):
        SpeculativeScheduler.from_config(DDPMScheduler().config)


def test_from_scheduler_copies_and_never_touches_the_original():
    base = DDPMScheduler()
    base.set_timesteps(7)
    spec = SpeculativeScheduler.from_scheduler(base, window=2)
    spec.set_timesteps(3)
    assert len(base.timesteps) == 7 and len(spec.timesteps) == 3
    rewrapped = SpeculativeScheduler.from_scheduler(spec, window=5)
    assert rewrapped.config.window == 5 and rewrapped.config.base_scheduler_class == "DDPMScheduler"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"window": 0}, "window must be a positive integer"),
        ({"drafter": "medusa"}, "stores 'picard' or 'frozen'"),
        ({"frozen_prediction": "x0"}, "frozen_prediction must be one of"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeScheduler.from_scheduler(DDPMScheduler(), **kwargs)


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="unknown SpeculativeScheduler option"):
        SpeculativeScheduler.from_scheduler(DDPMScheduler(), windw=3)


# -- drop-in behaviour in a plain diffusers loop ----------------------------------------------------------


def test_is_a_scheduler_mixin_exported_at_top_level():
    assert issubclass(specdiff.SpeculativeScheduler, SchedulerMixin)
    assert specdiff.SpeculativeScheduler is SpeculativeScheduler


@pytest.mark.filterwarnings("ignore::specdiff.schedulers.PlainStepWarning")  # said on purpose: a plain loop
@pytest.mark.parametrize("family", FAMILIES)
def test_plain_step_delegates_to_the_wrapped_scheduler(family):
    factory, step_kwargs = FAMILIES[family]
    base, spec = factory(), SpeculativeScheduler.from_scheduler(factory(), **step_kwargs)
    base.set_timesteps(8)
    spec.set_timesteps(8)
    model = MixtureDenoiser(base)
    assert torch.equal(spec.timesteps, base.timesteps)
    assert float(spec.init_noise_sigma) == float(base.init_noise_sigma)
    x = initial(base, 3, seed=0)
    want = plain_diffusers_samples(base, model, x, torch.Generator().manual_seed(2), step_kwargs)
    got = plain_diffusers_samples(spec, model, x, torch.Generator().manual_seed(2), {})  # DDIM eta from the config
    assert torch.equal(got, want)


def test_delegates_scheduler_attributes_and_len():
    spec = SpeculativeScheduler.from_scheduler(EulerAncestralDiscreteScheduler())
    spec.set_timesteps(5)
    assert torch.equal(spec.sigmas, spec.base_scheduler.sigmas)
    assert len(spec) == 1000
    noisy = spec.add_noise(torch.zeros(1, DIM), torch.ones(1, DIM), spec.timesteps[:1])
    assert torch.allclose(noisy, spec.sigmas[0] * torch.ones(1, DIM))


def test_sample_reports_progress_and_calls_back_every_round():
    base = DDPMScheduler(clip_sample=False)
    spec = SpeculativeScheduler.from_scheduler(base, window=4)
    model = MixtureDenoiser(base)
    updates, rounds = [], []

    class Bar:
        def __init__(self, total):
            self.total = total

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            updates.append(n)

    out = spec.sample(
        model,
        initial(base, 5, 0),
        num_inference_steps=10,
        generator=torch.Generator().manual_seed(0),
        progress=lambda total: Bar(total),
        callback=lambda info: rounds.append(info["round"]),
    )
    assert sum(updates) == 5 * 10
    assert rounds == list(range(1, out.stats.rounds + 1))
    assert model.calls == out.stats.target_calls


def test_sample_baseline_uses_the_same_chain():
    base = DDPMScheduler(clip_sample=False)
    spec = SpeculativeScheduler.from_scheduler(base, window=4)
    model = MixtureDenoiser(base)
    x = initial(base, 3, 0)
    a = spec.sample_baseline(model, x, num_inference_steps=9, generator=torch.Generator().manual_seed(0))
    b = spec.sample(model, x, window=1, generator=torch.Generator().manual_seed(0)).sample
    assert torch.equal(a, b)


def test_the_wrappers_step_options_are_the_ones_the_adapters_declare():
    from specdiff.schedulers.base import step_options

    sampler_options = {"window", "drafter", "frozen_prediction", "coupling", "verify"}
    config_options = set(SpeculativeScheduler.options()) - sampler_options
    assert config_options == set(step_options())  # declared once, by the adapters
    with pytest.raises(TypeError, match="unknown SpeculativeScheduler option"):
        SpeculativeScheduler.from_scheduler(DDPMScheduler(), churn=1.0)


def test_the_adapter_is_built_once_per_schedule_and_rebuilt_when_it_changes():
    """A pipeline asks for the adapter on every call; its per-step tables took 240 ms (DDPM) to 760 ms
    (DPM++ 2M SDE) at 1000 steps, paid by every speculative call and not by the plain pipeline. The last
    adapter is kept while the schedule is the same, and a new one is built when it changes."""
    from diffusers import DDIMScheduler

    from specdiff.schedulers.speculative import SpeculativeScheduler

    s = SpeculativeScheduler.from_scheduler(DDIMScheduler(num_train_timesteps=100), eta=1.0)
    s.set_timesteps(20)
    first = s.adapter()
    s.set_timesteps(20)
    assert s.adapter() is first
    assert s.adapter(eta=0.5) is not first  # another step option
    s.set_timesteps(25)
    other = s.adapter(eta=1.0)
    assert other is not first and other.num_steps == 25
    s.set_timesteps(20)
    again = s.adapter()
    assert again is not first and torch.equal(again.timesteps, first.timesteps)
