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
        raise SystemExit(
            f"specdiff: error: draft model {path} does not exist; pass --draft-model or use --drafter frozen"
        )
    return AutoModelForMaskedLM.from_pretrained(path).eval().to(args.device)


def _length(model: Path, prompt: str | None, length: int | None) -> int:
    """``--length``, by default what the model's positions leave after the prompt; a prompt and length the
    model has no positions for stop with the fix (a rotary-position network accepts them silently).
    Read from the folder's tokenizer and network config, before the network is loaded."""
    from transformers import AutoConfig, AutoTokenizer

    from specdiff.cli_support import CLIError
    from specdiff.text.chain import check_positions

    positions = getattr(AutoConfig.from_pretrained(model / "transformer"), "max_position_embeddings", None)
    tokenizer = AutoTokenizer.from_pretrained(model / "tokenizer")
    used = len(tokenizer(prompt, add_special_tokens=False).input_ids) if prompt else 0
    if positions is None:
        return length or 128
    try:
        check_positions(used, length, positions, cli=True)
    except ValueError as err:
        raise CLIError(str(err)) from None
    return length or positions - used


def generate_text(args, state) -> int:
    """Like the image path: the seeds cut into batches of ``--batch-size``, each process (accelerate's
    ``state``) samples its share, rank 0 prints and writes everything."""
    import torch
    from accelerate.utils import gather_object

    from specdiff.cli_support import combine_records, loading_bars
    from specdiff.cli_support import replayed_windows as _replayed
    from specdiff.pipelines import SpeculativeTextDiffusionPipeline

    args.length = _length(Path(args.model), args.prompt, args.length)
    seeds = list(range(args.seed, args.seed + args.num_images))
    batches = [seeds[i:i + args.batch_size] for i in range(0, len(seeds), args.batch_size)]
    windows = {tuple(batch): _replayed(args, batch) for batch in batches}  # --replay: each batch's schedule
    quiet = args.no_progress or not state.is_main_process
    with loading_bars(shown=not quiet):
        pipe = SpeculativeTextDiffusionPipeline.from_pretrained(args.model).to(args.device)
    pipe.set_progress_bar_config(disable=quiet)
    drafter = _drafter(args)

    def options(name, batch):
        if name == "speculative":
            return {"window": windows[tuple(batch)], "drafter": drafter, "max_rows": args.max_rows}
        return {"window": None, "cache": name == "cached"}

    samplers = (["plain", "cached"] if args.compare else []) + ["speculative"]

    def run(batch, **kwargs):
        started = time.perf_counter()
        try:
            out = pipe(prompt=args.prompt, num_samples=len(batch), length=args.length,
                       generator=[torch.Generator().manual_seed(s) for s in batch],
                       num_inference_steps=args.steps, block_size=args.block_size, **kwargs)
        except ValueError as err:
            raise SystemExit(f"specdiff: error: {err}") from err
        return {"seeds": batch, "texts": out.texts, "stats": out.stats.to_dict(),
                "wall_clock_s": time.perf_counter() - started}

    pipe(prompt=args.prompt, length=args.length, num_inference_steps=1, window=None)  # warm-up, not timed
    with state.split_between_processes(batches) as mine:
        local = {name: [run(batch, **options(name, batch)) for batch in mine] for name in samplers}
    gathered = {name: sorted(gather_object([(state.process_index, r) for r in local[name]]),
                             key=lambda pair: pair[1]["seeds"][0]) for name in samplers}
    if not state.is_main_process:
        return 0
    report = {"model": str(args.model), "prompt": args.prompt, "length": args.length, "steps": args.steps,
              "window": f"replay of {args.replay}" if getattr(args, "replay", None) else args.window,
              "drafter": args.drafter, "block_size": args.block_size, "processes": state.num_processes,
              "texts": [text for _, r in gathered["speculative"] for text in r["texts"]]}
    for name in samplers:
        report[name] = combine_records([r for _, r in gathered[name]], [k for k, _ in gathered[name]])
    for seed, text in zip(seeds, report["texts"]):
        print(f"--- sample {seed - args.seed} (seed {seed})\n{text}")
    print(f"\n{'sampler':12} {'calls':>6} {'rows':>7} {'wall-clock':>11}")
    for name in samplers:
        r = report[name]
        print(f"{name:12} {r['target_calls']:6d} {r['target_rows']:7d} {r['wall_clock_s']:10.2f}s")
    if args.compare:
        spec, cached = report["speculative"], report["cached"]
        print(f"speculative vs cached: {cached['target_calls'] / spec['target_calls']:.2f}x fewer sequential "
              f"calls, {cached['wall_clock_s'] / spec['wall_clock_s']:.2f}x wall-clock "
              f"(acceptance {spec['acceptance_rate']:.3f})")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "stats.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_dir / 'stats.json'}")
    return 0
