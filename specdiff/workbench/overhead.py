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

from .results import environment, write_result


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


def bench_overhead(out: Path, quick: bool = False, repeats: int = 5) -> dict:
    import statistics

    from diffusers import DDPMPipeline

    from ..paths import asset
    from ..sampler import speculative_sample
    from ..schedulers.speculative import SpeculativeScheduler
    from ..window import AutoWindow

    pipe = DDPMPipeline.from_pretrained(asset("models", "digits-ddpm"))
    unet = pipe.unet
    scheduler = SpeculativeScheduler.from_scheduler(pipe.scheduler)
    scheduler.set_timesteps(1000)
    size = unet.config.sample_size
    chain = scheduler.chain(lambda x, t: unet(x, t).sample)
    # The auto window's calibration is measured once per model/device/dtype/shape (and drafter) and
    # cached; measure it before timing, as a user's second run would find it.
    for drafter in ("frozen", "picard"):
        AutoWindow().bind(chain, torch.zeros(1, unet.config.in_channels, size, size), drafter)
    settings = [("frozen", "16"), ("frozen", "auto"), ("picard", "auto")][: 1 if quick else 3]

    def run(drafter: str, window_name: str, profile: cProfile.Profile | None = None):
        window = AutoWindow() if window_name == "auto" else int(window_name)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, unet.config.in_channels, size, size, generator=gen)
        clock = _NetworkClock(unet)
        started = time.perf_counter()
        if profile is not None:
            profile.enable()
        res = speculative_sample(chain, x, window=window, drafter=drafter, generator=gen)
        if profile is not None:
            profile.disable()
        wall = time.perf_counter() - started
        clock.remove()
        return dict(wall_clock_s=wall, network_s=clock.seconds, network_calls=clock.calls,
                    outside_network_fraction=1 - clock.seconds / wall, rounds=res.stats.rounds,
                    target_calls=res.stats.target_calls)

    # Fractions from plain runs, the settings interleaved (a shared machine's load hits them alike);
    # each row reports its median run. Hot spots from one more, profiled run.
    runs = {s: [] for s in settings}
    for _ in range(1 if quick else repeats):
        for s in settings:
            runs[s].append(run(*s))
    rows = []
    for (drafter, window_name), measured in runs.items():
        median = statistics.median(r["outside_network_fraction"] for r in measured)
        row = {"drafter": drafter, "window": window_name,
               **min(measured, key=lambda r: abs(r["outside_network_fraction"] - median)),
               "outside_network_fraction_runs": [round(r["outside_network_fraction"], 4) for r in measured]}
        profile = cProfile.Profile()
        run(drafter, window_name, profile)
        row["hot_spots_own_time_s"] = _hot_spots(pstats.Stats(profile))
        rows.append(row)
    result = {"benchmark": "overhead", "command": "python -m specdiff.workbench.bench overhead", "num_steps": 1000,
              "batch_size": 1, "repeats": 1 if quick else repeats, "environment": environment(),
              "note": "outside_network_fraction = 1 - (time in UNet forwards) / wall-clock of speculative_sample; "
                      "each row is the median of interleaved unprofiled runs (all runs listed); hot spots from "
                      "one more, profiled run: own time of specdiff functions and of the torch ops they call directly",
              "rows": rows}
    write_result(out / "overhead.json", result)
    return result
