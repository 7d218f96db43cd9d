"""Train the bundled digit models on CPU, reproducibly.

Usage::

    python -m specdiff.workbench.train_digits --out assets/models [--iters N] [--seed S] [--threads T]
                             [--only classifier|ddpm|draft|eval] [--resume]

Trains, in this order, and saves in diffusers format under ``--out``:

* ``digits-classifier/`` -- :class:`specdiff.workbench.digits.DigitClassifier` (used to judge samples);
* ``digits-ddpm/``       -- a :class:`diffusers.DDPMPipeline` (target model, EMA weights);
* ``digits-draft/``      -- a much smaller :class:`diffusers.UNet2DModel` on the same
  noise schedule, distilled from the target's epsilon predictions (the draft model
  for speculative sampling).

Then it samples from the pipeline to measure sample quality, and writes
``training_summary.json`` and the model card ``README.md``.  Each stage reseeds
one ``torch.Generator`` (and torch's global seed) from ``--seed``, so a stage
run alone with ``--only`` gives the same weights as in a full run.  ``--only ddpm
--resume`` continues training the saved target model; the commands that made the
shipped models are listed in ``assets/models/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from specdiff.workbench.digits import (
    DigitClassifier,
    confident_fraction,
    digit_fd,
    load_digits_images,
)

DDPM_DIR = "digits-ddpm"
DRAFT_DIR = "digits-draft"
CLASSIFIER_DIR = "digits-classifier"
SUMMARY_FILE = "training_summary.json"
STAGES = ("classifier", "ddpm", "draft")
# Offsets added to --seed when a stage (re)seeds the generator.
_SEED_OFFSETS = {"classifier": 0, "ddpm": 1000, "draft": 2000, "eval": 3000}

# Defaults used for the shipped models (see assets/models/README.md).
DEFAULT_ITERS = {"classifier": 400, "ddpm": 2400, "draft": 1000}


# --------------------------------------------------------------------------- models


def make_scheduler() -> DDPMScheduler:
    """The noise schedule shared by the target and the draft model."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        variance_type="fixed_small",
        clip_sample=True,
        prediction_type="epsilon",
    )


def make_target_unet() -> UNet2DModel:
    """~1.1M-parameter UNet: 16x16 -> 8x8 -> 4x4, self-attention at 4x4 only."""
    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    )


def make_draft_unet() -> UNet2DModel:
    """~0.16M-parameter UNet without attention: 16x16 -> 8x8."""
    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


