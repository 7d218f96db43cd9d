"""The ParaDiGMS baseline of the benchmark (specdiff.workbench.paradigms) is the sequential
DDPM sampler with the same noise once its tolerance is zero, and saves calls when it is not."""

import torch
from diffusers import DDPMParallelScheduler, DDPMScheduler, UNet2DModel

from specdiff.workbench.paradigms import paradigms_sample


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False,
    ).eval()  # fmt: skip


@torch.no_grad()
def sequential(unet, scheduler, x, steps, generator):
    """The plain DDPM loop with ParaDiGMS's noise (all steps drawn up front, as one tensor)."""
    scheduler = DDPMParallelScheduler.from_config(scheduler.config)
    scheduler.set_timesteps(steps)
    noise = torch.randn((steps, *x.shape), generator=generator)
    for k, t in enumerate(scheduler.timesteps):
        ts = t.repeat(x.shape[0])
        mean = scheduler.batch_step_no_noise(unet(x, ts).sample, ts, x)
        x = mean + (scheduler._get_variance(int(t)).sqrt() * noise[k] if t > 0 else 0)
    return x


def test_zero_tolerance_reproduces_the_sequential_sampler_and_a_tolerance_saves_calls():
    unet, scheduler = tiny_unet(), DDPMScheduler(num_train_timesteps=100)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    reference = sequential(unet, scheduler, x, 40, torch.Generator().manual_seed(2))
    exact = paradigms_sample(unet, scheduler, x, num_inference_steps=40, parallel=8, tolerance=0.0,
                             generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(exact.sample, reference, atol=1e-4, rtol=0)
    loose = paradigms_sample(unet, scheduler, x, num_inference_steps=40, parallel=8, tolerance=0.5,
                             generator=torch.Generator().manual_seed(2))
    assert loose.target_calls < exact.target_calls and loose.max_rows == 2 * 8
