"""Benchmark: speculative vs plain vs cached ancestral sampling of the bundled digits model.

    python -m specdiff.workbench.bench_discrete            # writes assets/bench/discrete.json + discrete.png

For each grid size N it samples ``--num-samples`` digits with the plain sampler (one call per
step), the cached sampler (MDLM ``ddpm_cache``: no call while a sample's tokens are
unchanged) and the speculative sampler for each window (frozen-target drafter, and the
independent small model when ``--drafter-model`` exists). It records

* target calls per sample (the latency unit: what a batch-1 run would wait for), sequential
  batched calls, target rows (the compute unit), draft calls, acceptance, residual draws;
* wall-clock at ``--batch-size`` (CPU: a verification call over L rows costs ~L single
  rows, so the compute saved is smaller than the calls saved) and at batch 1 on a few
  samples (latency);
* a two-sample check that speculative and plain outputs have the same law, with
  independent seeds: chi-square on the per-position token histograms (Bonferroni over
  the 64 positions) and on the histogram of total ink, at family-wise level ``--alpha``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats as sps

from ..discrete.chain import MaskedDiffusionChain
from ..discrete.model import MaskedDiffusionTransformer
from ..discrete.scheduler import MaskedDiffusionScheduler
from ..paths import asset, results
from ..sampler import sample_baseline_discrete, speculative_sample_discrete


def _contingency_p(a: np.ndarray, b: np.ndarray, categories: int) -> float:
    """Chi-square test of homogeneity of two samples of categorical values."""
    table = np.stack([np.bincount(a, minlength=categories), np.bincount(b, minlength=categories)])
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return 1.0
    return float(sps.chi2_contingency(table, correction=False).pvalue)


def same_law_check(a: torch.Tensor, b: torch.Tensor, vocab_size: int, alpha: float = 1e-3) -> dict:
    """Do token samples ``a`` and ``b`` (``[n, L]``) have the same law? Per-position chi-square
    tests plus one on total ink (bins merged to keep expected counts >= 5), Bonferroni at
    family-wise level ``alpha``."""
    a, b = a.cpu().numpy(), b.cpu().numpy()
    p_pos = [_contingency_p(a[:, i], b[:, i], vocab_size) for i in range(a.shape[1])]
    ink_a, ink_b = a.sum(1), b.sum(1)
    edges = np.unique(np.quantile(np.concatenate([ink_a, ink_b]), np.linspace(0, 1, 11)))
    p_ink = _contingency_p(np.digitize(ink_a, edges[1:-1]), np.digitize(ink_b, edges[1:-1]), len(edges))
    p_all = p_pos + [p_ink]
    threshold = alpha / len(p_all)
    return {
        "test": "chi-square homogeneity per position + total ink, Bonferroni",
        "alpha": alpha,
        "min_p": min(p_all),
        "min_p_position": int(np.argmin(p_pos)),
        "p_ink": p_ink,
        "threshold": threshold,
        "passed": bool(min(p_all) >= threshold),
    }


def _load(model_dir: Path):
    transformer = MaskedDiffusionTransformer.from_pretrained(model_dir, subfolder="transformer").eval()
    scheduler = MaskedDiffusionScheduler.from_pretrained(model_dir, subfolder="scheduler")
    return transformer, scheduler


def _run(kind: str, chain, x_init, generator, window=None, drafter=None):
    if kind == "plain":
        return sample_baseline_discrete(chain, x_init, generator, return_stats=True)
    if kind == "cached":
        return sample_baseline_discrete(chain, x_init, generator, cached=True, return_stats=True)
    return speculative_sample_discrete(chain, x_init, window=window, drafter=drafter, generator=generator)


def bench_config(kind, chain, length, args, seed, window=None, drafter=None) -> tuple[dict, torch.Tensor]:
    """Sample ``args.num_samples`` in batches of ``args.batch_size``; then time ``args.latency_samples``
    samples one at a time."""
    samples, calls, rows, seq, draft, prop, acc, resid, wall, rounds = [], [], 0, 0, 0, 0, 0, 0, 0.0, 0
    committed = np.zeros((window or 1) + 1)
    for start in range(0, args.num_samples, args.batch_size):
        b = min(args.batch_size, args.num_samples - start)
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(b)]
        out = _run(kind, chain, chain.prior(b, (length,)), gens, window, drafter)
        s = out.stats
        samples.append(out.sample)
        calls += s.per_sample_target_calls
        rows, seq, draft, wall = rows + s.target_rows, seq + s.target_calls, draft + s.draft_calls, wall + s.wall_clock
        prop, acc, resid, rounds = prop + s.proposed, acc + s.accepted, resid + s.residual_draws, rounds + s.rounds
        if kind == "speculative":
            committed += np.asarray(s.committed_per_round)
    latency = []
    for i in range(args.latency_samples):
        g = torch.Generator().manual_seed(seed * 7_919 + 10**6 + i)
        latency.append(_run(kind, chain, chain.prior(1, (length,)), g, window, drafter).stats.wall_clock)
    n = chain.num_steps
    record = {
        "sampler": kind,
        "window": window,
        "drafter": None if kind != "speculative" else ("model" if drafter is not None else "frozen"),
        "num_steps": n,
        "target_calls_per_sample": float(np.mean(calls)),
        "target_calls_per_sample_std": float(np.std(calls)),
        "sequential_batched_calls": seq,
        "target_rows": rows,
        "draft_calls": draft,
        "speedup_calls_vs_plain": n / float(np.mean(calls)),
        "wall_clock_batch_seconds": wall,
        "wall_clock_batch1_seconds_per_sample": float(np.mean(latency)) if latency else None,
    }
    if kind == "speculative":
        record.update(
            acceptance_rate=acc / prop if prop else 1.0,
            proposed=prop,
            accepted=acc,
            residual_draws=resid,
            rounds=rounds,
            mean_committed_per_round=float((committed * np.arange(len(committed))).sum() / max(committed.sum(), 1)),
        )
    return record, torch.cat(samples)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark discrete speculative sampling on the bundled digits model")
    p.add_argument("--model", type=Path, default=asset("models", "digits-mdm"))
    p.add_argument(
        "--drafter-model",
        default=None,
        help="folder of a smaller transformer (transformer/ subfolder) for the independent-model drafter; "
        "default: MODEL/drafter if it exists; 'none' to skip",
    )
    p.add_argument("--steps", type=int, nargs="+", default=[64, 256])
    p.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--latency-samples", type=int, default=8, help="samples timed one at a time (batch 1)")
    p.add_argument("--alpha", type=float, default=1e-3, help="family-wise level of the two-sample check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=results("discrete.json"))
    p.add_argument("--quick", action="store_true", help="a smoke run: 64 steps, windows 4 and 8, 32 samples")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: --out with .png)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.steps, args.windows, args.num_samples, args.batch_size, args.latency_samples = [64], [4, 8], 32, 32, 1
    torch.set_num_threads(args.threads)
    transformer, scheduler = _load(args.model)
    levels, length = scheduler.config.vocab_size, transformer.config.sample_size**2

    def target(x):
        return transformer(x).logits

    draft_dir = args.model / "drafter" if args.drafter_model is None else Path(args.drafter_model)
    draft_model = None
    if args.drafter_model != "none" and (draft_dir / "transformer").exists():
        draft_model = MaskedDiffusionTransformer.from_pretrained(draft_dir, subfolder="transformer").eval()
        if draft_model.config.vocab_size != levels or draft_model.config.sample_size**2 != length:
            raise ValueError(
                f"the drafter in {draft_dir} does not match the target's tokens ({levels} levels, {length} positions)"
            )
    elif args.drafter_model not in (None, "none"):
        raise FileNotFoundError(f"no transformer/ folder in --drafter-model {draft_dir}")

    results = {
        "command": "python -m specdiff.workbench.bench_discrete",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": (
            f"CPU, {args.threads} thread(s), {platform.processor() or platform.machine()}, torch {torch.__version__}"
        ),
        "model": str(args.model),
        "target_parameters": sum(p.numel() for p in transformer.parameters()),
        "drafter_parameters": None if draft_model is None else sum(p.numel() for p in draft_model.parameters()),
        "runs": [],
    }
    started = time.perf_counter()
    with torch.no_grad():
        for n in args.steps:
            scheduler.set_timesteps(n)
            chain = MaskedDiffusionChain(target, scheduler)
            plain, plain_x = bench_config("plain", chain, length, args, seed=args.seed + 1)
            cached, _ = bench_config("cached", chain, length, args, seed=args.seed + 2)
            results["runs"] += [plain, cached]
            configs = [(w, None) for w in args.windows]
            if draft_model is not None:
                configs += [(w, lambda x, step: draft_model(x).logits) for w in args.windows]
            for w, drafter in configs:
                rec, spec_x = bench_config(
                    "speculative", chain, length, args, seed=args.seed + 3, window=w, drafter=drafter
                )
                rec["speedup_calls_vs_cached"] = cached["target_calls_per_sample"] / rec["target_calls_per_sample"]
                rec["speedup_wall_batch_vs_plain"] = plain["wall_clock_batch_seconds"] / rec["wall_clock_batch_seconds"]
                rec["speedup_wall_batch_vs_cached"] = (
                    cached["wall_clock_batch_seconds"] / rec["wall_clock_batch_seconds"]
                )
                if rec["wall_clock_batch1_seconds_per_sample"]:
                    rec["speedup_wall_batch1_vs_plain"] = (
                        plain["wall_clock_batch1_seconds_per_sample"] / rec["wall_clock_batch1_seconds_per_sample"]
                    )
                    rec["speedup_wall_batch1_vs_cached"] = (
                        cached["wall_clock_batch1_seconds_per_sample"] / rec["wall_clock_batch1_seconds_per_sample"]
                    )
                rec["same_law_as_plain"] = same_law_check(spec_x, plain_x, levels, args.alpha)
                results["runs"].append(rec)
                print(
                    f"N={n:4d} window={w:3d} {rec['drafter']:6s}: {rec['target_calls_per_sample']:6.1f} calls/sample "
                    f"(plain {n}, cached {cached['target_calls_per_sample']:.1f}), "
                    f"acceptance {rec['acceptance_rate']:.3f}, "
                    f"same law: {rec['same_law_as_plain']['passed']} (min p {rec['same_law_as_plain']['min_p']:.3g})",
                    flush=True,
                )
    results["total_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.plot or args.out.with_suffix(".png"))
    return results


def plot(results: dict, path: Path) -> None:
    """Target calls per sample and batch-1 wall-clock per sample, per sampler and grid size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the bench extra
        return
    steps = sorted({r["num_steps"] for r in results["runs"]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in (
        (axes[0], "target_calls_per_sample", "target calls per sample (sequential)"),
        (axes[1], "wall_clock_batch1_seconds_per_sample", "wall-clock per sample at batch 1 (s)"),
    ):
        labels, width = [], 0.8 / max(len(steps), 1)
        for si, n in enumerate(steps):
            runs = [r for r in results["runs"] if r["num_steps"] == n]
            names = [
                r["sampler"] if r["sampler"] != "speculative" else f"spec {r['drafter']} L={r['window']}" for r in runs
            ]
            values = [r[key] or 0.0 for r in runs]
            ax.bar(np.arange(len(runs)) + si * width, values, width, label=f"N = {n}")
            labels = names
        ax.set_xticks(np.arange(len(labels)) + width * (len(steps) - 1) / 2)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
