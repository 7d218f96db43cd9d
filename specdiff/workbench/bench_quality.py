"""Sample quality at equal sequential network calls: plain samplers at several step counts against
the speculative stochastic samplers, on the bundled digits DDPM (issue 20, item 4).

    python -m specdiff.workbench.bench_quality                  # the full run (CPU, 1 thread)
    python -m specdiff.workbench.bench_quality --samples 64 --quick
    python -m specdiff.workbench.bench_quality --table          # re-render docs/quality.md and the plot

Every run samples the same images' seeds (image i: ``torch.Generator().manual_seed(10000 + i)``)
from the same UNet. A plain sampler is diffusers' own loop (``scale_model_input``, the UNet, then
``scheduler.step``); its x is the UNet calls it made (counted by a forward hook). A speculative
sampler is :meth:`SpeculativeScheduler.sample` (Picard drafter, a fixed window); its x is the mean
over images of the sequential calls each image took part in (``stats.per_sample_target_calls``).
The y: the Fréchet distance of the classifier's features against the held-out test digits, with its
bootstrap spread, and the classifier's confident share. A reference row measures the floor: real
training digits against the same test digits, in subsets of the generated sample count.

Writes ``assets/bench/quality.json``, ``assets/bench/quality.png`` and the table in
``docs/quality.md`` (between ``<!-- quality table -->`` markers).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..paths import asset, docs_page, results
from .results import environment, write_between

SEED0 = 10_000  # image i is drawn from torch.Generator().manual_seed(SEED0 + i), for every sampler
DOCS = docs_page("quality.md")
MARKERS = ("<!-- quality table -->", "<!-- /quality table -->")

# name -> (what users call it, stochastic: speculation applies)
SAMPLERS = {
    "ddpm": ("DDPM", True),
    "euler-a": ("Euler ancestral", True),
    "dpmpp-2m-sde": ("DPM++ 2M SDE", True),
    "ddim-eta0": ("DDIM eta=0", False),
    "dpmpp-2m": ("DPM++ 2M", False),
}

# The full run: plain step counts per sampler; speculative (steps, window) per stochastic sampler.
# Sized for a shared 2-core CPU (one thread), where the cost is the rows evaluated: 1000 steps for
# plain DDPM only, 250 steps and window 32 for DDPM only (a window of 32 evaluates about twice the
# rows of a window of 8 at 100 steps). The whole run: about 80 minutes for 128 images on that machine,
# the two 1000-step DDPM runs a third of it. Add runs with ``--resume --add SAMPLER:STEPS[:WINDOW]``.
PLAIN_GRID = {
    "ddpm": [5, 10, 20, 50, 100, 250, 1000],
    "euler-a": [5, 10, 20, 50, 100],
    "dpmpp-2m-sde": [5, 10, 20, 50, 100],
    "ddim-eta0": [5, 10, 20, 50, 100],
    "dpmpp-2m": [5, 10, 20, 50, 100],
}
SPECULATIVE_GRID = {
    "ddpm": [(50, 8), (100, 8), (100, 32), (250, 32), (1000, 32)],
    "euler-a": [(50, 8), (100, 8)],
    "dpmpp-2m-sde": [(50, 8), (100, 8)],
}
QUICK_PLAIN = {"ddpm": [10, 50], "euler-a": [10], "dpmpp-2m-sde": [10], "ddim-eta0": [10], "dpmpp-2m": [10]}
QUICK_SPECULATIVE = {"ddpm": [(50, 8)], "euler-a": [(10, 8)], "dpmpp-2m-sde": [(10, 8)]}


def build_scheduler(name: str, base):
    """Sampler ``name`` of :data:`SAMPLERS`, built from ``base``'s config (the model's own scheduler).

    The stochastic ones are ``specdiff generate --scheduler``'s; the deterministic ones are the
    diffusers classes users run: ``DDIMScheduler`` (its ``step`` defaults to ``eta = 0``) and
    ``DPMSolverMultistepScheduler`` with ``dpmsolver++``, order 2 (DPM++ 2M)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from ..schedulers.names import scheduler_from_name

    if name == "ddim-eta0":
        return DDIMScheduler.from_config(base.config)
    if name == "dpmpp-2m":
        return DPMSolverMultistepScheduler.from_config(base.config, algorithm_type="dpmsolver++", solver_order=2)
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; the samplers: {', '.join(SAMPLERS)}")
    return scheduler_from_name(name, base)


