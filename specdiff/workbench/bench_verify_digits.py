"""Reflection vs Γ-maximal coupling vs block verification on the bundled digits DDPM, batch 1, same
seeds: steps committed per target call, sequential calls, rows, wall-clock.

    python -m specdiff.workbench.bench_verify_digits [--steps 100 1000] [--seeds 3] [--window 16]

Writes ``assets/bench/verify_digits.json`` (or ``--out``) and prints the markdown table that
docs/block-verification.md shows.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import DDPMPipeline

from ..paths import asset, results
from ..sampler import speculative_sample
from ..schedulers import SpeculativeScheduler
from .results import environment, write_result

RULES = [("reflection", "step"), ("maximal", "step"), ("reflection", "block")]


def run(steps: list[int], seeds: int, window: int) -> dict:
    ddpm = DDPMPipeline.from_pretrained(asset("models", "digits-ddpm"))
    unet = ddpm.unet.eval()
    size, channels = unet.config.sample_size, unet.config.in_channels
    rows = []
    for num_steps in steps:
        scheduler = SpeculativeScheduler.from_scheduler(ddpm.scheduler)
        scheduler.set_timesteps(num_steps)
        chain = scheduler.chain(lambda x, t: unet(x, t).sample)
        for drafter in ("frozen", "picard"):
            for coupling, verify in RULES:
                calls = rounds_rows = committed = wall = 0.0
                for seed in range(seeds):
                    latents = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(seed))
                    started = time.perf_counter()
                    out = speculative_sample(chain, latents, window=window, drafter=drafter, coupling=coupling,
                                             verify=verify, generator=torch.Generator().manual_seed(100 + seed))
                    wall += time.perf_counter() - started
                    calls += out.stats.target_calls
                    rounds_rows += out.stats.target_rows
                    committed += num_steps
                rows.append({"steps": num_steps, "drafter": drafter, "coupling": coupling, "verify": verify,
                             "window": window, "target_calls": calls / seeds, "target_rows": rounds_rows / seeds,
                             "steps_per_call": committed / calls, "wall_clock_s": wall / seeds})
    return {"environment": environment(), "seeds": seeds, "rows": rows,
            "command": f"python -m specdiff.workbench.bench_verify_digits --steps {' '.join(map(str, steps))} "
                       f"--seeds {seeds} --window {window}"}


def table(result: dict) -> str:
    lines = [f"Bundled digits DDPM, batch 1, window {result['rows'][0]['window']}, mean of {result['seeds']} seeds "
             f"(`{result['command']}`):", "",
             "| steps | drafter | coupling | verify | sequential calls | rows | steps per call | wall-clock s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['steps']} | {r['drafter']} | {r['coupling']} | {r['verify']} | {r['target_calls']:.1f} "
                     f"| {r['target_rows']:.0f} | {r['steps_per_call']:.2f} | {r['wall_clock_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--out", type=Path, default=results("verify_digits.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = run(args.steps, args.seeds, args.window)
    write_result(args.out, result)
    print(table(result))


if __name__ == "__main__":
    main()
