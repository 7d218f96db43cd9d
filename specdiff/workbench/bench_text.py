"""Benchmark: plain, cached and speculative sampling of the bundled text model (stdlib-text).

    python -m specdiff.workbench.bench_text          # writes assets/bench/text.json + text.png

For each grid size N (128 tokens, unconditional) it samples ``--num-samples`` texts in
batches of ``--batch-size`` (16) with the plain sampler (one call per step), the cached
sampler (MDLM ``ddpm_cache``) and the speculative sampler for each window (frozen-target
drafter, and the distilled drafter in MODEL/drafter), and times ``--latency-samples`` texts
one at a time (batch 1, the samplers interleaved text by text). Recorded: target calls per
sample (the batch-1 latency unit), sequential calls per batch of 16, rows, draft calls,
acceptance, wall-clock at batch 1 and
16; and a two-sample check that speculative and plain texts have the same law (independent
seeds; per position, chi-square homogeneity of the character frequencies over the 7 most
frequent characters + "other", Bonferroni over positions, family-wise ``--alpha``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ..discrete.scheduler import MaskedDiffusionScheduler
from ..drafters import ModelDrafter
from ..paths import asset, results
from ..text.chain import MaskedLMChain
from .bench_discrete import _contingency_p, _run, bench_config, plot


def same_law_check(a: torch.Tensor, b: torch.Tensor, alpha: float = 1e-3, top: int = 7) -> dict:
    """Per-position chi-square homogeneity of token samples ``a``, ``b`` (``[n, L]``); tokens
    outside the ``top`` most frequent (pooled) are merged into one bin; Bonferroni over L."""
    a, b = a.cpu().numpy(), b.cpu().numpy()
    frequent = np.argsort(-np.bincount(np.concatenate([a.ravel(), b.ravel()])))[:top]
    lookup = np.full(max(a.max(), b.max()) + 1, top)
    lookup[frequent] = np.arange(top)
    p = [_contingency_p(lookup[a[:, i]], lookup[b[:, i]], top + 1) for i in range(a.shape[1])]
    threshold = alpha / len(p)
    return {"test": f"chi-square homogeneity per position (top {top} tokens + other), Bonferroni",
            "alpha": alpha, "min_p": min(p), "min_p_position": int(np.argmin(p)), "threshold": threshold,
            "passed": bool(min(p) >= threshold)}


def forward_cost(model, vocab: int, length: int, rows=(1, 2, 4, 8, 16), repeats: int = 5) -> dict:
    """Median seconds of one target call on ``rows`` texts: on a CPU the cost grows about
    linearly with the rows, which bounds what fewer sequential calls can save in wall-clock."""
    out = {}
    for r in rows:
        x = torch.randint(3, vocab, (r, length))
        model(x)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - started)
        out[str(r)] = float(np.median(times))
    return out


def batch1_latency(chain, length: int, configs: list, samples: int, seed: int) -> dict:
    """Seconds per text at batch 1, the samplers interleaved text by text (same seeds), so
    that the load of a shared machine hits all of them alike: ``{name: [seconds, ...]}``."""
    times = {name: [] for name, *_ in configs}
    for i in range(samples):
        for name, kind, window, drafter in configs:
            g = torch.Generator().manual_seed(seed + i)
            times[name].append(_run(kind, chain, chain.prior(1, (length,)), g, window, drafter).stats.wall_clock)
    return times


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark speculative sampling on the bundled text model")
    p.add_argument("--model", type=Path, default=asset("models", "stdlib-text"))
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, nargs="+", default=[128, 256])
    p.add_argument("--windows", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--drafter-windows", type=int, nargs="*", default=[16], help="windows for the distilled drafter")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--latency-samples", type=int, default=8, help="texts timed one at a time (batch 1)")
    p.add_argument("--alpha", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=results("text.json"))
    p.add_argument("--table", action="store_true", help="only print the README table of the saved --out results")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    args = parse_args(argv)
    if args.table:
        results = json.loads(args.out.read_text())
        print(table(results))
        return results
    torch.set_num_threads(args.threads)
    target = AutoModelForMaskedLM.from_pretrained(args.model / "transformer").eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model / "tokenizer")
    scheduler = MaskedDiffusionScheduler.from_pretrained(args.model, subfolder="scheduler")
    draft = None
    if (args.model / "drafter").exists() and args.drafter_windows:
        draft = MaskedLMChain.from_tokenizer(
            AutoModelForMaskedLM.from_pretrained(args.model / "drafter").eval(), tokenizer, scheduler)
    results = {
        "command": "python -m specdiff.workbench.bench_text",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": (
            f"CPU, {args.threads} thread(s), {platform.processor() or platform.machine()}, torch {torch.__version__}"
        ),
        "model": args.model.name,
        "target_parameters": sum(p.numel() for p in target.parameters()),
        "drafter_parameters": None if draft is None else sum(p.numel() for p in draft.denoiser.model.parameters()),
        "runs": [],
    }
    started = time.perf_counter()
    with torch.no_grad():
        results["target_call_seconds_by_rows"] = forward_cost(target, len(tokenizer), args.length)
        for n in args.steps:
            scheduler.set_timesteps(n)
            chain = MaskedLMChain.from_tokenizer(target, tokenizer, scheduler)
            batch_args = argparse.Namespace(**{**vars(args), "latency_samples": 0})
            plain, plain_x = bench_config("plain", chain, args.length, batch_args, seed=args.seed + 1)
            cached, _ = bench_config("cached", chain, args.length, batch_args, seed=args.seed + 2)
            configs = [(w, None) for w in args.windows]
            configs += [(w, ModelDrafter(draft.predict)) for w in args.drafter_windows if draft is not None]
            specs = []
            for w, drafter in configs:
                rec, spec_x = bench_config("speculative", chain, args.length, batch_args, seed=args.seed + 3,
                                           window=w, drafter=drafter)
                rec["same_law_as_plain"] = same_law_check(spec_x, plain_x, args.alpha)
                specs.append(rec)
            latency = batch1_latency(
                chain, args.length,
                [("plain", "plain", None, None), ("cached", "cached", None, None)]
                + [(_name(r), "speculative", w, d) for r, (w, d) in zip(specs, configs)],
                args.latency_samples, seed=args.seed + 10**6)
            for rec in [plain, cached, *specs]:
                rec["wall_clock_batch1_seconds"] = latency[_name(rec)]
                rec["wall_clock_batch1_seconds_per_sample"] = float(np.mean(latency[_name(rec)]))
            for rec in specs:
                for base in (plain, cached):
                    name = base["sampler"]
                    rec[f"calls_vs_{name}"] = base["target_calls_per_sample"] / rec["target_calls_per_sample"]
                    rec[f"wall_batch1_vs_{name}"] = (base["wall_clock_batch1_seconds_per_sample"]
                                                     / rec["wall_clock_batch1_seconds_per_sample"])
                    rec[f"wall_batch{args.batch_size}_vs_{name}"] = (base["wall_clock_batch_seconds"]
                                                                   / rec["wall_clock_batch_seconds"])
                print(f"N={n} L={rec['window']} {rec['drafter']}: {rec['target_calls_per_sample']:.1f} calls/sample "
                      f"(cached {cached['target_calls_per_sample']:.1f}, {rec['calls_vs_cached']:.2f}x), batch-1 wall "
                      f"{rec['wall_batch1_vs_cached']:.2f}x cached, acceptance {rec['acceptance_rate']:.3f}, "
                      f"same law {rec['same_law_as_plain']['passed']}", flush=True)
            results["runs"] += [plain, cached, *specs]
    batches = -(-args.num_samples // args.batch_size)
    for rec in results["runs"]:  # per batch of --batch-size, the unit of the README table
        rec["sequential_calls_per_batch"] = rec["sequential_batched_calls"] / batches
        rec["wall_clock_per_batch_seconds"] = rec["wall_clock_batch_seconds"] / batches
    results["total_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(table(results))
    return results


def _name(r: dict) -> str:
    return r["sampler"] if r["sampler"] != "speculative" else f"speculative {r['drafter']} L={r['window']}"


def table(results: dict) -> str:
    """The README table (markdown) from a results file; ratios are the cached sampler's
    figure over the row's (above 1: the row is better)."""
    b = results["args"]["batch_size"]
    header = (f"| steps | sampler | calls / text, batch 1 | vs cached | wall-clock / text, batch 1 | vs cached | "
              f"calls / batch of {b} | wall-clock / batch of {b} | vs cached | acceptance "
              f"| same law as plain (min p) |")
    lines = [header,
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    cached = {r["num_steps"]: r for r in results["runs"] if r["sampler"] == "cached"}
    for r in results["runs"]:
        c, law = cached[r["num_steps"]], r.get("same_law_as_plain")
        calls, wall1, wall = (r[k] for k in ("target_calls_per_sample", "wall_clock_batch1_seconds_per_sample",
                                             "wall_clock_per_batch_seconds"))
        lines.append(
            f"| {r['num_steps']} | {_name(r)} | {calls:.1f} | {c['target_calls_per_sample'] / calls:.2f}x | "
            f"{wall1:.3f} s | {c['wall_clock_batch1_seconds_per_sample'] / wall1:.2f}x | "
            f"{r['sequential_calls_per_batch']:.1f} | {wall:.2f} s | {c['wall_clock_per_batch_seconds'] / wall:.2f}x | "
            + (f"{r['acceptance_rate']:.3f} | " if "acceptance_rate" in r else "- | ")
            + (f"{'yes' if law['passed'] else 'NO'} ({law['min_p']:.2g}) |" if law else "- |"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
