"""SpeculativeScoreSdeVePipeline: window=1 is diffusers' ScoreSdeVePipeline bit for bit, a window
keeps its law, step_correct is refused, stats and max_rows."""

import numpy as np
import pytest
import scipy.stats as sps
import torch
from diffusers import ScoreSdeVePipeline, ScoreSdeVeScheduler, UNet2DModel

from specdiff.pipelines import SpeculativeScoreSdeVePipeline

STEPS = 20
ALPHA = 0.01  # the law test's family-wise significance level (Bonferroni over its statistics)
MIN_REJECTED = 100  # the law test runs only where the window rejects this many drafts at least


def tiny_unet(scale: float = 1.0) -> UNet2DModel:
    """A random 3-channel (ScoreSdeVePipeline draws 3 channels) 8x8 score model; its output is
    multiplied by ``scale`` (the last layer's weights) to set how often drafts are rejected."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with torch.no_grad():
        unet.conv_out.weight.mul_(scale)
        unet.conv_out.bias.mul_(scale)
    return unet.eval()


def scheduler(correct_steps: int = 0) -> ScoreSdeVeScheduler:
    return ScoreSdeVeScheduler(num_train_timesteps=STEPS, snr=0.16, sigma_min=0.01, sigma_max=1.0,
                               correct_steps=correct_steps)


def pipes(scale: float = 1.0, correct_steps: int = 0):
    unet = tiny_unet(scale)
    plain = ScoreSdeVePipeline(unet=unet, scheduler=scheduler(correct_steps))
    plain.set_progress_bar_config(disable=True)
    fast = SpeculativeScoreSdeVePipeline.from_pipe(plain)
    fast.set_progress_bar_config(disable=True)
    return plain, fast


@pytest.mark.parametrize("per_sample", [False, True])
def test_window_one_is_score_sde_ve_pipeline_bit_for_bit(per_sample):
    plain, fast = pipes()

    def gen():
        if per_sample:
            return [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
        return torch.Generator().manual_seed(5)

    reference = plain(batch_size=3, num_inference_steps=STEPS, generator=gen(), output_type="np").images
    out = fast(batch_size=3, num_inference_steps=STEPS, generator=gen(), output_type="np", window=1)
    assert isinstance(out.images, np.ndarray) and out.images.shape == (3, 8, 8, 3)
    assert np.array_equal(out.images, reference)
    assert 0 < reference.std() and 0 < reference.mean() < 1  # not all clamped away: the test compares something
    assert out.stats.target_calls == STEPS and out.stats.num_steps == STEPS


@torch.no_grad()
def test_last_step_is_step_pred_mean():
    """The images are step_pred's prev_sample_mean of the last step (clamped), not its noisy draw."""
    plain, fast = pipes()
    pt = fast(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1), output_type="pt",
              window=1).images
    # The plain loop by hand, returning both of the last step's outputs.
    s = plain.scheduler
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g) * s.init_noise_sigma
    s.set_timesteps(STEPS)
    s.set_sigmas(STEPS)
    for i, t in enumerate(s.timesteps):
        out = s.step_pred(plain.unet(x, s.sigmas[i] * torch.ones(2)).sample, t, x, generator=g)
        x = out.prev_sample
    assert torch.equal(pt, out.prev_sample_mean.clamp(0, 1))
    assert not torch.equal(pt, out.prev_sample.clamp(0, 1))


def test_window_keeps_the_plain_pipelines_law():
    """Two-sample KS tests (plain pipeline vs window 6) on the mean pixel, 3 pixels and 4 fixed random
    projections, Bonferroni at ALPHA over the 8; the window must reject MIN_REJECTED drafts (measured: 1419
    of 6616 drafts rejected, min p 0.37). Power, measured with the same statistics and sizes: the plain
    pipeline with sigma_max 0.9 instead of 1.0 gives min p 1e-3, below ALPHA / 8."""
    plain, fast = pipes(scale=3.0)
    n = 400
    a = plain(batch_size=n, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(11),
              output_type="np").images
    out = fast(batch_size=n, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(12),
               output_type="np", window=6)
    b = out.images
    s = out.stats
    rejected = s.proposed - s.accepted
    assert rejected >= MIN_REJECTED and s.accepted >= MIN_REJECTED, s.summary()
    assert s.target_calls < STEPS  # the window saved sequential calls
    flat_a, flat_b = a.reshape(n, -1), b.reshape(n, -1)
    proj = np.random.default_rng(0).standard_normal((flat_a.shape[1], 4))
    stats_a = [flat_a.mean(1), flat_a[:, 0], flat_a[:, 77], flat_a[:, 150], *(flat_a @ proj).T]
    stats_b = [flat_b.mean(1), flat_b[:, 0], flat_b[:, 77], flat_b[:, 150], *(flat_b @ proj).T]
    p = [sps.ks_2samp(u, v).pvalue for u, v in zip(stats_a, stats_b, strict=True)]
    assert min(p) >= ALPHA / len(p), p


