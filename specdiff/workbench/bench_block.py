"""Step-by-step vs block verification, same seeds: steps committed per target call, sequential
calls (rounds), wall-clock, on the analytic Gaussian mixture chain and a tiny masked chain.

    python -m specdiff.workbench.bench_block [--samples 400] [--out results/bench_block.json] [--churn]
    python -m specdiff.workbench.bench_block --masked --text --samples 64 --out assets/bench/block_discrete.json
    python -m specdiff.workbench.bench_block --speed [--repeats 3] --out results/block_speed.json

``--speed``: wall-clock of one run per rule of the tiny chains and the bundled digits DDPM (100
steps, frozen, window 8, batch 1 and 8), best of ``--repeats``: what the block code itself costs.

``--masked`` / ``--text``: the bundled masked-diffusion digits model (assets/models/digits-mdm) and
text model (assets/models/stdlib-text; needs ``transformers``), frozen and distilled drafters, step
vs block verification on the same per-sample generators (the Γ-maximal coupling is Gaussian only).
"""

from __future__ import annotations

import argparse
import math
import sys
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


def _bundled(masked: bool, text: bool, steps: dict):
    """``(name, chain, x, drafters {name: drafter}, steps)`` for the bundled discrete models."""
    from ..discrete.chain import MaskedDiffusionChain
    from ..discrete.model import MaskedDiffusionTransformer
    from ..discrete.scheduler import MaskedDiffusionScheduler
    from ..drafters import ModelDrafter
    from ..paths import asset

    if masked:
        folder = asset("models", "digits-mdm")
        target = MaskedDiffusionTransformer.from_pretrained(folder, subfolder="transformer").eval()
        draft = MaskedDiffusionTransformer.from_pretrained(folder / "drafter", subfolder="transformer").eval()
        for n in steps["masked"]:
            scheduler = MaskedDiffusionScheduler.from_pretrained(folder, subfolder="scheduler")
            scheduler.set_timesteps(n)
            chain = MaskedDiffusionChain(lambda x: target(x).logits, scheduler)
            drafters = {"frozen": None, "distilled": ModelDrafter(lambda x, step: draft(x).logits)}
            yield f"digits-mdm, {n} steps", chain, (64,), drafters
    if text:
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        from ..text.chain import MaskedLMChain

        folder = asset("models", "stdlib-text")
        target = AutoModelForMaskedLM.from_pretrained(folder / "transformer").eval()
        draft = AutoModelForMaskedLM.from_pretrained(folder / "drafter").eval()
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        for n in steps["text"]:
            scheduler = MaskedDiffusionScheduler.from_pretrained(folder, subfolder="scheduler")
            scheduler.set_timesteps(n)
            chain = MaskedLMChain.from_tokenizer(target, tokenizer, scheduler)
            drafter = MaskedLMChain.from_tokenizer(draft, tokenizer, scheduler)
            yield f"stdlib-text 128 tokens, {n} steps", chain, (128,), {"frozen": None,
                                                                       "distilled": ModelDrafter(drafter.predict)}


@torch.no_grad()
def run_bundled(samples: int, windows: list[int], masked: bool, text: bool, steps: dict, latency: int) -> dict:
    """Step vs block verification on the bundled discrete models. ``samples`` samples in one batch
    (generator ``i`` for sample ``i``, the same for both rules): each sample's own target calls are
    those of a batch-1 run (its draws depend on its own generator only), so ``steps_per_call``
    (mean over samples, with its standard error) is the batch-1 latency measure; ``batch_calls``
    are the batch's sequential calls. ``latency`` samples are then timed at batch 1, the rules
    interleaved sample by sample (a shared machine's load hits both alike)."""
    rows = []
    for name, chain, shape, drafters in _bundled(masked, text, steps):
        for drafter_name, drafter in drafters.items():
            for window in windows:
                record = {}
                for verify in ("step", "block"):
                    gens = [torch.Generator().manual_seed(i) for i in range(samples)]
                    started = time.perf_counter()
                    out = speculative_sample(chain, chain.prior(samples, shape), window=window, drafter=drafter,
                                             verify=verify, generator=gens)
                    wall = time.perf_counter() - started
                    s = out.stats
                    per_call = chain.num_steps / torch.tensor(s.per_sample_target_calls, dtype=torch.float64)
                    record[verify] = {
                        "workload": name, "drafter": drafter_name, "window": window, "verify": verify,
                        "steps_per_call": float(per_call.mean()),
                        "steps_per_call_se": float(per_call.std() / samples**0.5),
                        "calls_per_sample": sum(s.per_sample_target_calls) / samples,
                        "rows_per_sample": s.target_rows / samples,
                        "draft_calls": s.draft_calls,
                        "batch_calls": s.target_calls, "batch_wall_clock_s": wall, "per_sample": per_call,
                    }
                step_rate, block_rate = record["step"].pop("per_sample"), record["block"].pop("per_sample")
                gain = block_rate / step_rate - 1  # steps per call, per sample, paired by seed
                record["block"]["paired_gain"] = float(gain.mean())
                record["block"]["paired_gain_se"] = float(gain.std() / samples**0.5)
                times = {"step": 0.0, "block": 0.0}
                for i in range(latency):
                    for verify in times:
                        started = time.perf_counter()
                        speculative_sample(chain, chain.prior(1, shape), window=window, drafter=drafter,
                                           verify=verify, generator=torch.Generator().manual_seed(i))
                        times[verify] += time.perf_counter() - started
                for verify in times:
                    record[verify]["batch1_wall_clock_s"] = times[verify] / latency if latency else None
                rows += [record["step"], record["block"]]
    return {"environment": environment(), "samples": samples, "latency_samples": latency, "rows": rows}