# --------------------------------------------------------------------------- helpers


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels in x and y, filling with -1 (background)."""
    n, _, h, w = x.shape
    m = max_shift
    padded = F.pad(x, (m, m, m, m), value=-1.0)
    dy = torch.randint(0, 2 * m + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * m + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (n, 1, w)
    out = padded[torch.arange(n)[:, None, None], :, rows, cols]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


def lr_lambda(total: int, warmup: int = 100, floor: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``floor`` times the base learning rate."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


class EMA:
    """Exponential moving average of a model's parameters (with the usual warm-up)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in model.parameters()]
        self.step = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.step += 1
        d = min(self.decay, (1 + self.step) / (10 + self.step))
        for s, p in zip(self.shadow, model.parameters()):
            s.lerp_(p.detach(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for s, p in zip(self.shadow, model.parameters()):
            p.copy_(s)


def sample_batch(data: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, len(data), (batch_size,), generator=generator)
    return data[idx]


def noisy_batch(x0: torch.Tensor, scheduler: DDPMScheduler, generator: torch.Generator):
    """Forward-diffuse ``x0`` to uniformly drawn timesteps: returns ``(x_t, t, noise)``."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    return scheduler.add_noise(x0, noise, t), t, noise


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(model: torch.nn.Module, *inputs) -> int:
    """Forward FLOPs for one sample (torch's FLOP counter; a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return int(counter.get_total_flops())


def dir_size(path: Path) -> Dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def reseed(stage: str, seed: int, generator: torch.Generator) -> None:
    torch.manual_seed(seed + _SEED_OFFSETS[stage])
    generator.manual_seed(seed + _SEED_OFFSETS[stage])


def progress(iterable, desc: str):
    return tqdm(iterable, desc=desc, mininterval=5.0, dynamic_ncols=True, file=sys.stderr)


@torch.no_grad()
def eps_mse(
    model: UNet2DModel,
    reference: Optional[UNet2DModel],
    images: torch.Tensor,
    scheduler: DDPMScheduler,
    generator: torch.Generator,
    repeats: int = 4,
    batch_size: int = 256,
) -> float:
    """Mean squared error of ``model``'s epsilon on forward-diffused ``images``.

    Against the true noise when ``reference`` is None, else against ``reference``'s
    epsilon prediction.  Timesteps are uniform over the schedule.
    """
    model.eval()
    if reference is not None:
        reference.eval()
    total, count = 0.0, 0
    data = images.repeat(repeats, 1, 1, 1)
    for start in range(0, len(data), batch_size):
        x0 = data[start : start + batch_size]
        xt, t, noise = noisy_batch(x0, scheduler, generator)
        target = noise if reference is None else reference(xt, t).sample
        total += F.mse_loss(model(xt, t).sample, target, reduction="sum").item()
        count += target.numel()
    return total / count


# --------------------------------------------------------------------------- stages


def train_classifier(args, out: Path, generator: torch.Generator) -> dict:
    reseed("classifier", args.seed, generator)
    x_train, y_train = load_digits_images("train")
    x_test, y_test = load_digits_images("test")
    model = DigitClassifier()
    iters = args.classifier_iters
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(iters, warmup=50, floor=0.01))
    model.train()
    losses: List[float] = []
    start = time.time()
    for _ in progress(range(iters), "classifier"):
        idx = torch.randint(0, len(x_train), (args.batch_size,), generator=generator)
        x = random_shift(x_train[idx], generator)
        loss = F.cross_entropy(model(x), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    wall = time.time() - start
    model.eval()
    with torch.no_grad():
        test_acc = float((model(x_test).argmax(-1) == y_test).float().mean())
        train_acc = float((model(x_train).argmax(-1) == y_train).float().mean())
    path = out / CLASSIFIER_DIR
    model.save_pretrained(path)
    return {
        "iters": iters,
        "batch_size": args.batch_size,
        "wall_clock_s": round(wall, 1),
        "final_loss": _tail_mean(losses),
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "n_train": len(x_train),
        "n_test": len(x_test),
        "params": n_params(model),
        "flops_per_sample": flops_per_sample(model, x_test[:1]),
        "files": dir_size(path),
    }


def fit_epsilon(model, x_train, scheduler, generator, args, iters: int, label: str, teacher=None):
    """AdamW + warm-up/cosine lr + EMA on the epsilon-MSE objective (the ``teacher``'s epsilon
    predictions replace the true noise when distilling). Returns ``(losses, seconds, ema)``."""
    ema = EMA(model, decay=args.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(iters))
    model.train()
    losses: List[float] = []
    start = time.time()
    bar = progress(range(iters), label)
    for step in bar:
        x0 = random_shift(sample_batch(x_train, args.batch_size, generator), generator)
        xt, t, noise = noisy_batch(x0, scheduler, generator)
        if teacher is not None:
            with torch.no_grad():
                noise = teacher(xt, t).sample
        loss = F.mse_loss(model(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(model)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{_tail_mean(losses):.4f}")
    return losses, time.time() - start, ema


def train_ddpm(args, out: Path, generator: torch.Generator, previous: Optional[dict] = None) -> dict:
    """Train the target UNet; with ``--resume``, continue from the saved (EMA) weights."""
    path = out / DDPM_DIR
    done = previous.get("iters", 0) if (args.resume and previous) else 0
    if args.resume and not (path / "unet").exists():
        raise FileNotFoundError(f"--resume needs a saved pipeline at {path}")
    # a resumed run draws fresh batches: offset the seed by the iterations already done
    reseed("ddpm", args.seed + done, generator)
    x_train, _ = load_digits_images("train")
    x_test, _ = load_digits_images("test")
    scheduler = make_scheduler()
    model = UNet2DModel.from_pretrained(path / "unet") if args.resume else make_target_unet()
    iters = args.ddpm_iters
    losses, wall, ema = fit_epsilon(model, x_train, scheduler, generator, args, iters, "ddpm")
    ema.copy_to(model)
    model.eval()
    DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(path, safe_serialization=True)
    test_mse = eps_mse(model, None, x_test, scheduler, torch.Generator().manual_seed(args.seed), args.metric_repeats)
    phase = {"iters": iters, "lr": args.lr, "wall_clock_s": round(wall, 1), "final_loss": _tail_mean(losses)}
    phases = (previous.get("phases") or [_phase_of(previous)]) if done else []
    phases = phases + [phase]
    return {
        "iters": done + iters,
        "phases": phases,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "ema_decay": args.ema_decay,
        "wall_clock_s": round(sum(p["wall_clock_s"] for p in phases), 1),
        "final_loss": phase["final_loss"],
        "test_eps_mse": test_mse,
        "params": n_params(model),
        "flops_per_sample": flops_per_sample(model, x_test[:1], torch.tensor([500])),
        "files": dir_size(path),
    }


def train_draft(args, out: Path, generator: torch.Generator) -> dict:
    reseed("draft", args.seed, generator)
    x_train, _ = load_digits_images("train")
    x_test, _ = load_digits_images("test")
    scheduler = make_scheduler()
    target_path = out / DDPM_DIR / "unet"
    target = UNet2DModel.from_pretrained(target_path) if target_path.exists() else None
    objective = args.draft_objective
    if objective == "distill" and target is None:
        raise FileNotFoundError(f"--draft-objective distill needs the target model at {target_path}; train ddpm first")
    if target is not None:
        target.eval().requires_grad_(False)
    model = make_draft_unet()
    iters = args.draft_iters
    losses, wall, ema = fit_epsilon(
        model, x_train, scheduler, generator, args, iters, f"draft ({objective})",
        teacher=target if objective == "distill" else None,
    )
    ema.copy_to(model)
    model.eval()
    path = out / DRAFT_DIR
    model.save_pretrained(path)
    summary = {
        "objective": objective,
        "iters": iters,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "ema_decay": args.ema_decay,
        "wall_clock_s": round(wall, 1),
        "final_loss": _tail_mean(losses),
        "test_eps_mse": eps_mse(
            model, None, x_test, scheduler, torch.Generator().manual_seed(args.seed), args.metric_repeats
        ),
        "params": n_params(model),
        "flops_per_sample": flops_per_sample(model, x_test[:1], torch.tensor([500])),
        "files": dir_size(path),
    }
    if target is not None:
        summary["eps_mse_vs_target"] = eps_mse(
            model, target, x_test, scheduler, torch.Generator().manual_seed(args.seed), args.metric_repeats
        )
    return summary


@torch.no_grad()
def evaluate_samples(args, out: Path, generator: torch.Generator) -> dict:
    """Sample from the saved pipeline and judge the samples with the saved classifier."""
    reseed("eval", args.seed, generator)
    pipe = DDPMPipeline.from_pretrained(out / DDPM_DIR)
    pipe.set_progress_bar_config(mininterval=10.0, file=sys.stderr, desc="sampling")
    classifier = DigitClassifier.from_pretrained(out / CLASSIFIER_DIR).eval()
    start = time.time()
    images = pipe(
        batch_size=args.eval_samples,
        generator=generator,
        num_inference_steps=args.eval_steps,
        output_type="np",
    ).images
    wall = time.time() - start
    samples = torch.from_numpy(images).permute(0, 3, 1, 2).float() * 2.0 - 1.0
    x_train, _ = load_digits_images("train")
    x_test, _ = load_digits_images("test")
    probs = classifier(samples).softmax(-1)
    result = {
        "n_samples": args.eval_samples,
        "num_inference_steps": args.eval_steps,
        "sampling_wall_clock_s": round(wall, 1),
        "confident_fraction_0.9": confident_fraction(classifier, samples, 0.9),
        "digit_fd_vs_test": digit_fd(classifier, samples, x_test),
        "reference_digit_fd_train_vs_test": digit_fd(classifier, x_train, x_test),
        "class_histogram": torch.bincount(probs.argmax(-1), minlength=10).tolist(),
    }
    if args.sample_grid:
        _save_grid(samples, args.sample_grid)
    return result


def _save_grid(samples: torch.Tensor, path: str, nrow: int = 16) -> None:
    from PIL import Image

    nrow = min(nrow, len(samples))
    n = (len(samples) // nrow) * nrow
    x = ((samples[:n] + 1) * 127.5).clamp(0, 255).to(torch.uint8)[:, 0]  # (n, h, w)
    h, w = x.shape[1:]
    grid = x.reshape(n // nrow, nrow, h, w).permute(0, 2, 1, 3).reshape(n // nrow * h, nrow * w)
    Image.fromarray(grid.numpy()).resize((nrow * w * 4, n // nrow * h * 4), Image.NEAREST).save(path)


def _phase_of(summary: dict) -> dict:
    return {k: summary[k] for k in ("iters", "lr", "wall_clock_s", "final_loss")}


def _tail_mean(values: List[float], n: int = 100) -> float:
    tail = values[-n:]
    return float(sum(tail) / max(1, len(tail)))


# --------------------------------------------------------------------------- model card


def _fmt_size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _files_table(files: Dict[str, int]) -> str:
    return ", ".join(f"`{k}` ({_fmt_size(v)})" for k, v in files.items() if k.endswith(".safetensors"))


def _phases_text(d: dict) -> str:
    phases = d.get("phases") or []
    if len(phases) < 2:
        return ""
    parts = [f"{p['iters']} at peak lr {p['lr']}" for p in phases]
    return " (" + ", then resumed for ".join(parts) + ", each with its own warm-up and cosine decay)"


def write_model_card(out: Path, summary: dict) -> None:
    c, d, r, e = (summary.get(k) for k in ("classifier", "ddpm", "draft", "eval"))
    lines = [
        "# Bundled digit models",
        "",
        "Small models trained on CPU on scikit-learn's bundled handwritten digits "
        "(`sklearn.datasets.load_digits`: 1797 8x8 images, upsampled bilinearly to 16x16, "
        "scaled to [-1, 1]; fixed 80/20 train/test split, see `specdiff.workbench.digits.load_digits_images`). "
        "They let specdiff's tests, benchmarks and examples run offline with real trained models.",
        "",
        "| folder | what | params | forward MFLOPs / sample | weights |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, folder, what in (
        ("ddpm", DDPM_DIR, "`DDPMPipeline` (target model + scheduler), EMA weights"),
        ("draft", DRAFT_DIR, "`UNet2DModel` draft for speculative sampling"),
        ("classifier", CLASSIFIER_DIR, "`DigitClassifier` for judging samples"),
    ):
        s = summary.get(name)
        if s:
            lines.append(
                f"| `{folder}/` | {what} | {s['params']:,} | {s['flops_per_sample'] / 1e6:.1f} "
                f"| {_files_table(s['files'])} |"
            )
    lines += ["", "## Training", ""]
    lines += [
        "Commands, run in this order from the repository root:",
        "",
        *[f"    {cmd}" for cmd in summary["commands"]],
        "",
        f"Seed {summary['seed']}, {summary['threads']} CPU thread(s), torch {summary['torch']}, "
        f"diffusers {summary['diffusers']}. Each stage reseeds one `torch.Generator` from the seed, "
        "so `--only STAGE` reproduces that stage of a full run. "
        "Wall-clock times depend on the machine and its load (these were measured on a shared 2-core CPU box).",
        "",
    ]
    sched = (
        "DDPMScheduler(num_train_timesteps=1000, beta_schedule=\"squaredcos_cap_v2\", "
        "variance_type=\"fixed_small\", clip_sample=True, prediction_type=\"epsilon\")"
    )
    if d:
        lines += [
            "**digits-ddpm** -- `UNet2DModel(sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1, "
            "attention only in the 4x4 block)`, schedule `" + sched + "`. "
            f"Epsilon-MSE objective, AdamW lr {d['lr']} (warm-up + cosine decay), batch {d['batch_size']}, "
            f"random +-1 px shifts (no flips), EMA {d['ema_decay']} (EMA weights saved). "
            f"{d['iters']} iterations{_phases_text(d)} in {d['wall_clock_s'] / 60:.1f} min; final training loss "
            f"(mean of last 100 iterations) {d['final_loss']:.4f}; eps-MSE on the test split {d['test_eps_mse']:.4f}.",
            "",
        ]
    if r:
        how = (
            "distilled from digits-ddpm's epsilon predictions on forward-diffused training images"
            if r["objective"] == "distill"
            else "trained on the same epsilon-MSE data objective"
        )
        vs = (
            f"; **eps-MSE vs digits-ddpm on the test split {r['eps_mse_vs_target']:.4f}**"
            if "eps_mse_vs_target" in r
            else ""
        )
        ratio = (
            f" ({d['params'] / r['params']:.1f}x fewer parameters, "
            f"{d['flops_per_sample'] / r['flops_per_sample']:.1f}x fewer FLOPs than digits-ddpm)"
            if d
            else ""
        )
        lines += [
            f"**digits-draft** -- `UNet2DModel(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, "
            f"no attention)`{ratio}, same schedule and prediction type, {how}. "
            f"AdamW lr {r['lr']}, batch {r['batch_size']}, EMA {r['ema_decay']}. "
            f"{r['iters']} iterations in {r['wall_clock_s'] / 60:.1f} min; "
            f"final training loss {r['final_loss']:.4f}{vs}; "
            f"eps-MSE vs the true noise on the test split {r['test_eps_mse']:.4f}.",
            "",
        ]
        cmp = summary.get("draft_objective_comparison")
        if cmp:
            lines += [
                "Choice of objective: the same draft trained instead on the data objective "
                f"(`{cmp['command']}`, {cmp['iters']} iterations, {cmp['wall_clock_s'] / 60:.1f} min) "
                f"reaches eps-MSE {cmp['eps_mse_vs_target']:.4f} vs digits-ddpm with as many iterations "
                f"(and {cmp['test_eps_mse']:.4f} vs the true noise), so the distilled draft is kept.",
                "",
            ]
    if c:
        lines += [
            "**digits-classifier** -- `DigitClassifier`: two conv stages (32, 64 channels, GroupNorm, SiLU, max-pool) "
            "and a 64-dim feature layer (`features(x)`, used for the digit Fréchet distance) before the 10-way head. "
            f"Cross-entropy, AdamW, batch {c['batch_size']}, random +-1 px shifts. {c['iters']} iterations in "
            f"{c['wall_clock_s'] / 60:.1f} min; final training loss {c['final_loss']:.4f}; "
            f"**test accuracy {c['test_accuracy'] * 100:.2f}%** ({c['n_test']} test images).",
            "",
        ]
    if e:
        lines += [
            "## Sample quality",
            "",
            f"{e['n_samples']} samples from `digits-ddpm` with {e['num_inference_steps']} DDPM steps "
            f"({e['sampling_wall_clock_s'] / 60:.1f} min on {summary['threads']} CPU thread(s)):",
            "",
            f"* confident fraction (classifier max prob >= 0.9): **{e['confident_fraction_0.9'] * 100:.1f}%**",
            f"* digit FD vs the test split: **{e['digit_fd_vs_test']:.3f}** "
            f"(reference: train split vs test split {e['reference_digit_fd_train_vs_test']:.3f})",
            f"* predicted classes 0-9: {e['class_histogram']}",
            "",
        ]
    lines += [
        "## Loading",
        "",
        "```python",
        "from diffusers import DDPMPipeline, UNet2DModel",
        "from specdiff.workbench.digits import DigitClassifier",
        "",
        f'pipe = DDPMPipeline.from_pretrained("assets/models/{DDPM_DIR}")',
        f'draft = UNet2DModel.from_pretrained("assets/models/{DRAFT_DIR}")',
        f'classifier = DigitClassifier.from_pretrained("assets/models/{CLASSIFIER_DIR}")',
        "```",
        "",
        f"`{SUMMARY_FILE}` holds all the numbers above in machine-readable form.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m specdiff.workbench.train_digits", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="assets/models", help="output folder (default: assets/models)")
    p.add_argument("--iters", type=int, default=None, help="iterations for every stage (overrides the defaults)")
    for stage in STAGES:
        p.add_argument(
            f"--{stage}-iters", type=int, default=None,
            help=f"iterations for the {stage} stage (default: --iters, else {DEFAULT_ITERS[stage]})",
        )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--only", choices=(*STAGES, "eval"), default=None,
                   help="run only this stage ('eval': only sample and measure quality)")
    p.add_argument("--resume", action="store_true",
                   help="continue training the ddpm stage from the pipeline saved in --out")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the UNets")
    p.add_argument("--ema-decay", type=float, default=0.998)
    p.add_argument("--draft-objective", choices=("distill", "data"), default="distill",
                   help="distill the target's epsilon (default) or train on the data objective")
    p.add_argument("--eval-samples", type=int, default=256,
                   help="samples drawn after training to measure quality (0: skip)")
    p.add_argument("--eval-steps", type=int, default=1000, help="DDPM steps for those samples")
    p.add_argument("--metric-repeats", type=int, default=4,
                   help="passes over the test split when measuring eps-MSE (default 4)")
    p.add_argument("--sample-grid", default=None, help="save a PNG grid of the evaluation samples here")
    return p


def main(argv: Optional[List[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    for stage in STAGES:
        attr = f"{stage}_iters"
        if getattr(args, attr) is None:
            setattr(args, attr, args.iters if args.iters is not None else DEFAULT_ITERS[stage])
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    summary_path = out / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if (args.only and summary_path.exists()) else {}
    command = "python -m specdiff.workbench.train_digits " + " ".join(argv)
    summary.update(
        commands=summary.get("commands", []) + [command],
        seed=args.seed,
        threads=args.threads,
        torch=torch.__version__,
        diffusers=_diffusers_version(),
    )
    generator = torch.Generator()
    stages = list(STAGES) if args.only is None else [] if args.only == "eval" else [args.only]
    for stage in stages:
        if stage == "ddpm":
            summary[stage] = train_ddpm(args, out, generator, summary.get("ddpm"))
        else:
            summary[stage] = {"classifier": train_classifier, "draft": train_draft}[stage](args, out, generator)
        _write_json(summary_path, summary)
    run_eval = args.only in (None, "eval") or (args.only == "ddpm" and args.eval_samples > 0)
    if run_eval and args.eval_samples > 0:
        for needed in (DDPM_DIR, CLASSIFIER_DIR):
            if not (out / needed).exists():
                raise FileNotFoundError(f"evaluation needs {out / needed}")
        summary["eval"] = evaluate_samples(args, out, generator)
    _write_json(summary_path, summary)
    write_model_card(out, summary)
    _print_summary(summary)
    return summary


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _print_summary(summary: dict) -> None:
    for stage in (*STAGES, "eval"):
        if stage in summary:
            shown = {k: v for k, v in summary[stage].items() if k != "files"}
            print(f"{stage}: {json.dumps(shown)}")


if __name__ == "__main__":
    main()