def test_correct_steps_without_a_fixed_step_size_is_refused():
    _, fast = pipes(correct_steps=1)
    with pytest.raises(ValueError, match="step_correct.*corrector_step_size="):
        fast(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_correct_steps_with_a_fixed_step_size_runs_the_fixed_corrector():
    """Window 1 is, bit for bit, the loop of ScoreSdeVePipeline with its step_correct replaced by the
    fixed-step annealed-Langevin step x + (a/2) s(x, sigma_i) + sqrt(a) z, a = eps sigma_i^2 / sigma_min^2."""
    plain, fast = pipes(correct_steps=2)
    eps = 1e-5
    kwargs = dict(batch_size=2, num_inference_steps=STEPS, output_type="pt", corrector_step_size=eps)
    one = fast(generator=torch.Generator().manual_seed(0), window=1, **kwargs)
    assert one.stats.num_steps == 3 * STEPS and one.stats.target_calls == 3 * STEPS
    s, g = plain.scheduler, torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g) * s.init_noise_sigma
    s.set_timesteps(STEPS)
    s.set_sigmas(STEPS)
    for i, t in enumerate(s.timesteps):
        sigma = s.sigmas[i] * torch.ones(2)
        a = torch.tensor(eps * float(s.sigmas[i]) ** 2 / s.config.sigma_min**2, dtype=torch.float32)
        for _ in range(2):
            x = x + (a / 2) * plain.unet(x, sigma).sample + a.sqrt() * torch.randn(x.shape, generator=g)
        last = s.step_pred(plain.unet(x, sigma).sample, t, x, generator=g)
        x = last.prev_sample
    assert torch.equal(one.images, last.prev_sample_mean.clamp(0, 1))
    four = fast(generator=torch.Generator().manual_seed(0), window=4, **kwargs)
    assert four.images.shape == (2, 3, 8, 8) and torch.isfinite(four.images).all()
    assert four.stats.target_calls < 3 * STEPS


def test_corrector_step_size_without_correct_steps_is_refused():
    _, fast = pipes()
    with pytest.raises(ValueError, match="correct_steps=0"):
        fast(batch_size=1, num_inference_steps=STEPS, corrector_step_size=1e-5)


def test_stats_max_rows_and_output_types():
    _, fast = pipes(scale=3.0)
    kwargs = dict(batch_size=3, num_inference_steps=STEPS, window=4)
    free = fast(generator=torch.Generator().manual_seed(3), output_type="pt", **kwargs)
    capped = fast(generator=torch.Generator().manual_seed(3), output_type="pt", max_rows=2, **kwargs)
    # The cap only splits calls: the same decisions, and the same images up to the float rounding of a
    # network evaluated at another batch size (CPU kernels are not batch-invariant).
    decisions = [(o.stats.target_calls, o.stats.rounds, o.stats.proposed, o.stats.accepted) for o in (free, capped)]
    assert decisions[0] == decisions[1]
    torch.testing.assert_close(capped.images, free.images, rtol=0, atol=1e-5)
    assert capped.stats.peak_rows <= 2 < free.stats.peak_rows and capped.stats.max_rows == 2
    assert free.stats.proposed > 0 and free.stats.per_sample_target_calls
    rows = []
    hook = fast.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        plain_capped = fast(generator=torch.Generator().manual_seed(3), output_type="pt", max_rows=2,
                            **{**kwargs, "window": 1})
    finally:
        hook.remove()
    assert max(rows) == 2 and sum(rows) == 3 * STEPS  # every call capped, the last step's mean included
    assert plain_capped.stats.peak_rows == 2 and plain_capped.stats.target_calls == STEPS
    pil, stats = fast(generator=torch.Generator().manual_seed(3), return_dict=False, **kwargs)
    assert len(pil) == 3 and pil[0].size == (8, 8) and stats.num_steps == STEPS
    with pytest.raises(ValueError, match="output_type"):
        fast(output_type="latent", **kwargs)
    with pytest.raises(ValueError, match="one torch.Generator per image"):
        fast(generator=[torch.Generator()], **kwargs)


def test_from_pipe_refuses_scheduler_options():
    plain, _ = pipes()
    with pytest.raises(ValueError, match="pass them to pipe"):
        SpeculativeScoreSdeVePipeline.from_pipe(plain, window=4)


@pytest.mark.parametrize("drafter", ["picard", "draft model"])
def test_other_drafters_run(drafter):
    _, fast = pipes(scale=3.0)
    draft = tiny_unet(2.0) if drafter == "draft model" else drafter
    out = fast(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(4), output_type="pt",
               window=4, drafter=draft)
    assert out.images.shape == (2, 3, 8, 8) and out.stats.proposed > 0
