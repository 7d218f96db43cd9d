"""Benchmarks: ``python -m specdiff.workbench.bench [analytic|digits|all] [--quick]``.

Each writes a JSON results file and a plot under ``assets/bench/``, with the plain
sampler measured in the same run: sequential target calls, rows evaluated, drafter
calls, wall-clock and sample quality side by side.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .. import sample_baseline, speculative_sample
from ..paths import asset, results
from ..testing import GaussianMixtureDDPM, two_sample_test
from ..window import AutoWindow
from .report import DOCS, render_docs, report
from .results import environment, write_result

ASSETS = asset()


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
              "environment": environment(), "rows": rows}
    write_result(out / "analytic.json", result)
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


def _digits_samplers(plain, spec, draft, latents, quick: bool):
    """``{(name, window): run(make_generator, n) -> (images, figures)}`` on one UNet, in the order
    they are timed (each seed runs them all, interleaved). ``make_generator()`` returns a fresh
    generator (or list) for the run; ``latents(generator, n)`` draws x_T as DDPMPipeline does."""
    from ..drafters_research import ExtrapolatedDrafter
    from .asd import asd_sample
    from .paradigms import paradigms_sample

    unet, steps = plain.unet, 1000
    chain_scheduler = spec.scheduler

    def pipeline(window, draft_unet=None):
        def run(make_gen, n):
            drafter = {} if draft_unet is not None else {"drafter": "frozen"}  # not the pipeline's default (picard)
            res = spec(batch_size=n, generator=make_gen(), num_inference_steps=steps, window=window(),
                       draft_unet=draft_unet, output_type="pt", **drafter)
            return res.images, _stats_row(res.stats)
        return run

    def core(window, drafter):  # the core sampler on the pipeline's chain, with a drafter of the package
        def run(make_gen, n):
            gen = make_gen()
            x = latents(gen, n)
            chain_scheduler.set_timesteps(steps)
            chain = chain_scheduler.chain(lambda x, t: unet(x, t).sample)
            out = speculative_sample(chain, x, window=window(), drafter=drafter, generator=gen)
            return (out.sample / 2 + 0.5).clamp(0, 1), _stats_row(out.stats)
        return run

    def defaults(make_gen, n):  # the pipeline with nothing set: Picard drafter, automatic window
        res = spec(batch_size=n, generator=make_gen(), num_inference_steps=steps, output_type="pt")
        return res.images, _stats_row(res.stats)

    def baseline(make_gen, n):
        images = plain(batch_size=n, generator=make_gen(), num_inference_steps=steps, output_type="pt").images
        images = torch.as_tensor(images)
        return (
            images.permute(0, 3, 1, 2) if images.shape[-1] == 1 else images,
            {"target_calls": steps, "target_rows": steps},
        )

    def paradigms(parallel, tolerance):
        def run(make_gen, n):
            gen = make_gen()
            x = latents(gen, n)
            if isinstance(gen, list):  # its noise is drawn up front, as one tensor
                gen = torch.Generator().manual_seed(gen[0].initial_seed() + 1)
            r = paradigms_sample(unet, plain.scheduler, x, num_inference_steps=steps, parallel=parallel,
                                 tolerance=tolerance, generator=gen)
            return (r.sample / 2 + 0.5).clamp(0, 1), {"target_calls": r.target_calls, "target_rows": r.target_rows}
        return run

    def asd(spec_len):  # autospeculative decoding (Hu et al. 2025), exact: drafts from the anchor's x0
        def run(make_gen, n):
            gen = make_gen()
            x = latents(gen, n)
            chain_scheduler.set_timesteps(steps)
            r = asd_sample(chain_scheduler.chain(lambda x, t: unet(x, t).sample), x, spec_len=spec_len, generator=gen,
                           max_rows=256)
            return (r.sample / 2 + 0.5).clamp(0, 1), {"target_calls": r.target_calls, "target_rows": r.target_rows / n,
                                                      "acceptance_rate": r.acceptance_rate}
        return run

    samplers = {("plain DDPMPipeline", "1"): baseline,
                ("speculative (frozen)", "auto"): pipeline(AutoWindow)}
    for w in ([16] if quick else [8, 16, 32]):
        samplers[("speculative (frozen)", str(w))] = pipeline(lambda w=w: w)
    samplers[("speculative (picard)", "auto")] = defaults
    samplers[("speculative (picard)", "32")] = core(lambda: 32, "picard")
    samplers[("speculative (extrapolated)", "32")] = core(lambda: 32, ExtrapolatedDrafter())
    if not quick:
        samplers[("speculative (draft model)", "4")] = pipeline(lambda: 4, draft)
    samplers[("ParaDiGMS (tol 0.1)", "32")] = paradigms(32, 0.1)
    samplers[("ASD", "all")] = asd(None)  # the paper's unbounded speculation
    samplers[("ASD", "32")] = asd(32)
    return samplers


def _stats_row(stats) -> dict:
    return {"target_calls": stats.target_calls, "target_rows": stats.target_rows / stats.batch_size,
            "draft_calls": stats.draft_calls, "acceptance_rate": stats.acceptance_rate,
            "accepted_by_position": stats.accepted_by_position[:8],
            "proposed_by_position": stats.proposed_by_position[:8]}


class _RowMeter:
    """Largest UNet batch seen (a forward pre-hook): the memory figure on CPU, where the
    allocator has no peak counter; on CUDA the allocator's own peak is recorded too."""

    def __init__(self, unet):
        self.max_rows = 0
        self.handle = unet.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.max_rows = max(self.max_rows, args[0].shape[0])

    def reset(self):
        self.max_rows = 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()


