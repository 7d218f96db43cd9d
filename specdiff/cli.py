"""Command line: ``specdiff generate`` (the main job; DDPM-style or masked-diffusion models),
``specdiff analytic``,
``specdiff bench``, ``specdiff train-digits``. Also ``python -m specdiff``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .paths import asset

DEFAULT_MODEL = asset("models", "digits-ddpm")
DEFAULT_DRAFT = DEFAULT_MODEL.parent / "digits-draft"


class CLIError(SystemExit):
    """A user error: one clear line on stderr, exit status 2."""

    def __init__(self, message: str):
        print(f"specdiff: error: {message}", file=sys.stderr)
        super().__init__(2)


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _writable(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".specdiff-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise CLIError(f"cannot write to output folder {folder} ({err.strerror}); pass --out to a writable folder")
    return folder


def _is_masked(model: str) -> bool:
    index = Path(model) / "model_index.json"
    return index.exists() and "MaskedDiffusion" in index.read_text()


def _load_pipeline(model: str, device: str):
    """``(speculative pipeline, plain pipeline)`` for ``model``: masked (discrete) diffusion
    (the plain sampler is the same pipeline with ``window=None``) or a DDPM-style image
    pipeline whose scheduler specdiff supports (the plain sampler is diffusers' own)."""
    import torch
    from diffusers import DiffusionPipeline

    from .pipelines import SpeculativeDDPMPipeline, SpeculativeMaskedDiffusionPipeline

    local = Path(model)
    if not local.exists() and (local.is_absolute() or model.startswith(".") or model.count("/") != 1):
        raise CLIError(f"model path {model} does not exist; pass a diffusers model folder or a hub id (org/name)")
    try:
        if _is_masked(model):
            pipe = plain = SpeculativeMaskedDiffusionPipeline.from_pretrained(model)
        else:
            plain = DiffusionPipeline.from_pretrained(model)
            pipe = SpeculativeDDPMPipeline.from_pipe(plain)
    except (ValueError, TypeError) as err:
        raise CLIError(f"{model}: {err}") from err
    except Exception as err:  # hub errors, missing files, wrong format
        raise CLIError(f"could not load a diffusers pipeline from {model}: {err}") from err
    if torch.device(device).type != "cpu":
        pipe, plain = pipe.to(torch.device(device)), plain.to(torch.device(device))
    return pipe, plain


def _draft_kwargs(args, masked: bool) -> dict:
    if args.drafter == "frozen":
        return {}
    path = Path(args.draft_model or (Path(args.model) / "drafter" if masked else DEFAULT_DRAFT))
    if not path.exists():
        raise CLIError(f"draft model {path} does not exist; pass --draft-model or use --drafter frozen")
    if masked:
        from .discrete.model import MaskedDiffusionTransformer

        weights = path / "transformer" if (path / "transformer").is_dir() else path  # a pipeline folder or a model
        return {"drafter": MaskedDiffusionTransformer.from_pretrained(weights).to(args.device)}
    from diffusers import UNet2DModel

    return {"draft_unet": UNet2DModel.from_pretrained(path).to(args.device)}


def _save_grid(images, path: Path) -> None:
    import torch
    from torchvision.utils import save_image

    images = torch.as_tensor(images)
    if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):  # numpy NHWC (diffusers' "np") -> NCHW
        images = images.permute(0, 3, 1, 2)
    save_image(images, path, nrow=max(1, int(len(images) ** 0.5)), padding=1)


