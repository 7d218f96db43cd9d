"""ParaDiGMS (Shih et al., "Parallel Sampling of Diffusion Models", NeurIPS 2023) for an
unconditional DDPM UNet, on diffusers' ``DDPMParallelScheduler``: the peer baseline of the
benchmark. Approximate: a step counts as converged when its Picard update moves it by less
than ``tolerance`` (in units of the step's noise std, per dimension), so its output law is
the plain sampler's only as the tolerance goes to 0; the benchmark reports its quality.

Sliding-window Picard iteration: all T step noises are drawn up front; each iteration
evaluates the UNet on the window's ``parallel`` states in ONE batched call, rebuilds every
state of the window as the start state plus the cumulative sum of its steps' drifts and
noises, and slides the window past the leading steps whose update was below tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ParadigmsResult:
    sample: Tensor
    target_calls: int  # sequential batched UNet calls
    target_rows: int  # states evaluated per image
    max_rows: int  # the largest UNet batch (memory)


@torch.no_grad()
def paradigms_sample(unet, scheduler, latents: Tensor, *, num_inference_steps: int = 1000, parallel: int = 32,
                     tolerance: float = 0.1, generator: torch.Generator | None = None) -> ParadigmsResult:
    """ParaDiGMS sampling from ``latents`` (x_T); ``scheduler`` a ``DDPMParallelScheduler``
    (or its config) with a fixed variance."""
    from diffusers import DDPMParallelScheduler

    scheduler = DDPMParallelScheduler.from_config(scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps.to(latents.device)
    steps, batch, dims = len(timesteps), latents.shape[0], latents[0].numel()
    # Noise std of each step (DDPM adds none on its last step) and the convergence scale.
    std = torch.stack([scheduler._get_variance(int(t)).clamp(min=0).sqrt() if int(t) > 0 else torch.tensor(0.0)
                       for t in timesteps]).to(latents)
    scale = torch.where(std > 0, std, std[std > 0].min()) ** 2 * dims
    noise = torch.randn((steps, *latents.shape), generator=generator, dtype=latents.dtype).to(latents.device)
    noise = noise * std.view(-1, *[1] * latents.ndim)

    xs = latents[None].repeat(steps + 1, *[1] * latents.ndim)  # xs[k]: the state before step k
    begin, end = 0, min(parallel, steps)
    calls = rows = max_rows = 0
    while begin < steps:
        window = xs[begin:end].flatten(0, 1)
        t = timesteps[begin:end].repeat_interleave(batch)
        eps = unet(window, t).sample
        mean = scheduler.batch_step_no_noise(eps, t, window).view(end - begin, *latents.shape)
        calls, rows, max_rows = calls + 1, rows + window.shape[0], max(max_rows, window.shape[0])
        increments = mean - xs[begin:end] + noise[begin:end]
        new = xs[begin] + increments.cumsum(0)
        error = (new - xs[begin + 1:end + 1]).flatten(2).pow(2).sum(-1).amax(1) / scale[begin:end]
        xs[begin + 1:end + 1] = new
        above = (error > tolerance**2).nonzero()
        converged = int(above[0]) if len(above) else end - begin  # leading steps below tolerance
        begin = begin + min(converged + 1, end - begin)
        new_end = min(begin + parallel, steps)
        xs[end + 1:new_end + 1] = xs[end]  # new window states start from the last known one
        end = new_end
    return ParadigmsResult(sample=xs[steps], target_calls=calls, target_rows=rows // batch, max_rows=max_rows)
