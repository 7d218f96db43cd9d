"""Benchmarks: ``python -m specdiff.workbench.bench [analytic|digits|all] [--quick]``.

Each writes a JSON results file and a plot under ``assets/bench/``, with the plain
sampler measured in the same run: sequential target calls, rows evaluated, drafter
calls, wall-clock and sample quality side by side.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from .. import sample_baseline, speculative_sample
from ..paths import asset
from ..testing import GaussianMixtureDDPM, two_sample_test

ASSETS = asset()


def _environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")}


def bench_analytic(out: Path, quick: bool = False) -> dict:
    """Speedup and acceptance vs window and dimension on the analytic mixture (1000 DDPM steps)."""
    dims, windows = ([2, 64], [1, 4, 16]) if quick else ([2, 16, 256], [1, 2, 4, 8, 16, 32])
    samples = 128 if quick else 500
    rows = []
    for dim in dims:
        chain = GaussianMixtureDDPM.random(dim=dim, num_steps=1000)
        x = chain.sample_prior(samples, torch.Generator().manual_seed(0))
        started = time.perf_counter()
        base = sample_baseline(chain, x, torch.Generator().manual_seed(1))
        base_wall = time.perf_counter() - started
        for window in windows:
            result = speculative_sample(chain, x, window=window, generator=torch.Generator().manual_seed(2))
            check = two_sample_test(result.sample, base)
            s = result.stats
            rows.append({"dim": dim, "window": window, "samples": samples, "target_calls": s.target_calls,
                         "baseline_target_calls": chain.num_steps, "target_rows": s.target_rows,
                         "baseline_target_rows": chain.num_steps * samples, "acceptance_rate": s.acceptance_rate,
                         "speedup": s.speedup, "mean_per_sample_speedup": sum(s.per_sample_speedup) / samples,
                         "steps_per_round": s.mean_committed_per_round, "wall_clock_s": s.wall_clock,
                         "baseline_wall_clock_s": base_wall, "two_sample_min_p": check.min_p,
                         "same_law": check.passed})
    result = {"benchmark": "analytic", "command": "python -m specdiff.workbench.bench analytic", "num_steps": 1000,
              "environment": _environment(), "rows": rows}
    _write(out / "analytic.json", result)
    _plot_analytic(rows, out / "analytic.png")
    return result


def _plot_analytic(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for dim in sorted({r["dim"] for r in rows}):
        mine = [r for r in rows if r["dim"] == dim]
        axes[0].plot([r["window"] for r in mine], [r["speedup"] for r in mine], "o-", label=f"d = {dim}")
        axes[1].plot([r["window"] for r in mine], [r["acceptance_rate"] for r in mine], "o-", label=f"d = {dim}")
    axes[0].set(xscale="log", xlabel="window L", ylabel="steps / sequential target calls",
                title="speedup (batch, 1000 DDPM steps)")
    axes[1].set(xscale="log", xlabel="window L", ylabel="acceptance rate", title="frozen-drafter acceptance")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_digits(out: Path, quick: bool = False, samples: int = 128, window: int = 16) -> dict:
    """The bundled digits DDPM, 1000 steps: latency at batch 1 (plain diffusers DDPMPipeline vs
    speculative, frozen and draft-model drafters) and sample quality over a batch."""
    from diffusers import DDPMPipeline, UNet2DModel

    from .digits import DigitClassifier, classifier_features, confident_fraction, frechet_distance, load_digits_images
    from ..pipelines import SpeculativeDDPMPipeline

    models = ASSETS / "models"
    plain = DDPMPipeline.from_pretrained(models / "digits-ddpm")
    plain.set_progress_bar_config(disable=True)
    spec = SpeculativeDDPMPipeline.from_pipe(plain)
    spec.set_progress_bar_config(disable=True)
    draft = UNet2DModel.from_pretrained(models / "digits-draft")
    classifier = DigitClassifier.from_pretrained(models / "digits-classifier").eval()
    steps = 1000
    seeds = range(2 if quick else 5)
    windows = [8] if quick else [2, 4, 8, 16]

    def gen(seed):
        return torch.Generator().manual_seed(seed)

    latency = []
    for seed in seeds:
        started = time.perf_counter()
        plain(batch_size=1, generator=gen(seed), num_inference_steps=steps, output_type="np")
        latency.append({"sampler": "plain DDPMPipeline", "seed": seed, "window": 1, "target_calls": steps,
                        "target_rows": steps, "draft_calls": 0, "wall_clock_s": time.perf_counter() - started})
        for drafter, w in [("frozen", w) for w in windows] + [("model", w) for w in windows[-3:-1]]:
            started = time.perf_counter()
            res = spec(batch_size=1, generator=gen(seed), num_inference_steps=steps, window=w,
                       draft_unet=draft if drafter == "model" else None, output_type="np")
            s = res.stats
            latency.append({"sampler": f"speculative ({drafter})", "seed": seed, "window": w,
                            "target_calls": s.target_calls, "target_rows": s.target_rows, "draft_calls": s.draft_calls,
                            "acceptance_rate": s.acceptance_rate, "wall_clock_s": time.perf_counter() - started})
    summary = _summarise(latency)

    # Quality over a batch: plain vs speculative (frozen drafter, the CLI's default window).
    n = 32 if quick else samples
    gens = [gen(10_000 + i) for i in range(n)]
    base_images = plain(batch_size=n, generator=gens, num_inference_steps=steps, output_type="pt").images
    gens = [gen(20_000 + i) for i in range(n)]
    res = spec(batch_size=n, generator=gens, num_inference_steps=steps, window=window, output_type="pt")
    test_images, _ = load_digits_images("test")
    to_model = lambda im: torch.as_tensor(im).float() * 2 - 1  # noqa: E731  [0,1] -> [-1,1]
    feats = {name: classifier_features(classifier, to_model(im))
             for name, im in [("plain", base_images), ("speculative", res.images)]}
    test_feats = classifier_features(classifier, test_images)
    check = two_sample_test(feats["speculative"], feats["plain"])
    quality = {
        "samples": n, "window": window,
        "fd_vs_test": {k: frechet_distance(v, test_feats) for k, v in feats.items()},
        "fd_plain_vs_speculative": frechet_distance(feats["plain"], feats["speculative"]),
        "confident_fraction_0.9": {"plain": confident_fraction(classifier, to_model(base_images)),
                                    "speculative": confident_fraction(classifier, to_model(res.images))},
        "two_sample_min_p": check.min_p, "same_law": check.passed, "two_sample": str(check),
        "batch_speculative_stats": res.stats.to_dict(),
    }
    result = {"benchmark": "digits", "command": "python -m specdiff.workbench.bench digits", "num_steps": steps,
              "environment": _environment(), "latency_batch1": latency, "summary": summary, "quality": quality}
    _write(out / "digits.json", result)
    _plot_digits(summary, out / "digits.png")
    from torchvision.utils import save_image

    save_image(res.images[:64], out / "digits_speculative_samples.png", nrow=8, padding=1)
    return result


def _summarise(latency):
    groups = {}
    for row in latency:
        groups.setdefault((row["sampler"], row["window"]), []).append(row)
    base = sum(r["wall_clock_s"] for r in groups[("plain DDPMPipeline", 1)]) / len(groups[("plain DDPMPipeline", 1)])
    summary = []
    for (sampler, window), rows in groups.items():
        mean = lambda key: sum(r.get(key, 0) for r in rows) / len(rows)  # noqa: E731
        summary.append({"sampler": sampler, "window": window, "runs": len(rows), "target_calls": mean("target_calls"),
                        "target_rows": mean("target_rows"), "draft_calls": mean("draft_calls"),
                        "acceptance_rate": mean("acceptance_rate") if "acceptance_rate" in rows[0] else None,
                        "wall_clock_s": mean("wall_clock_s"), "wall_clock_speedup": base / mean("wall_clock_s"),
                        "call_speedup": 1000 / mean("target_calls")})
    return summary


def _plot_digits(summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['sampler']}\nL={r['window']}" for r in summary]
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 1.2), 3.5))
    x = range(len(summary))
    ax.bar([i - 0.2 for i in x], [r["call_speedup"] for r in summary], 0.4, label="fewer sequential target calls")
    ax.bar([i + 0.2 for i in x], [r["wall_clock_speedup"] for r in summary], 0.4, label="wall-clock speedup")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set(ylabel="x vs plain DDPMPipeline", title="digits DDPM, 1000 steps, batch 1, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: Path) -> str:
    """Markdown tables of the results under ``out`` (what the README shows)."""
    lines = []
    if (out / "digits.json").exists():
        d = json.loads((out / "digits.json").read_text())
        lines += [f"Bundled digits DDPM, {d['num_steps']} steps, batch 1, CPU ({d['environment']['threads']} thread), "
                  f"mean of {d['summary'][0]['runs']} seeds (`{d['command']}`):", "",
                  "| sampler | window | sequential target calls | rows evaluated | draft calls | acceptance "
                  "| wall-clock (s) | calls speedup | wall-clock speedup |", "|" + " --- |" * 9]
        for r in d["summary"]:
            acc = "" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.3f}"
            lines.append(f"| {r['sampler']} | {r['window']} | {r['target_calls']:.0f} | {r['target_rows']:.0f} "
                         f"| {r['draft_calls']:.0f} | {acc} | {r['wall_clock_s']:.2f} | {r['call_speedup']:.2f}x "
                         f"| {r['wall_clock_speedup']:.2f}x |")
        q = d["quality"]
        lines += ["", f"Quality over {q['samples']} images per sampler (speculative: frozen drafter, window "
                  f"{q['window']}): digit FD vs the held-out split {q['fd_vs_test']['plain']:.2f} (plain) / "
                  f"{q['fd_vs_test']['speculative']:.2f} (speculative); classifier confidence >= 0.9 on "
                  f"{q['confident_fraction_0.9']['plain']:.1%} / {q['confident_fraction_0.9']['speculative']:.1%}; "
                  f"two-sample test in classifier features: {q['two_sample']}.", ""]
    if (out / "analytic.json").exists():
        a = json.loads((out / "analytic.json").read_text())
        dims = sorted({r["dim"] for r in a["rows"]})
        windows = sorted({r["window"] for r in a["rows"]})
        cell = {(r["dim"], r["window"]): r for r in a["rows"]}
        lines += [f"Analytic mixture, {a['num_steps']} DDPM steps, {a['rows'][0]['samples']} samples, frozen drafter: "
                  f"speedup in sequential calls (acceptance) (`{a['command']}`):", "",
                  "| dim | " + " | ".join(f"L={w}" for w in windows) + " |", "|" + " --- |" * (len(windows) + 1)]
        for dim in dims:
            lines.append(f"| {dim} | " + " | ".join(
                f"{cell[dim, w]['speedup']:.2f}x ({cell[dim, w]['acceptance_rate']:.2f})" for w in windows) + " |")
        same = all(r["same_law"] for r in a["rows"])
        lines += ["", f"Every setting passes the two-sample test against the plain sampler: {same}.", ""]
    if (out / "discrete.json").exists():
        d = json.loads((out / "discrete.json").read_text())
        lines += [f"Bundled digits masked-diffusion model, {d['args']['num_samples']} samples per row, {d['device']} "
                  f"(`{d['command']}`):", "",
                  "| steps | sampler | window | target calls / sample | vs plain | vs cached | acceptance "
                  "| same law as plain |", "|" + " --- |" * 8]
        for r in d["runs"]:
            name = r["sampler"] + (f" ({r['drafter']})" if r.get("drafter") else "")
            acc = f"{r['acceptance_rate']:.3f}" if "acceptance_rate" in r else ""
            same = r["same_law_as_plain"]["passed"] if "same_law_as_plain" in r else ""
            vs_cached = f"{r['speedup_calls_vs_cached']:.2f}x" if "speedup_calls_vs_cached" in r else ""
            lines.append(f"| {r['num_steps']} | {name} | {r['window'] or ''} | {r['target_calls_per_sample']:.1f} "
                         f"| {r['speedup_calls_vs_plain']:.2f}x | {vs_cached} | {acc} | {same} |")
        lines.append("")
    return "\n".join(lines)


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdiff bench", description=__doc__.split("\n")[0])
    parser.add_argument("which", nargs="?", choices=["analytic", "digits", "discrete", "all", "report"], default="all",
                        help="report: print the README's tables from the saved results")
    parser.add_argument("--quick", action="store_true", help="fewer settings and samples (smoke run)")
    parser.add_argument("--out", default=str(ASSETS / "bench"))
    parser.add_argument("--samples", type=int, default=128, help="digits: images per sampler for the quality check")
    parser.add_argument("--window", type=int, default=16, help="digits: window of the quality check")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.which == "report":
        print(report(out))
        return 0
    if args.which in ("analytic", "all"):
        bench_analytic(out, args.quick)
    if args.which in ("digits", "all"):
        bench_digits(out, args.quick, args.samples, args.window)
    if args.which in ("discrete", "all"):
        from .bench_discrete import main as discrete_main

        discrete_main(["--out", str(out)] + (["--quick"] if args.quick else []))
    print(f"results written under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
