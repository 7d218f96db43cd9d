"""DDPMScheduler with a learned variance (``variance_type="learned"`` / ``"learned_range"``): the network's
extra channels give the step's std per element; sampled speculatively through the Γ-maximal coupling.

Significance: the law test is :func:`specdiff.testing.two_sample_test` at family-wise ALPHA = 1e-3
(KS on projections, Bonferroni). Seeds are fixed: every outcome is deterministic.
"""

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from specdiff import SpeculativeScheduler
from specdiff.kernels import MaximalKernel
from specdiff.testing import two_sample_test

ALPHA = 1e-3
VARIANCES = ["learned", "learned_range"]


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=2, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), add_attention=False,
    ).eval()  # fmt: skip


def model_for(unet, variance_type):
    """The network as a model function: ``[eps, v]``; for ``learned`` (v is the variance itself) a
    positive v, as such a model is trained to output."""

    @torch.no_grad()
    def model(x, t):
        out = unet(x, t).sample
        if variance_type == "learned":
            out = torch.cat([out[:, :1], 0.02 * torch.nn.functional.softplus(out[:, 1:]) + 1e-4], dim=1)
        return out

    return model


def scheduler(variance_type, steps):
    s = DDPMScheduler(num_train_timesteps=1000, variance_type=variance_type)
    s.set_timesteps(steps)
    return s


def diffusers_loop(sched, model, x, generator):
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(x.shape[0])), t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("variance_type", VARIANCES)
def test_a_learned_variance_scheduler_is_accepted(variance_type):
    """Failing first: these configurations raised "the network predicts the step's variance"."""
    spec = SpeculativeScheduler.from_scheduler(scheduler(variance_type, 5), window=2)
    assert spec.chain(lambda x, t: torch.cat([x, x], 1)).kernel is MaximalKernel


@pytest.mark.parametrize("variance_type", VARIANCES)
@pytest.mark.parametrize("frozen", ["sample", "model_output"])
def test_window_one_reproduces_diffusers_step_bit_for_bit(unet, variance_type, frozen):
    model = model_for(unet, variance_type)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = diffusers_loop(scheduler(variance_type, 8), model, x, torch.Generator().manual_seed(2))
    spec = SpeculativeScheduler.from_scheduler(scheduler(variance_type, 8), frozen_prediction=frozen)
    out = spec.sample(model, x, num_inference_steps=8, window=1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out.sample, expected), f"max |diff| = {(out.sample - expected).abs().max():.3g}"
    assert torch.equal(spec.sample_baseline(model, x, generator=torch.Generator().manual_seed(2)), expected)


@pytest.mark.parametrize("variance_type", VARIANCES)
def test_speculative_samples_have_diffusers_law(unet, variance_type):
    """Window 4, the default drafter: draft and target std differ at every drafted step (the draft's
    comes from an older prediction), so every rejection goes through the rejection residual."""
    model, n, steps = model_for(unet, variance_type), 300, 8
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    reference = diffusers_loop(scheduler(variance_type, steps), model, x, torch.Generator().manual_seed(4))
    spec = SpeculativeScheduler.from_scheduler(scheduler(variance_type, steps), window=4)
    out = spec.sample(model, x, num_inference_steps=steps, generator=torch.Generator().manual_seed(5))
    result = two_sample_test(out.sample, reference, alpha=ALPHA)
    assert result.passed, str(result)
    rejected = out.stats.proposed - out.stats.accepted
    assert rejected >= 1000 and out.stats.residual_draws >= 1000, out.stats.summary()
    assert out.stats.accepted > 0  # both branches of the coupling ran


def test_reflection_is_refused_with_a_learned_variance_and_a_wrong_output_is_named(unet):
    spec = SpeculativeScheduler.from_scheduler(scheduler("learned_range", 5), coupling="reflection")
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="coupling='maximal'"):
        spec.sample(model_for(unet, "learned_range"), x, num_inference_steps=5)
    plain = SpeculativeScheduler.from_scheduler(scheduler("learned_range", 5))
    with pytest.raises(ValueError, match="twice the state's channels"):
        plain.sample(lambda x, t: x, x, num_inference_steps=5)
    with pytest.raises(ValueError, match="frozen_prediction must be 'sample' or 'model_output'"):
        plain.chain(lambda x, t: x, frozen_prediction="v_prediction")
