"""Train the bundled masked-diffusion model on scikit-learn's 8x8 digits (offline, CPU).

    python -m specdiff.workbench.train_mdm --out assets/models/digits-mdm

Each 8x8 digit (grey values 0..16) is quantised to ``--levels`` grey levels and read as a
64-token sequence (row-major). The reported metric is the continuous-time masked-diffusion
ELBO (MDLM eq. 10 / MD4 eq. 5), ``E_t [ w(t) · Σ_{masked i} -log μ_θ(x_t)^i_{x_0^i} ] / 64``
with ``w(t) = -α'_t / (1 - α_t)``: an upper bound on the negative log-likelihood in nats per
token, on the held-out split. Training minimises either that ELBO (``--objective elbo``) or,
by default, its low-variance variant: the mean cross-entropy over the masked positions
(``--objective masked-mean``); ``t`` is stratified over the batch in both.

Writes a diffusers pipeline folder (``model_index.json``, ``transformer/``, ``scheduler/``)
loadable with ``SpeculativeMaskedDiffusionPipeline.from_pretrained(out)``, and a JSON log.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from ..discrete.model import MaskedDiffusionTransformer
from ..discrete.scheduler import MaskedDiffusionScheduler


def load_digit_tokens(split: str = "train", levels: int = 8) -> torch.Tensor:
    """The digits of ``split`` (the fixed split of :mod:`specdiff.workbench.digits`) as ``(N, 64)``
    tokens in ``0..levels-1``: grey value ``g`` in 0..16 becomes ``floor(g · levels / 17)``."""
    from .digits import load_digits_images

    images, _ = load_digits_images(split=split, size=8)
    grey = ((images + 1) * 8).round().long().clamp(0, 16)  # back to the original 0..16
    return (grey * levels // 17).reshape(len(grey), 64)


def tokens_to_images(tokens: torch.Tensor, levels: int) -> torch.Tensor:
    """``(B, 64)`` or ``(B, 8, 8)`` tokens -> ``(B, 1, 8, 8)`` grey images in [0, 1]; any
    leftover MASK (id ``levels``) shows as 0."""
    b = tokens.shape[0]
    side = math.isqrt(tokens[0].numel())
    t = tokens.reshape(b, 1, side, side).float()
    return torch.where(t >= levels, torch.zeros_like(t), t / max(levels - 1, 1))


def elbo_loss(model, scheduler, x0: torch.Tensor, generator: torch.Generator, t_min: float = 1e-3) -> torch.Tensor:
    """Per-sample ELBO terms (nats per token) with stratified times over the batch."""
    b = x0.shape[0]
    offset = torch.rand((), generator=generator, dtype=torch.float64)
    t = ((offset + torch.arange(b, dtype=torch.float64) / b) % 1.0) * (1 - t_min) + t_min
    xt = scheduler.add_noise(x0, t, generator=generator)
    logits = model(xt).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x0.reshape(-1), reduction="none")
    masked = (xt == scheduler.mask_token_id).reshape(b, -1)
    per_token = (ce.reshape(b, -1) * masked).sum(1) / x0[0].numel()
    return scheduler.elbo_weight(t).to(per_token) * per_token


def masked_mean_loss(
    model, scheduler, x0: torch.Tensor, generator: torch.Generator, t_min: float = 1e-3
) -> torch.Tensor:
    """Per-sample mean cross-entropy over the masked positions (MaskGIT-style). Under the
    linear schedule ``E[#masked] = t · L``, so this is the ELBO term with its ``1/t`` weight
    replaced by the realised mask count: the same minimiser, much lower variance."""
    b = x0.shape[0]
    offset = torch.rand((), generator=generator, dtype=torch.float64)
    t = ((offset + torch.arange(b, dtype=torch.float64) / b) % 1.0) * (1 - t_min) + t_min
    xt = scheduler.add_noise(x0, t, generator=generator)
    logits = model(xt).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x0.reshape(-1), reduction="none")
    masked = (xt == scheduler.mask_token_id).reshape(b, -1)
    return (ce.reshape(b, -1) * masked).sum(1) / masked.sum(1).clamp(min=1)


@torch.no_grad()
def evaluate(model, scheduler, data: torch.Tensor, repeats: int = 8, seed: int = 1234) -> float:
    """Held-out ELBO (nats per token), averaged over ``repeats`` stratified passes."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total = sum(float(elbo_loss(model, scheduler, data, g).mean()) for _ in range(repeats))
    model.train(was_training)
    return total / repeats


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (a diffusers pipeline layout)")
    p.add_argument("--levels", type=int, default=8, help="grey levels = real tokens (MASK is one more)")
    p.add_argument("--iterations", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument(
        "--objective",
        choices=("masked-mean", "elbo"),
        default="masked-mean",
        help="training loss (the held-out ELBO is reported either way)",
    )
    p.add_argument("--alpha-schedule", choices=("linear", "cosine"), default="linear")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--max-minutes", type=float, default=None, help="stop early after this wall-clock budget")
    p.add_argument("--log-every", type=int, default=100)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, test = load_digit_tokens("train", args.levels), load_digit_tokens("test", args.levels)
    model = MaskedDiffusionTransformer(
        vocab_size=args.levels,
        sample_size=8,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        dropout=args.dropout,
    )
    scheduler = MaskedDiffusionScheduler(vocab_size=args.levels, alpha_schedule=args.alpha_schedule)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    def lr_at(i: int) -> float:  # linear warm-up, then cosine decay to 10%
        if i < args.warmup:
            return (i + 1) / args.warmup
        progress = (i - args.warmup) / max(args.iterations - args.warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(args.seed)
    started, log, running = time.perf_counter(), [], None
    iteration = 0
    for iteration in range(1, args.iterations + 1):
        batch = train[torch.randint(0, len(train), (args.batch_size,), generator=g)]
        objective = elbo_loss if args.objective == "elbo" else masked_mean_loss
        loss = objective(model, scheduler, batch, g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        elapsed = time.perf_counter() - started
        if iteration % args.log_every == 0 or iteration == args.iterations:
            log.append({"iteration": iteration, "train_loss_ema": running, "seconds": round(elapsed, 1)})
            print(
                f"iter {iteration:5d}  train {args.objective} loss (EMA) {running:.4f} nats/token  {elapsed:7.1f}s",
                flush=True,
            )
        if args.max_minutes is not None and elapsed > 60 * args.max_minutes:
            print(f"stopping after {iteration} iterations: --max-minutes {args.max_minutes} reached", flush=True)
            break
    wall = time.perf_counter() - started
    test_elbo = evaluate(model, scheduler, test)
    result = {
        "command": "python -m specdiff.workbench.train_mdm " + " ".join(argv if argv is not None else sys.argv[1:]),
        "iterations": iteration,
        "seed": args.seed,
        "threads": args.threads,
        "wall_clock_seconds": round(wall, 1),
        "objective": args.objective,
        "final_train_loss_ema_nats_per_token": running,
        "test_elbo_nats_per_token": test_elbo,
        "test_elbo_bits_per_token": test_elbo / math.log(2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_size": len(train),
        "test_size": len(test),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "log": log,
    }
    print(
        f"test ELBO {test_elbo:.4f} nats/token ({result['test_elbo_bits_per_token']:.4f} bits), {wall:.0f}s", flush=True
    )
    save(model, scheduler, args.out)
    (args.out / "training_log.json").write_text(json.dumps(result, indent=2))
    return result


def save(model: MaskedDiffusionTransformer, scheduler: MaskedDiffusionScheduler, out: Path) -> None:
    """A diffusers pipeline folder: ``model_index.json`` + ``transformer/`` + ``scheduler/``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        from specdiff.pipelines.pipeline_speculative_masked_diffusion import SpeculativeMaskedDiffusionPipeline
    except ImportError:  # the pipelines package is not importable: write the same layout by hand
        import diffusers

        model.save_pretrained(out / "transformer")
        scheduler.save_pretrained(out / "scheduler")
        index = {
            "_class_name": "SpeculativeMaskedDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["specdiff.discrete.scheduler", "MaskedDiffusionScheduler"],
            "transformer": ["specdiff.discrete.model", "MaskedDiffusionTransformer"],
        }
        (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        return
    SpeculativeMaskedDiffusionPipeline(transformer=model, scheduler=scheduler).save_pretrained(out)


if __name__ == "__main__":
    main()