def cmd_generate(args) -> int:
    import torch

    from .workbench.text_cli import generate_text, is_text_model

    if is_text_model(args.model):
        return generate_text(args)

    out = _writable(Path(args.out))
    masked = _is_masked(args.model)
    pipe, plain_pipe = _load_pipeline(args.model, args.device)
    for p in (pipe, plain_pipe):
        p.set_progress_bar_config(disable=args.no_progress)
    draft = _draft_kwargs(args, masked)

    def run(pipeline, **kwargs):
        seeds = [torch.Generator(device="cpu").manual_seed(args.seed + i) for i in range(args.num_images)]
        started = time.perf_counter()
        result = pipeline(batch_size=args.num_images, generator=seeds, num_inference_steps=args.steps,
                          output_type="pt", **kwargs)
        return result, time.perf_counter() - started

    result, wall = run(pipe, window=args.window, **draft)
    stats = result.stats
    _save_grid(result.images, out / "speculative.png")
    report = {"model": str(args.model), "steps": args.steps, "window": args.window, "drafter": args.drafter,
              "num_images": args.num_images, "seed": args.seed, "wall_clock_s": wall, "speculative": stats.to_dict()}
    print(f"speculative: {stats.summary()}; {wall:.1f}s wall-clock")
    if args.compare:
        # The plain sampler on the same seeds (and, for masked diffusion, the cached one too).
        if masked:
            baselines = {"plain": run(plain_pipe, window=None), "cached": run(plain_pipe, window=None, cache=True)}
        else:
            baselines = {"plain": run(plain_pipe)}
        _save_grid(baselines["plain"][0].images, out / "baseline.png")
        for name, (plain, plain_wall) in baselines.items():
            calls = plain.stats.target_calls if hasattr(plain, "stats") else args.steps
            rows = plain.stats.target_rows if hasattr(plain, "stats") else args.steps * args.num_images
            report[name] = {"target_calls": calls, "target_rows": rows, "wall_clock_s": plain_wall,
                            "wall_clock_ratio": plain_wall / wall}
            print(f"{name + ':':12} {calls} target calls; {plain_wall:.1f}s wall-clock => "
                  f"{calls / stats.target_calls:.2f}x fewer sequential target calls, {plain_wall / wall:.2f}x wall-clock")
    (out / "stats.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'speculative.png'} and {out / 'stats.json'}")
    return 0


def cmd_analytic(args) -> int:
    """Exactness and speed on the analytic Gaussian-mixture DDPM (no network, no files)."""
    import torch

    from . import sample_baseline, speculative_sample
    from .testing import GaussianMixtureDDPM, two_sample_test

    chain = GaussianMixtureDDPM.random(dim=args.dim, num_steps=args.steps)
    x = chain.sample_prior(args.samples, torch.Generator().manual_seed(args.seed))
    base = sample_baseline(chain, x, torch.Generator().manual_seed(args.seed + 1))
    out = speculative_sample(chain, x, window=args.window, generator=torch.Generator().manual_seed(args.seed + 2),
                             progress=not args.no_progress)
    print(f"analytic mixture, dim {args.dim}, {args.steps} DDPM steps, window {args.window}, {args.samples} samples")
    print(f"speculative: {out.stats.summary()}")
    print(f"exactness vs plain sampler: {two_sample_test(out.sample, base)}")
    return 0


def cmd_train_digits(args) -> int:
    from .workbench.train_digits import main as train_main

    return train_main(args.rest) or 0


def cmd_bench(args) -> int:
    from .workbench.bench import main as bench_main

    return bench_main(args.rest) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdiff", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images with the speculative sampler")
    gen.add_argument("--model", default=str(DEFAULT_MODEL), help="diffusers pipeline folder or hub id (default: bundled digits DDPM)")
    gen.add_argument("--num-images", type=_positive(int), default=16)
    gen.add_argument("--steps", type=_positive(int), default=1000, help="number of denoising steps")
    gen.add_argument("--window", type=_positive(int), default=16, help="drafted steps per round (1 = plain sampler)")
    gen.add_argument("--drafter", choices=["frozen", "model"], default="frozen")
    gen.add_argument("--draft-model", default=None,
                     help="draft model folder for --drafter model (default: the bundled digits draft UNet, or "
                          "the masked model's drafter/ subfolder)")
    gen.add_argument("--seed", type=int, default=0, help="image i uses torch.Generator().manual_seed(seed + i)")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--out", default="outputs/generate", help="folder for the PNG grid and stats.json")
    gen.add_argument("--compare", action="store_true", help="also run the plain sampler on the same seeds")
    gen.add_argument("--no-progress", action="store_true")
    gen.add_argument("--prompt", default=None, help="text models: the text to continue (kept fixed)")
    gen.add_argument("--length", type=_positive(int), default=128, help="text models: tokens to generate")
    gen.add_argument("--block-size", type=_positive(int), default=None, help="text models: semi-AR blocks")
    gen.set_defaults(func=cmd_generate)

    ana = sub.add_parser("analytic", help="exactness and speed on the analytic Gaussian-mixture model")
    ana.add_argument("--dim", type=_positive(int), default=2)
    ana.add_argument("--steps", type=_positive(int), default=1000)
    ana.add_argument("--window", type=_positive(int), default=16)
    ana.add_argument("--samples", type=_positive(int), default=2000)
    ana.add_argument("--seed", type=int, default=0)
    ana.add_argument("--no-progress", action="store_true")
    ana.set_defaults(func=cmd_analytic)

    for name, func, text in [("train-digits", cmd_train_digits, "train the bundled digits models"),
                             ("bench", cmd_bench, "run the benchmarks (results in assets/bench/)")]:
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
