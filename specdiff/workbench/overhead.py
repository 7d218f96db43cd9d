"""Loop overhead: the share of a speculative run's wall-clock spent outside network calls
(bundled digits DDPM, 1000 steps, batch 1), and where it goes (cProfile, by own time).

    python -m specdiff.workbench.bench overhead      # writes assets/bench/overhead.json
"""

from __future__ import annotations

import cProfile
import pstats
import time
from pathlib import Path

import torch


class _NetworkClock:
    """Sums the wall-clock of every UNet forward (CPU: no device sync needed)."""

    def __init__(self, unet):
        self.seconds, self.calls, self._start = 0.0, 0, 0.0
        self.handles = [unet.register_forward_pre_hook(self.pre), unet.register_forward_hook(self.post)]

    def pre(self, module, args):
        self._start = time.perf_counter()

    def post(self, module, args, output):
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def bench_overhead(out: Path, quick: bool = False) -> dict:
    from diffusers import DDPMPipeline

    from ..drafters_research import PicardDrafter
    from ..paths import asset
    from ..sampler import speculative_sample
    from ..schedulers.speculative import SpeculativeScheduler
    from ..window import AutoWindow
    from .bench import _environment, _write

    pipe = DDPMPipeline.from_pretrained(asset("models", "digits-ddpm"))
    unet = pipe.unet
    scheduler = SpeculativeScheduler.from_scheduler(pipe.scheduler)
    scheduler.set_timesteps(1000)
    size = unet.config.sample_size
    rows = []
    for drafter_name, window_name in [("frozen", "16"), ("frozen", "auto"), ("picard", "auto")]:
        drafter = PicardDrafter() if drafter_name == "picard" else None
        chain = scheduler.chain(lambda x, t: unet(x, t).sample)
        chain = drafter.watch(chain) if drafter else chain
        window = AutoWindow() if window_name == "auto" else int(window_name)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, unet.config.in_channels, size, size, generator=gen)
        clock = _NetworkClock(unet)
        profile = cProfile.Profile()
        started = time.perf_counter()
        profile.enable()
        res = speculative_sample(chain, x, window=window, drafter=drafter, generator=gen)
        profile.disable()
        wall = time.perf_counter() - started
        clock.remove()
        stats = pstats.Stats(profile)
        network = {"forward", "_conv_forward", "conv2d", "linear", "group_norm", "silu", "_call_impl",
                   "_wrapped_call_impl", "scaled_dot_product_attention", "interpolate", "cat", "baddbmm", "softmax"}
        hot = sorted(((v[2], f"{Path(k[0]).name}:{k[1]}({k[2]})") for k, v in stats.stats.items()
                      if "torch/nn" not in k[0] and "diffusers/models" not in k[0] and k[2] not in network),
                     reverse=True)[:12]
        rows.append({"drafter": drafter_name, "window": window_name, "wall_clock_s": wall,
                     "network_s": clock.seconds, "network_calls": clock.calls,
                     "outside_network_fraction": 1 - clock.seconds / wall,
                     "rounds": res.stats.rounds, "target_calls": res.stats.target_calls,
                     "hot_spots_own_time_s": [[name, round(t, 3)] for t, name in hot]})
    result = {"benchmark": "overhead", "command": "python -m specdiff.workbench.bench overhead", "num_steps": 1000,
              "batch_size": 1, "environment": _environment(),
              "note": "profiled runs (cProfile on) overstate the overhead somewhat; network time = UNet forwards",
              "rows": rows}
    _write(out / "overhead.json", result)
    return result
