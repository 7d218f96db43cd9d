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


def _hot_spots(stats: pstats.Stats, top: int = 10) -> list:
    """Own time of specdiff's functions and of the torch ops called directly from them."""
    def ours(func):
        return "specdiff" in func[0] and "site-packages" not in func[0]

    def name(func):
        return f"{Path(func[0]).name}:{func[2]}" if func[0] != "~" else func[2]

    spots = {}
    for func, (_, _, own, _, callers) in stats.stats.items():
        if ours(func):
            spots[name(func)] = spots.get(name(func), 0.0) + own
        elif func[0] == "~":  # a builtin: charge the calls made from specdiff code
            for caller, (_, _, caller_own, _) in callers.items():
                if ours(caller):
                    key = f"{name(func)} from {name(caller)}"
                    spots[key] = spots.get(key, 0.0) + caller_own
    return [[k, round(v, 3)] for k, v in sorted(spots.items(), key=lambda kv: -kv[1])[:top]]


def bench_overhead(out: Path, quick: bool = False) -> dict:
    from diffusers import DDPMPipeline

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
    for drafter_name, window_name in [("frozen", "16"), ("frozen", "auto"), ("picard", "auto")][: 1 if quick else 3]:
        row = {"drafter": drafter_name, "window": window_name}
        for profiled in (False, True):  # the fraction from a plain run; hot spots from a profiled one
            drafter = drafter_name
            chain = scheduler.chain(lambda x, t: unet(x, t).sample)
            window = AutoWindow() if window_name == "auto" else int(window_name)
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(1, unet.config.in_channels, size, size, generator=gen)
            clock, profile = _NetworkClock(unet), cProfile.Profile()
            started = time.perf_counter()
            if profiled:
                profile.enable()
            res = speculative_sample(chain, x, window=window, drafter=drafter, generator=gen)
            profile.disable()
            wall = time.perf_counter() - started
            clock.remove()
            if profiled:
                row["hot_spots_own_time_s"] = _hot_spots(pstats.Stats(profile))
            else:
                row.update(wall_clock_s=wall, network_s=clock.seconds, network_calls=clock.calls,
                           outside_network_fraction=1 - clock.seconds / wall, rounds=res.stats.rounds,
                           target_calls=res.stats.target_calls)
        rows.append(row)
    result = {"benchmark": "overhead", "command": "python -m specdiff.workbench.bench overhead", "num_steps": 1000,
              "batch_size": 1, "environment": _environment(),
              "note": "fraction from an unprofiled run (network time = UNet forwards); hot spots from a second, "
                      "profiled run: own time of specdiff functions and of the torch ops they call directly",
              "rows": rows}
    _write(out / "overhead.json", result)
    return result
