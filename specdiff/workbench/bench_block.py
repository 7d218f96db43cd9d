"""Step-by-step vs block verification, same seeds: steps committed per target call, sequential
calls (rounds), wall-clock, on the analytic Gaussian mixture chain and a tiny masked chain.

    python -m specdiff.workbench.bench_block [--samples 400] [--out results/bench_block.json] [--churn]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..discrete import LookupDenoiser, MaskedDiffusionChain, MaskedDiffusionScheduler
from ..discrete.chain import ScaledDrafter
from ..sampler import speculative_sample
from ..testing import GaussianMixtureDDPM
from .results import environment, write_result


def _workloads(samples: int):
    mixture = GaussianMixtureDDPM.random(dim=2, components=4, num_steps=100, seed=1)
    x = mixture.sample_prior(samples, torch.Generator().manual_seed(11), dtype=torch.float32)
    for drafter in ("frozen", "picard"):
        yield f"mixture d=2, 100 steps, {drafter}", mixture, x, drafter, 8
    scheduler = MaskedDiffusionScheduler(vocab_size=4, num_inference_steps=24)
    masked = MaskedDiffusionChain(LookupDenoiser(4, 6, seed=3), scheduler)
    tokens = torch.full((samples, 6), 4)
    yield "masked V=4 L=6, 24 steps, frozen", masked, tokens, None, 4
    yield "masked V=4 L=6, 24 steps, bad drafter", masked, tokens, ScaledDrafter(-1.0), 4


def _churn(samples: int):
    """The d = 512 churn protocol (:mod:`.churn`), frozen and Picard drafters, windows 4 and 8."""
    from .churn import ChurnMixtureChain

    chain = ChurnMixtureChain()
    x = chain.initial_state(samples, torch.Generator().manual_seed(0))
    for drafter in ("frozen", "picard"):
        for window in (4, 8):
            yield f"churn d=512, 28 steps, {drafter}", chain, x, drafter, window


def run(samples: int, churn: bool = False) -> dict:
    rows = []
    workloads = _churn(samples) if churn else _workloads(samples)
    for name, chain, x, drafter, window in workloads:
        for verify in ("step", "block"):
            started = time.perf_counter()
            out = speculative_sample(chain, x, window=window, drafter=drafter, verify=verify,
                                     generator=torch.Generator().manual_seed(13))
            s = out.stats
            calls = torch.tensor(s.per_sample_target_calls, dtype=torch.float64)
            rounds = torch.tensor(s.committed_per_round, dtype=torch.float64)
            rows.append({
                "workload": name, "window": window, "verify": verify,
                "steps_per_call": chain.num_steps / float(calls.mean()),
                "steps_per_round": float((rounds * torch.arange(len(rounds))).sum() / rounds.sum()),
                "sequential_calls": s.target_calls,
                "wall_clock_s": time.perf_counter() - started,
            })
    return {"environment": environment(), "samples": samples, "rows": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("results/bench_block.json"))
    parser.add_argument("--churn", action="store_true", help="the d = 512 churn protocol instead")
    args = parser.parse_args(argv)
    result = run(args.samples, args.churn)
    write_result(args.out, result)
    print(f"{'workload':40s} {'verify':6s} {'steps/call':>10s} {'steps/round':>11s} {'seq. calls':>10s} {'wall s':>7s}")
    for r in result["rows"]:
        print(f"{r['workload']:40s} {r['verify']:6s} {r['steps_per_call']:10.3f} {r['steps_per_round']:11.3f} "
              f"{r['sequential_calls']:10d} {r['wall_clock_s']:7.2f}")


if __name__ == "__main__":
    main()
