"""What a new user of SpeculativeDDPMPipeline hit (issue 11 §4): from_pipe honours scheduler
options and keeps the user's dtype, bfloat16 gives numpy/PIL images, a wrong generator list is
one clear error."""

import logging

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from specdiff.pipelines import SpeculativeDDPMPipeline


def tiny_ddpm(scheduler_cls=DDPMScheduler, dtype=torch.float32):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    return DDPMPipeline(unet=unet.to(dtype), scheduler=scheduler_cls(num_train_timesteps=100))


def test_from_pipe_honours_eta_for_ddim():
    ddim = tiny_ddpm(DDIMScheduler)
    pipe = SpeculativeDDPMPipeline.from_pipe(ddim, eta=1.0, window=3)
    assert pipe.scheduler.config.eta == 1.0 and pipe.scheduler.config.window == 3
    assert pipe.unet is ddim.unet
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (2, 8, 8, 1)
    with pytest.raises(ValueError, match="deterministic"):
        SpeculativeDDPMPipeline.from_pipe(ddim)  # eta=0 stays refused, with the reason


def test_from_pipe_keeps_the_users_dtype_silently(caplog):
    half = tiny_ddpm(dtype=torch.bfloat16)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pipe = SpeculativeDDPMPipeline.from_pipe(half)
    assert pipe.unet is half.unet and half.unet.dtype == torch.bfloat16  # not cast to float32 in place
    assert not [r for r in caplog.records if "float32" in r.getMessage()]
    assert SpeculativeDDPMPipeline.from_pipe(half, dtype=torch.float32).unet.dtype == torch.float32  # when asked


@pytest.mark.parametrize("output_type", ["np", "pil", "pt"])
def test_bfloat16_gives_every_output_type(output_type):
    pipe = SpeculativeDDPMPipeline.from_pipe(tiny_ddpm(dtype=torch.bfloat16), window=4)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=8, generator=torch.Generator().manual_seed(0),
                  output_type=output_type).images
    if output_type == "np":
        assert images.dtype == np.float32 and images.shape == (2, 8, 8, 1)
    elif output_type == "pil":
        assert len(images) == 2 and images[0].size == (8, 8)
    else:
        assert images.dtype == torch.bfloat16 and images.shape == (2, 1, 8, 8)


def test_a_generator_list_of_the_wrong_length_is_one_clear_error():
    pipe = SpeculativeDDPMPipeline.from_pipe(tiny_ddpm())
    with pytest.raises(ValueError, match="2 generators for a batch of 3 images"):
        pipe(batch_size=3, num_inference_steps=5, generator=[torch.Generator().manual_seed(i) for i in range(2)])


def test_an_unknown_output_type_is_refused():
    pipe = SpeculativeDDPMPipeline.from_pipe(tiny_ddpm())
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="output_type"):
        pipe(batch_size=1, num_inference_steps=2, output_type="latent")