def bench_digits(out: Path, quick: bool = False, samples: int = 64, repeats: int = 3, quality: bool = True) -> dict:
    """The bundled digits DDPM, 1000 steps, batch 1: every sampler on the same UNet and seeds,
    interleaved per seed (latency); then sample quality over a batch for the plain sampler,
    the best speculative one and ParaDiGMS."""
    from diffusers import DDPMPipeline, UNet2DModel
    from diffusers.utils.torch_utils import randn_tensor

    from ..pipelines import SpeculativeDDPMPipeline

    models = ASSETS / "models"
    plain = DDPMPipeline.from_pretrained(models / "digits-ddpm")
    plain.set_progress_bar_config(disable=True)
    spec = SpeculativeDDPMPipeline.from_pipe(plain)
    spec.set_progress_bar_config(disable=True)
    draft = UNet2DModel.from_pretrained(models / "digits-draft")
    size = plain.unet.config.sample_size

    def latents(gen, n):
        return randn_tensor((n, plain.unet.config.in_channels, size, size), generator=gen)

    samplers = _digits_samplers(plain, spec, draft, latents, quick)
    meter = _RowMeter(plain.unet)

    # The auto window's calibration is measured once per model/device/dtype/shape (and drafter) and
    # cached; measure it before timing, as a user's second run would find it.
    for drafter in ("frozen", "picard"):
        calibration = AutoWindow()
        calibration.bind(spec.scheduler.chain(lambda x, t: plain.unet(x, t).sample), latents(torch.Generator(), 1),
                         drafter)

    latency = []
    for seed in range(1 if quick else repeats):
        for (name, window), run in samplers.items():
            meter.reset()
            started, cpu = time.perf_counter(), time.process_time()
            _, row = run(lambda seed=seed: torch.Generator().manual_seed(seed), 1)
            row.update(sampler=name, window=window, seed=seed, wall_clock_s=time.perf_counter() - started,
                       cpu_s=time.process_time() - cpu, max_rows_per_call=meter.max_rows)
            if torch.cuda.is_available():
                row["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            latency.append(row)
    summary = _summarise(latency)

    # Quality over a batch (same seeds for every sampler: image i uses generator seed 10_000 + i).
    n = 16 if quick else samples
    name, command = _threaded("digits"), _threaded("python -m specdiff.workbench.bench digits", " --threads ")
    saved = [p for p in (out / "digits.json", out / f"{name}.json") if p.exists()]  # the 1-thread run measures it
    if quality or not saved:
        quality = _digits_quality(samplers, n)
    else:  # --no-quality: keep the saved quality block (same samplers, seeds and images; the law has no thread count)
        quality = json.loads(saved[0].read_text())["quality"]
    meter.handle.remove()
    result = {"benchmark": "digits", "command": command, "num_steps": 1000,
              "environment": environment(), "repeats": 1 if quick else repeats, "latency_batch1": latency,
              "unet_latency_s": {str(b): t for b, t in sorted(calibration.latency.points.items())},
              "summary": summary, "quality": quality}
    write_result(out / f"{name}.json", result)
    _plot_digits(summary, out / f"{name}.png", torch.get_num_threads())
    return result


def _threaded(name: str, sep: str = "_threads") -> str:
    """``name`` for a 1-thread run, ``name<sep><N>`` for N threads (file names and commands)."""
    threads = torch.get_num_threads()
    return name if threads == 1 else f"{name}{sep}{threads}"


# Fixed windows: the quality batch has 64 images, where on a CPU the automatic window prices a
# batch of rows at about its rows and picks L = 1 (the plain sampler's very images).
QUALITY_SAMPLERS = [("plain DDPMPipeline", "1"), ("speculative (picard)", "32"), ("speculative (frozen)", "16"),
                    ("ParaDiGMS (tol 0.1)", "32"), ("ASD", "32")]


def _digits_quality(samplers, n: int) -> dict:
    from .digits import DigitClassifier, classifier_features, confident_fraction, frechet_distance, load_digits_images

    classifier = DigitClassifier.from_pretrained(ASSETS / "models" / "digits-classifier").eval()
    test_feats = classifier_features(classifier, load_digits_images("test")[0])
    to_model = lambda im: torch.as_tensor(im).float() * 2 - 1  # noqa: E731  [0,1] -> [-1,1]
    feats, rows = {}, []
    for key in QUALITY_SAMPLERS:
        images, _ = samplers[key](lambda: [torch.Generator().manual_seed(10_000 + i) for i in range(n)], n)
        feats[key] = classifier_features(classifier, to_model(images))
        rows.append({"sampler": key[0], "window": key[1], "fd_vs_test": frechet_distance(feats[key], test_feats),
                     "confident_fraction_0.9": confident_fraction(classifier, to_model(images))})
    base = feats[QUALITY_SAMPLERS[0]]
    for row, key in zip(rows[1:], QUALITY_SAMPLERS[1:]):
        check = two_sample_test(feats[key], base)
        row.update(two_sample_min_p=check.min_p, same_law=check.passed, two_sample=str(check))
    return {"samples": n, "rows": rows,
            "note": "speculative samplers share the plain sampler's seeds, so their images are coupled to the plain "
                    "ones (identical where every step was accepted): the two-sample test is conservative; the "
                    "exactness tests use independent seeds"}


def _summarise(latency):
    import statistics

    groups = {}
    for row in latency:
        groups.setdefault((row["sampler"], row["window"]), []).append(row)
    base = statistics.median(r["wall_clock_s"] for r in groups[("plain DDPMPipeline", "1")])
    summary = []
    for (sampler, window), rows in groups.items():
        med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
        walls = [r["wall_clock_s"] for r in rows]
        summary.append({"sampler": sampler, "window": window, "runs": len(rows), "target_calls": med("target_calls"),
                        "target_rows": med("target_rows"), "draft_calls": med("draft_calls") if "draft_calls" in rows[0]
                        else 0, "acceptance_rate": med("acceptance_rate") if "acceptance_rate" in rows[0] else None,
                        "wall_clock_s": statistics.median(walls), "wall_clock_min_s": min(walls),
                        "wall_clock_max_s": max(walls), "max_rows_per_call": max(r["max_rows_per_call"] for r in rows),
                        "wall_clock_speedup": base / statistics.median(walls),
                        "cpu_s": med("cpu_s"), "cpu_speedup": statistics.median(
                            r["cpu_s"] for r in groups[("plain DDPMPipeline", "1")]) / med("cpu_s"),
                        "wall_clock_speedup_paired": statistics.median(
                            p["wall_clock_s"] / r["wall_clock_s"]
                            for p, r in zip(groups[("plain DDPMPipeline", "1")], rows)),
                        "call_speedup": 1000 / med("target_calls")})
    return summary


def _plot_digits(summary, path: Path, threads: int = 1) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['sampler']}\nL={r['window']}" for r in summary]
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 1.2), 3.5))
    x = range(len(summary))
    ax.bar([i - 0.2 for i in x], [r["call_speedup"] for r in summary], 0.4, label="fewer sequential target calls")
    ax.bar([i + 0.2 for i in x], [r["wall_clock_speedup"] for r in summary], 0.4, label="wall-clock speedup (median)")
    ax.set_xticks(list(x), labels, fontsize=6)
    ax.set(ylabel="x vs plain DDPMPipeline", title=f"digits DDPM, 1000 steps, batch 1, CPU, {threads} thread(s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_churn(out: Path, quick: bool = False) -> dict:
    """The d = 512 churn protocol (:mod:`.churn`): drafted steps per target call per trajectory,
    frozen and Picard drafters, frozen with x0 carried instead of the velocity, and ASD (which freezes x0),
    by window; two-sample test of the final samples vs plain."""
    from .asd import asd_sample
    from .churn import ChurnMixtureChain, ChurnX0Chain

    chain, x0_chain = ChurnMixtureChain(), ChurnX0Chain()  # x0_chain: drafts freeze x0, ASD's drift
    n = 100 if quick else 500
    windows = [2, 4, 16] if quick else [2, 3, 4, 6, 8, 16, 28]
    x = chain.initial_state(n, torch.Generator().manual_seed(0))
    plain = chain.finish(sample_baseline(chain, chain.initial_state(n, torch.Generator().manual_seed(1)),
                                         [torch.Generator().manual_seed(10**6 + i) for i in range(n)]))
    rows = []
    for name, ch in (("frozen", chain), ("picard", chain), ("frozen (x0)", x0_chain), ("ASD (x0)", x0_chain)):
        for window in windows:
            gens = [torch.Generator().manual_seed(i) for i in range(n)]
            res = (asd_sample(ch, x, spec_len=window, generator=gens) if name.startswith("ASD")
                   else speculative_sample(ch, x, window=window, drafter=name.split()[0], generator=gens))
            s = res.stats
            per_sample = sum(s.per_sample_target_calls) / n
            check = two_sample_test(chain.finish(res.sample), plain)
            rows.append({"drafter": name, "window": window, "trajectories": n, "steps": chain.num_steps,
                         "steps_per_call": chain.num_steps / per_sample, "target_calls_per_trajectory": per_sample,
                         "batch_target_calls": s.target_calls, "rows_per_trajectory": s.target_rows / n,
                         "acceptance_rate": s.acceptance_rate, "two_sample_min_p": check.min_p,
                         "same_law": check.passed})
    result = {"benchmark": "churn", "command": "python -m specdiff.workbench.bench churn",
              "protocol": "Gaussian mixture d=512, 5 components, flow-matching churn sampler T=30 (28 stochastic "
                          "steps), eps=0.06; peer figure: 1.27 drafted steps per target call (frozen)",
              "environment": environment(), "rows": rows}
    write_result(out / "churn.json", result)
    return result


def bench_discrete_latency(out: Path, quick: bool = False, repeats: int = 3) -> dict:
    """Masked diffusion, bundled digits model: wall-clock of the speculative sampler (auto and
    fixed windows) against the cached sampler at batch 1 and 64, interleaved, 256 steps.

    Besides wall-clock it records the cost model that bounds the speedup: the latency curve
    ``t(rows)`` of one network call, and per run the time inside the network, the time outside
    it (Python and the kernels), the rounds and the rows verified. ``ceiling_vs_cached`` is the
    speedup if nothing but the network cost anything (cached wall-clock / speculative network time).
    """
    import statistics

    from ..calibration import measure_latency
    from ..discrete.chain import MaskedDiffusionChain
    from ..sampler import sample_baseline_discrete, speculative_sample_discrete
    from .bench_discrete import _load

    transformer, scheduler = _load(ASSETS / "models" / "digits-mdm")
    length = transformer.config.sample_size**2
    steps = 256
    scheduler.set_timesteps(steps)
    inside = [0.0]

    def network(x):  # the target, timed: what is left of a run is the sampler's own work
        started = time.perf_counter()
        logits = transformer(x).logits
        inside[0] += time.perf_counter() - started
        return logits

    chain = MaskedDiffusionChain(network, scheduler)
    runs = {"cached": lambda x, g: sample_baseline_discrete(chain, x, g, cached=True, return_stats=True),
            "speculative auto": lambda x, g: speculative_sample_discrete(chain, x, window=AutoWindow(), generator=g),
            "speculative 32": lambda x, g: speculative_sample_discrete(chain, x, window=32, generator=g),
            # a CPU's cost per row grows past ~16 rows (cache): verify in micro-batches of 16
            "speculative auto, max_rows 16": lambda x, g: speculative_sample_discrete(
                chain, x, window=AutoWindow(), generator=g, max_rows=16)}
    sizes = [1, 2, 4, 8, 16, 32, 64]
    sweeps = 3 if quick else 9
    curve = measure_latency(chain, chain.prior(1, (length,)), sizes, repeats=sweeps)
    rows = []
    for batch in (1, 64):
        AutoWindow().bind(chain, chain.prior(batch, (length,)))  # measured once, cached, as in a second run
        for seed in range(1 if quick else (3 * repeats if batch == 1 else repeats)):
            for name, run in runs.items():
                x = chain.prior(batch, (length,))
                gens = [torch.Generator().manual_seed(1000 * seed + i) for i in range(batch)]
                inside[0] = 0.0
                started, cpu = time.perf_counter(), time.process_time()
                res = run(x, gens)
                wall = time.perf_counter() - started
                s = res.stats
                rows.append({"batch": batch, "sampler": name, "seed": seed, "wall_clock_s": wall,
                             "cpu_s": time.process_time() - cpu, "network_s": inside[0], "outside_s": wall - inside[0],
                             "target_calls": s.target_calls,
                             "target_rows": s.target_rows or sum(s.per_sample_target_calls),
                             "rounds": s.rounds or s.target_calls,
                             "calls_per_sample": sum(s.per_sample_target_calls) / batch,
                             "chosen_windows": s.chosen_windows})

    summary = []
    for batch in (1, 64):
        def med(name, key):
            return statistics.median(r[key] for r in rows if r["batch"] == batch and r["sampler"] == name)

        for name in runs:
            mine = [r for r in rows if r["batch"] == batch and r["sampler"] == name]
            summary.append({"batch": batch, "sampler": name, "wall_clock_s": med(name, "wall_clock_s"),
                            "wall_clock_min_s": min(r["wall_clock_s"] for r in mine),
                            "wall_clock_max_s": max(r["wall_clock_s"] for r in mine),
                            "target_calls": med(name, "target_calls"), "target_rows": med(name, "target_rows"),
                            "rounds": med(name, "rounds"), "network_s": med(name, "network_s"),
                            "outside_s": med(name, "outside_s"),
                            "outside_per_round_ms": 1e3 * med(name, "outside_s") / med(name, "rounds"),
                            "wall_clock_vs_cached": med("cached", "wall_clock_s") / med(name, "wall_clock_s"),
                            "cpu_vs_cached": med("cached", "cpu_s") / med(name, "cpu_s"),
                            "ceiling_vs_cached": med("cached", "wall_clock_s") / med(name, "network_s")})
    breakdown = [_round_breakdown(chain, inside, batch, length, 1 if quick else repeats) for batch in (1, 64)]
    result = {"benchmark": "discrete_latency",
              "command": _threaded("python -m specdiff.workbench.bench discrete-latency", " --threads "),
              "num_steps": steps, "environment": environment(),
              "latency_s": {str(b): t for b, t in curve.items()}, "latency_statistic": f"fastest of {sweeps} sweeps",
              "runs": rows, "summary": summary,
              "round_breakdown": breakdown}
    write_result(out / f"{_threaded('discrete_latency')}.json", result)
    return result


def _round_breakdown(chain, inside: list, batch: int, length: int, repeats: int) -> dict:
    """Where a speculative round's time goes (window auto): the network, each kernel operation
    (timed through a kernel wrapper set on the chain) and the rest (the driver: noise lookups,
    bookkeeping, window policy), in ms per round, summed over ``repeats`` seeds."""
    from ..sampler import speculative_sample_discrete

    spent = dict.fromkeys(("draft_window", "law", "accept", "correct"), 0.0)

    def timed(name, fn):
        def run(*args):
            started = time.perf_counter()
            out = fn(*args)
            spent[name] += time.perf_counter() - started
            return out
        return staticmethod(run)

    plain = chain.kernel
    chain.kernel = type("TimedKernel", (plain,), {name: timed(name, getattr(plain, name)) for name in spent})
    try:
        rounds, wall, inside[0] = 0, 0.0, 0.0
        for seed in range(repeats):
            gens = [torch.Generator().manual_seed(1000 * seed + i) for i in range(batch)]
            started = time.perf_counter()
            res = speculative_sample_discrete(chain, chain.prior(batch, (length,)), window=AutoWindow(), generator=gens)
            wall += time.perf_counter() - started
            rounds += res.stats.rounds
    finally:
        chain.kernel = plain
    per_round = {"network": inside[0], **spent}
    per_round["rest (driver: noise, bookkeeping, window policy)"] = wall - sum(per_round.values())
    return {"batch": batch, "rounds_per_run": rounds / repeats,
            "ms_per_round": {k: 1e3 * v / rounds for k, v in per_round.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdiff bench", description=__doc__.split("\n")[0])
    parser.add_argument("which", nargs="?", default="all",
                        choices=["analytic", "digits", "discrete", "churn", "discrete-latency", "overhead", "all",
                                 "report"],
                        help="report: print the README's tables from the saved results")
    parser.add_argument("--quick", action="store_true", help="fewer settings and samples (smoke run)")
    parser.add_argument("--write", nargs="?", const=str(DOCS), default=None, metavar="PATH",
                        help=f"report: write the benchmark page (default {DOCS.name} in docs/) instead of printing")
    parser.add_argument("--out", default=None,
                        help="results folder (default: a checkout's assets/bench, or ./outputs/bench from a wheel; "
                        "report reads the shipped results)")
    parser.add_argument("--samples", type=int, default=64, help="digits: images per sampler for the quality check")
    parser.add_argument("--repeats", type=int, default=3, help="digits: seeds timed per sampler (interleaved)")
    parser.add_argument("--no-quality", action="store_true", help="digits: time only; keep the saved quality block")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 writes digits.json (discrete_latency.json), "
                        "N writes digits_threadsN.json (...)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.which == "report":
        out = Path(args.out) if args.out else ASSETS / "bench"  # the results this package ships
        if args.write:
            page = Path(args.write)
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(render_docs(out))
        else:
            print(report(out))
        return 0
    out = Path(args.out) if args.out else results()
    if args.which in ("analytic", "all"):
        bench_analytic(out, args.quick)
    if args.which in ("churn", "all"):
        bench_churn(out, args.quick)
    if args.which in ("discrete-latency", "all"):
        bench_discrete_latency(out, args.quick, args.repeats)
    if args.which in ("overhead", "all"):
        from .overhead import bench_overhead

        bench_overhead(out, args.quick)
    if args.which in ("digits", "all"):
        bench_digits(out, args.quick, args.samples, args.repeats, not args.no_quality)
    if args.which in ("discrete", "all"):
        from .bench_discrete import main as discrete_main

        discrete_main(["--out", str(out / "discrete.json")] + (["--quick"] if args.quick else []))
    print(f"results written under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