@dataclass
class Run:
    """One sampler's images (NCHW in [0, 1]) and what they cost per image: sequential network calls
    (mean over images) and rows evaluated (states through the network)."""

    images: torch.Tensor
    calls: float
    rows: float
    seconds: float
    acceptance: float | None = None


class _CallCounter:
    """UNet forward calls and rows (a forward pre-hook), for the plain loop's real call count."""

    def __init__(self, unet):
        self.calls = self.rows = 0
        self.handle = unet.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        self.rows += args[0].shape[0]


def generators(n: int, seed0: int = SEED0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed0 + i) for i in range(n)]


def sample(unet, base_scheduler, sampler: str, steps: int, n: int, window: int | None = None,
           max_rows: int | None = 1024, seed0: int = SEED0) -> Run:
    """``n`` images of ``sampler`` at ``steps`` steps: the plain loop (``window=None``) or the
    speculative sampler at a fixed ``window`` (Picard drafter; ``window=1`` is the plain sampler
    through the speculative code, the same images bit for bit)."""
    from diffusers.utils.torch_utils import randn_tensor

    from ..schedulers import SpeculativeScheduler

    scheduler = build_scheduler(sampler, base_scheduler)
    size = unet.config.sample_size
    shape = (n, unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
    gens = generators(n, seed0)
    started = time.perf_counter()
    with torch.no_grad():
        x = randn_tensor(shape, generator=gens, dtype=unet.dtype)  # as DDPMPipeline draws x_T
        if window is None:
            counter = _CallCounter(unet)
            try:
                scheduler.set_timesteps(steps)
                x = x * scheduler.init_noise_sigma
                for t in scheduler.timesteps:
                    eps = unet(scheduler.scale_model_input(x, t), t).sample
                    x = scheduler.step(eps, t, x, generator=gens).prev_sample
            finally:
                counter.handle.remove()
            calls, rows, acceptance = counter.calls, counter.rows / n, None
        else:
            if not SAMPLERS[sampler][1]:
                raise ValueError(f"{sampler} is deterministic: nothing to speculate on; run it plain (window=None)")
            spec = SpeculativeScheduler.from_scheduler(scheduler, window=window, drafter="picard")
            spec.set_timesteps(steps)
            out = spec.sample(lambda h, t: unet(h, t).sample, x * spec.init_noise_sigma, generator=gens,
                              window=window, max_rows=max_rows)
            x, s = out.sample, out.stats
            calls, rows, acceptance = sum(s.per_sample_target_calls) / n, s.target_rows / n, s.acceptance_rate
    images = (x / 2 + 0.5).clamp(0, 1)
    return Run(images, calls, rows, time.perf_counter() - started, acceptance)


class QualityMeter:
    """The digit FD against the held-out test digits and the classifier's confident share, as the
    digits benchmark measures them (:mod:`specdiff.workbench.digits`), with the FD's bootstrap spread."""

    def __init__(self, classifier=None, bootstrap: int = 100):
        from .digits import DigitClassifier, classifier_features, load_digits_images

        if classifier is None:
            classifier = DigitClassifier.from_pretrained(asset("models", "digits-classifier"))
        self.classifier = classifier.eval()
        self.test = classifier_features(self.classifier, load_digits_images("test")[0])
        self.bootstrap = bootstrap

    def features(self, images01: torch.Tensor) -> torch.Tensor:
        from .digits import classifier_features

        return classifier_features(self.classifier, images01.float() * 2 - 1)

    def fd(self, feats: torch.Tensor) -> float:
        from .digits import frechet_distance

        return frechet_distance(feats, self.test)

    def measure(self, images01: torch.Tensor) -> dict:
        """``fd`` vs test, ``fd_bootstrap_sd`` (images resampled with replacement, fixed seed) and
        ``confident_fraction`` (top softmax probability >= 0.9)."""
        from .digits import confident_fraction

        feats = self.features(images01)
        g = torch.Generator().manual_seed(0)
        boot = [self.fd(feats[torch.randint(len(feats), (len(feats),), generator=g)]) for _ in range(self.bootstrap)]
        return {"fd": self.fd(feats), "fd_bootstrap_sd": float(np.std(boot, ddof=1)),
                "confident_fraction": confident_fraction(self.classifier, images01.float() * 2 - 1)}

    def reference(self, n: int) -> dict:
        """Real training digits against the test digits: all of them, and disjoint subsets of ``n``
        (the floor the metric reaches at the generated sample count, and its spread)."""
        from .digits import confident_fraction, load_digits_images

        train = load_digits_images("train")[0]
        feats = self.features(train / 2 + 0.5)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
        subsets = [order[i * n:(i + 1) * n] for i in range(len(train) // n)]
        fds = [self.fd(feats[idx]) for idx in subsets]
        return {"train_images": len(train), "test_images": len(self.test), "fd_all_train": self.fd(feats),
                "fd_subsets": fds, "fd_subset_mean": float(np.mean(fds)),
                "fd_subset_sd": float(np.std(fds, ddof=1)) if len(fds) > 1 else None,
                "confident_fraction_train": confident_fraction(self.classifier, train)}


def _row(sampler: str, steps: int, window: int | None, run: Run, quality: dict) -> dict:
    return {"sampler": sampler, "title": SAMPLERS[sampler][0], "steps": steps,
            "kind": "plain" if window is None else "speculative", "window": window, "calls": run.calls,
            "rows": run.rows, "seconds": run.seconds, "acceptance": run.acceptance, **quality}


def run_benchmark(samples: int, plain_grid: dict, speculative_grid: dict, out: Path, max_rows: int = 1024,
                  resume: bool = False, command: str = "python -m specdiff.workbench.bench_quality",
                  max_steps: int = 1000, log=None) -> dict:
    """Every run of the grids (up to ``max_steps`` steps) on the bundled model, ``samples`` images
    each, cheapest first; the JSON is rewritten after every run (``complete`` false until the end),
    and ``resume`` keeps the runs it holds."""
    from diffusers import DDPMPipeline

    from ..testing import two_sample_test

    pipe = DDPMPipeline.from_pretrained(asset("models", "digits-ddpm"))
    unet, base = pipe.unet.eval(), pipe.scheduler
    meter = QualityMeter()
    old = json.loads(out.read_text()) if resume and out.exists() else None
    if old is not None and old["samples"] != samples:
        raise ValueError(f"--resume: {out} holds {old['samples']} images per run, not {samples}; drop --resume")
    result = old or {"benchmark": "quality", "samples": samples, "seed": f"image i: torch.Generator().manual_seed"
                     f"({SEED0} + i), i < {samples}, for every run", "environment": environment(),
                     "model": "assets/models/digits-ddpm", "max_rows": max_rows, "rows": [], "complete": False}
    result["command"] = command if old is None else f"{old['command']}; then {command}"
    if "reference" not in result:
        result["reference"] = meter.reference(samples)
    done = {(r["sampler"], r["steps"], r["window"]) for r in result["rows"]}
    plain_feats = {}
    jobs = [(s, k, None) for s, ks in plain_grid.items() for k in ks if k <= max_steps]
    jobs += [(s, k, w) for s, kw in speculative_grid.items() for k, w in kw if k <= max_steps]
    jobs = sorted(set(jobs), key=lambda job: (job[1], job[2] or 0, job[0]))  # cheap first, plain before speculative
    for sampler, steps, window in jobs:
        if (sampler, steps, window) in done:
            continue
        run = sample(unet, base, sampler, steps, samples, window, max_rows)
        row = _row(sampler, steps, window, run, meter.measure(run.images))
        if window is None:
            plain_feats[sampler, steps] = meter.features(run.images)
        else:  # a quality check on coupled seeds, not evidence of exactness (the test suite's law tests are)
            if (sampler, steps) not in plain_feats:  # resumed: the plain run again (the same images)
                plain_feats[sampler, steps] = meter.features(sample(unet, base, sampler, steps, samples).images)
            check = two_sample_test(meter.features(run.images), plain_feats[sampler, steps])
            row.update(two_sample_min_p=check.min_p, same_law_not_rejected=check.passed)
        result["rows"].append(row)
        _write(out, result)
        if log:
            log(f"{sampler:13s} steps {steps:5d} window {window or '-':>3}: {row['calls']:7.1f} calls, "
                f"FD {row['fd']:6.2f}, confident {row['confident_fraction']:.3f}, {row['seconds']:.0f} s")
    result["complete"] = True
    _write(out, result)
    return result


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def table(result: dict) -> str:
    """The markdown table of the results: one row per run, plain and speculative side by side at
    each step count, then the reference floor."""
    env, n, ref = result["environment"], result["samples"], result["reference"]
    lines = [f"Bundled digits DDPM, {n} images per run (image i: seed {SEED0} + i in every run), "
             f"{env['processor']} CPU, {env['threads']} thread(s), torch {env['torch']}, {env['date']} "
             f"(`{result['command'].strip()}`). Calls: sequential network calls per image (plain: steps; "
             "speculative: the mean over images). Rows: states evaluated per image (the compute). FD: Fréchet "
             "distance of the digit classifier's features to the held-out test digits (lower is better), +- the "
             "bootstrap standard deviation over the images. Confident: share of images the classifier labels "
             "with probability >= 0.9." + ("" if result.get("complete", True) else " (PARTIAL RUN)"), "",
             "| sampler | steps | run | calls / image | rows / image | FD (+- bootstrap sd) | confident | acceptance "
             "| two-sample vs plain, min p |", "|" + " --- |" * 9]
    order = {s: i for i, s in enumerate(SAMPLERS)}
    rows = sorted(result["rows"], key=lambda r: (order[r["sampler"]], r["steps"], r["window"] or 0))
    for r in rows:
        run = "plain" if r["window"] is None else f"speculative, L = {r['window']}"
        acc = "" if r.get("acceptance") is None else f"{r['acceptance']:.3f}"
        p = f"{r['two_sample_min_p']:.3f}" if "two_sample_min_p" in r else ""
        lines.append(f"| {r['title']} | {r['steps']} | {run} | {r['calls']:.1f} | {r['rows']:.0f} "
                     f"| {r['fd']:.2f} +- {r['fd_bootstrap_sd']:.2f} | {r['confident_fraction']:.1%} | {acc} | {p} |")
    sd = "" if ref["fd_subset_sd"] is None else f" +- {ref['fd_subset_sd']:.2f} (sd)"
    lines += ["", f"Reference (real digits): {len(ref['fd_subsets'])} disjoint subsets of {n} training digits "
              f"against the {ref['test_images']} test digits: FD {ref['fd_subset_mean']:.2f}{sd}; all "
              f"{ref['train_images']} training digits: FD {ref['fd_all_train']:.2f}; confident share of the "
              f"training digits {ref['confident_fraction_train']:.1%}."]
    return "\n".join(lines)


def write_docs(result: dict, path: Path = DOCS) -> None:
    """Put :func:`table` between the markers of ``path`` (appended, with them, if absent)."""
    write_between(path, MARKERS, table(result))


def plot(result: dict, path: Path) -> None:
    """FD and confident share against sequential calls (log x): a line per plain sampler, markers
    for the speculative runs (the plain sampler's colour, filled by window)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    colours = dict(zip(SAMPLERS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    shapes = ["s", "^", "D", "v", "P"]
    windows = sorted({r["window"] for r in result["rows"] if r["window"] is not None})
    for ax, key, label in ((axes[0], "fd", "digit FD vs held-out test digits (lower is better)"),
                           (axes[1], "confident_fraction", "confident share (classifier p >= 0.9)")):
        for name, (title, stochastic) in SAMPLERS.items():
            mine = sorted((r for r in result["rows"] if r["sampler"] == name and r["window"] is None),
                          key=lambda r: r["calls"])
            if mine:
                ax.plot([r["calls"] for r in mine], [r[key] for r in mine], "o-" if stochastic else "o--",
                        color=colours[name], label=f"{title} (plain)", ms=4)
                for r in mine:
                    ax.annotate(str(r["steps"]), (r["calls"], r[key]), fontsize=6, color=colours[name],
                                xytext=(2, 2), textcoords="offset points")
            for w, shape in zip(windows, shapes):
                spec = [r for r in result["rows"] if r["sampler"] == name and r["window"] == w]
                if spec:
                    ax.scatter([r["calls"] for r in spec], [r[key] for r in spec], marker=shape, s=40,
                               color=colours[name], edgecolor="black", zorder=3,
                               label=f"{title}, speculative L = {w}")
                    for r in spec:
                        ax.annotate(f"{r['steps']}", (r["calls"], r[key]), fontsize=6, xytext=(3, -8),
                                    textcoords="offset points")
                        same = [p for p in mine if p["steps"] == r["steps"]]  # the plain run it samples exactly
                        for p in same:
                            ax.plot([p["calls"], r["calls"]], [p[key], r[key]], ":", color=colours[name], lw=0.8)
        ax.set(xscale="log", xlabel="sequential network calls per image", ylabel=label)
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([5, 10, 20, 50, 100, 250, 1000]))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3, which="both")
    ref = result["reference"]
    axes[0].axhline(ref["fd_subset_mean"], color="grey", ls=":",
                    label=f"real train digits ({result['samples']}), +- sd")
    if ref["fd_subset_sd"]:
        axes[0].axhspan(ref["fd_subset_mean"] - ref["fd_subset_sd"], ref["fd_subset_mean"] + ref["fd_subset_sd"],
                        color="grey", alpha=0.12)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle(f"Bundled digits DDPM: quality against sequential calls, {result['samples']} images per run "
                 "(numbers beside points: steps)\ndotted: a speculative run and the plain run of the same steps, "
                 "whose law it samples exactly)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdiff.workbench.bench_quality",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=128, help="images per run (the same seeds in every run)")
    parser.add_argument("--quick", action="store_true", help="a few runs (smoke test); writes nothing by default")
    parser.add_argument("--max-rows", type=int, default=1024, help="most states per network call (exact)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=results("quality.json"))
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--table", action="store_true", help="re-render the table and the plot from --out only")
    parser.add_argument("--add", action="append", default=[], metavar="SAMPLER:STEPS[:WINDOW]",
                        help="one more run besides the grid: plain (SAMPLER:STEPS) or speculative (with a window); "
                        "repeatable, e.g. --add ddpm:1000:32")
    parser.add_argument("--max-steps", type=int, default=1000, help="skip the runs of more steps")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out (same --samples)")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.quick and "--out" not in argv:
        args.out = Path(tempfile.gettempdir()) / "specdiff_quality_quick.json"
    if args.table:
        result = json.loads(args.out.read_text())
    else:
        torch.set_num_threads(args.threads)
        plain, speculative = (QUICK_PLAIN, QUICK_SPECULATIVE) if args.quick else (PLAIN_GRID, SPECULATIVE_GRID)
        plain, speculative = {k: list(v) for k, v in plain.items()}, {k: list(v) for k, v in speculative.items()}
        for extra in args.add:
            name, *numbers = extra.split(":")
            if name not in SAMPLERS or len(numbers) not in (1, 2) or not all(x.isdigit() for x in numbers):
                parser.error(f"--add {extra}: expected SAMPLER:STEPS or SAMPLER:STEPS:WINDOW with SAMPLER one of "
                             f"{', '.join(SAMPLERS)}")
            if len(numbers) == 1:
                plain.setdefault(name, []).append(int(numbers[0]))
            else:
                speculative.setdefault(name, []).append((int(numbers[0]), int(numbers[1])))
        grids = (plain, speculative)
        command = " ".join(["python -m specdiff.workbench.bench_quality", *argv])
        result = run_benchmark(args.samples, *grids, args.out, args.max_rows, args.resume, command,
                               args.max_steps, log=lambda line: print(line, flush=True))
    if not args.quick:
        write_docs(result, args.docs)
    plot(result, args.out.with_suffix(".png"))
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
