"""``specdiff generate`` for text models (a folder whose pipeline is
``SpeculativeTextDiffusionPipeline``): prints the generated texts and, with ``--compare``,
the plain / cached / speculative table (sequential network calls, rows, wall-clock)."""

from __future__ import annotations

import json
import time
from pathlib import Path


def is_text_model(model: str) -> bool:
    index = Path(model) / "model_index.json"
    return index.exists() and "SpeculativeTextDiffusionPipeline" in index.read_text()


def _drafter(args):
    if args.drafter in ("frozen", "picard"):
        return args.drafter
    from transformers import AutoModelForMaskedLM

    path = Path(args.draft_model or Path(args.model) / "drafter")
    if not path.exists():
        raise SystemExit(f"specdiff: error: draft model {path} does not exist; pass --draft-model or use --drafter frozen")
    return AutoModelForMaskedLM.from_pretrained(path).eval().to(args.device)


def generate_text(args) -> int:
    import torch

    from specdiff.pipelines import SpeculativeTextDiffusionPipeline

    pipe = SpeculativeTextDiffusionPipeline.from_pretrained(args.model).to(args.device)
    pipe.set_progress_bar_config(disable=args.no_progress)
    drafter = _drafter(args)

    def run(**kwargs):
        seeds = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
        started = time.perf_counter()
        try:
            out = pipe(prompt=args.prompt, num_samples=args.num_images, length=args.length, generator=seeds,
                       num_inference_steps=args.steps, block_size=args.block_size, **kwargs)
        except ValueError as err:
            raise SystemExit(f"specdiff: error: {err}") from err
        return out, time.perf_counter() - started

    pipe(prompt=args.prompt, length=args.length, num_inference_steps=1, window=None)  # warm-up, not timed
    runs = {"speculative": run(window=args.window, drafter=drafter)}
    if args.compare:
        runs = {"plain": run(window=None), "cached": run(window=None, cache=True), **runs}
    for i, text in enumerate(runs["speculative"][0].texts):
        print(f"--- sample {i} (seed {args.seed + i})\n{text}")
    print(f"\n{'sampler':12} {'calls':>6} {'rows':>7} {'wall-clock':>11}")
    for name, (out, wall) in runs.items():
        print(f"{name:12} {out.stats.target_calls:6d} {out.stats.target_rows:7d} {wall:10.2f}s")
    spec, spec_wall = runs["speculative"]
    report = {"model": str(args.model), "prompt": args.prompt, "length": args.length, "steps": args.steps,
              "window": args.window, "drafter": args.drafter, "block_size": args.block_size,
              "texts": spec.texts}
    for name, (out, wall) in runs.items():
        report[name] = {**out.stats.to_dict(), "wall_clock_s": wall}
    if args.compare:
        cached, cached_wall = runs["cached"]
        print(f"speculative vs cached: {cached.stats.target_calls / spec.stats.target_calls:.2f}x fewer sequential "
              f"calls, {cached_wall / spec_wall:.2f}x wall-clock (acceptance {spec.stats.acceptance_rate:.3f})")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "stats.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_dir / 'stats.json'}")
    return 0