def bundled_table(result: dict) -> str:
    lines = ["| workload | drafter | window | verify | steps/call (± s.e.) | block vs step, paired | calls/sample "
             "| rows/sample | batch calls | batch wall s | batch-1 wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        gain = f"{100 * r['paired_gain']:+.1f}% ± {100 * r['paired_gain_se']:.1f}" if "paired_gain" in r else ""
        batch1 = "" if r["batch1_wall_clock_s"] is None else f"{r['batch1_wall_clock_s']:.2f}"
        lines.append(f"| {r['workload']} | {r['drafter']} | {r['window']} | {r['verify']} | {r['steps_per_call']:.2f} "
                     f"± {r['steps_per_call_se']:.2f} | {gain} | {r['calls_per_sample']:.2f} "
                     f"| {r['rows_per_sample']:.1f} | {r['batch_calls']} | {r['batch_wall_clock_s']:.2f} | {batch1} |")
    return "\n".join(lines)


@torch.no_grad()
def run_speed(repeats: int) -> dict:
    """Seconds of one ``speculative_sample`` call per (workload, rule), best of ``repeats``, the
    rules interleaved so that a shared machine's load hits both alike."""
    from diffusers import DDPMPipeline

    from ..paths import asset
    from ..schedulers import SpeculativeScheduler

    mixture = GaussianMixtureDDPM.random(dim=2, components=4, num_steps=100, seed=1)
    x = mixture.sample_prior(400, torch.Generator().manual_seed(11), dtype=torch.float32)
    masked = MaskedDiffusionChain(LookupDenoiser(4, 6, seed=3), MaskedDiffusionScheduler(vocab_size=4,
                                                                                         num_inference_steps=24))
    ddpm = DDPMPipeline.from_pretrained(asset("models", "digits-ddpm"))
    unet = ddpm.unet.eval()
    scheduler = SpeculativeScheduler.from_scheduler(ddpm.scheduler)
    scheduler.set_timesteps(100)
    digits = scheduler.chain(lambda v, t: unet(v, t).sample)

    def noise(b):
        size = unet.config.sample_size
        return torch.randn(b, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))

    workloads = [
        ("mixture d=2, 400 samples, 100 steps, frozen, window 8", mixture, lambda: x, 8, "frozen", None),
        ("mixture d=2, 400 samples, 100 steps, picard, window 8", mixture, lambda: x, 8, "picard", None),
        ("masked V=4, 400 samples, 24 steps, frozen, window 4", masked, lambda: torch.full((400, 6), 4), 4,
         "frozen", None),
        ("digits DDPM, 100 steps, frozen, window 8, batch 1", digits, lambda: noise(1), 8, "frozen", 1),
        ("digits DDPM, 100 steps, frozen, window 8, batch 8", digits, lambda: noise(8), 8, "frozen", 8),
    ]
    rows = []
    for name, chain, x_init, window, drafter, per_sample in workloads:
        best = {"step": math.inf, "block": math.inf}
        for _ in range(repeats):
            for verify in best:
                gen = ([torch.Generator().manual_seed(100 + i) for i in range(per_sample)] if per_sample
                       else torch.Generator().manual_seed(13))
                started = time.perf_counter()
                speculative_sample(chain, x_init(), window=window, drafter=drafter, verify=verify, generator=gen)
                best[verify] = min(best[verify], time.perf_counter() - started)
        rows.append({"workload": name, "step_s": best["step"], "block_s": best["block"]})
    return {"environment": environment(), "repeats": repeats, "rows": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("results/bench_block.json"))
    parser.add_argument("--churn", action="store_true", help="the d = 512 churn protocol instead")
    parser.add_argument("--masked", action="store_true", help="the bundled masked-diffusion digits model")
    parser.add_argument("--text", action="store_true", help="the bundled text model (needs transformers)")
    parser.add_argument("--windows", type=int, nargs="+", default=[8, 16], help="with --masked / --text")
    parser.add_argument("--masked-steps", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--text-steps", type=int, nargs="+", default=[128])
    parser.add_argument("--latency-samples", type=int, default=2, help="samples timed at batch 1 (--masked/--text)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--speed", action="store_true", help="wall-clock of the block code (best of --repeats)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.speed:
        result = run_speed(args.repeats)
        result["command"] = "python -m specdiff.workbench.bench_block " + " ".join(argv or sys.argv[1:])
        write_result(args.out, result)
        print("| run | step s | block s |\n| --- | --- | --- |")
        for r in result["rows"]:
            print(f"| {r['workload']} | {r['step_s']:.2f} | {r['block_s']:.2f} |")
        return
    if args.masked or args.text:
        steps = {"masked": args.masked_steps, "text": args.text_steps}
        result = run_bundled(args.samples, args.windows, args.masked, args.text, steps, args.latency_samples)
        result["command"] = "python -m specdiff.workbench.bench_block " + " ".join(argv or sys.argv[1:])
        write_result(args.out, result)
        print(bundled_table(result))
        return
    result = run(args.samples, args.churn)
    write_result(args.out, result)
    print(f"{'workload':40s} {'verify':6s} {'steps/call':>10s} {'steps/round':>11s} {'seq. calls':>10s} {'wall s':>7s}")
    for r in result["rows"]:
        print(f"{r['workload']:40s} {r['verify']:6s} {r['steps_per_call']:10.3f} {r['steps_per_round']:11.3f} "
              f"{r['sequential_calls']:10d} {r['wall_clock_s']:7.2f}")


if __name__ == "__main__":
    main()
