"""Train the bundled text model: a character-level masked diffusion LM (MDLM, time-free,
linear α) on the docstrings of the Python standard library (offline, CPU, minutes).

    python -m specdiff.workbench.train_text --out assets/models/stdlib-text
    python -m specdiff.workbench.train_text --out assets/models/stdlib-text --only drafter

Corpus: every module, class and function docstring (``ast.get_docstring``) of the ``.py``
files of this interpreter's standard library (tests, ``idlelib`` and ``site-packages``
excluded), whitespace collapsed, one docstring per line. A file goes to the held-out split
when a hash of its path says so (5%). Training windows are random ``--length``-character
slices of the training text.

Target: ``ModernBertForMaskedLM`` trained with the masked cross-entropy (low-variance variant of the
MDLM ELBO); drafter: a one-layer ``ModernBertForMaskedLM`` distilled from the target on the same
noised windows (KL to the target's clean-token law at masked positions). Reported: the
held-out ELBO in nats per character (MDLM eq. 10), against the held-out cross-entropy of
the training unigram law.
"""

from __future__ import annotations

import argparse
import ast
import collections
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ..discrete.scheduler import MaskedDiffusionScheduler
from ..text.chain import MaskedLMChain
from ..text.tokenizer import char_tokenizer
from .train_mdm import elbo_loss, masked_mean_loss

EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "idle_test", "__pycache__"}


def stdlib_docstrings(root: Path | None = None) -> dict[str, list[str]]:
    """``{"train": [...], "test": [...]}`` docstrings of the standard library at ``root``."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = {"train": [], "test": []}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        split = "test" if int(hashlib.sha1(str(rel).encode()).hexdigest(), 16) % 20 == 0 else "train"
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                text = " ".join(doc.split()) if doc else ""
                if len(text) >= 32:
                    out[split].append(text)
    return out


def corpus(min_count: int = 50):
    """``(tokenizer, train ids, test ids, info)``: the alphabet is every character seen at
    least ``min_count`` times in the training text (newline included); rarer ones are removed."""
    docs = stdlib_docstrings()
    train_text, test_text = "\n".join(docs["train"]) + "\n", "\n".join(docs["test"]) + "\n"
    counts = collections.Counter(train_text)
    alphabet = "".join(sorted(c for c, n in counts.items() if n >= min_count))
    tokenizer = char_tokenizer(alphabet)
    # Rare characters are dropped, not mapped to [UNK]: the model never generates specials.
    keep = set(alphabet)
    train_text, test_text = ("".join(c for c in t if c in keep) for t in (train_text, test_text))

    def encode(text):
        return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)

    info = {
        "python": sys.version.split()[0],
        "stdlib": sysconfig.get_paths()["stdlib"],
        "docstrings": {k: len(v) for k, v in docs.items()},
        "characters": {"train": len(train_text), "test": len(test_text)},
        "alphabet_size": len(alphabet),
        "dropped_rare_characters": sum(n for c, n in counts.items() if c not in keep),
    }
    return tokenizer, encode(train_text), encode(test_text), info


def windows(ids: torch.Tensor, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - length, (n,), generator=generator)
    return ids[starts[:, None] + torch.arange(length)]


def unigram_cross_entropy(train: torch.Tensor, test: torch.Tensor, vocab: int) -> float:
    """Held-out nats per character under the (add-one smoothed) training unigram law."""
    counts = torch.bincount(train, minlength=vocab).double() + 1
    return float(-(counts / counts.sum()).log()[test].mean())


def as_diffusion_model(chain: MaskedLMChain):
    """``model(x_t).logits`` on the chain's ids, as train_mdm's losses call it."""
    return lambda x: SimpleNamespace(logits=chain.predict(x, torch.zeros(len(x), dtype=torch.long)))


@torch.no_grad()
def held_out_elbo(chain, scheduler, test: torch.Tensor, length: int, n: int = 512, repeats: int = 4) -> float:
    """Continuous-time ELBO (nats per character) on ``n`` fixed held-out windows."""
    g = torch.Generator().manual_seed(1234)
    data = windows(test, n, length, g)
    model = as_diffusion_model(chain)
    total = [float(elbo_loss(model, scheduler, data[i : i + 128], g).sum()) for _ in range(repeats)
             for i in range(0, n, 128)]
    return sum(total) / (repeats * n)


def build_model(vocab: int, length: int, hidden: int, layers: int, heads: int):
    """A ``ModernBertForMaskedLM`` (pre-LayerNorm, rotary positions, global attention in
    every layer): unlike post-LN BERT with learned absolute positions, it leaves the unigram
    plateau within a few hundred CPU iterations."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    config = ModernBertConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=length, global_attn_every_n_layers=1,
        pad_token_id=0, bos_token_id=0, eos_token_id=0, cls_token_id=0, sep_token_id=0,
    )
    return ModernBertForMaskedLM(config)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="pipeline folder (the drafter goes to OUT/drafter)")
    p.add_argument("--only", choices=("target", "drafter", "all"), default="all")
    p.add_argument("--length", type=int, default=128, help="characters per window (= model positions)")
    p.add_argument("--iterations", type=int, default=3000)
    p.add_argument("--drafter-iterations", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--drafter-hidden-size", type=int, default=64)
    p.add_argument("--drafter-layers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-minutes", type=float, default=None, help="stop a stage after this wall-clock budget")
    p.add_argument("--log-every", type=int, default=100)
    return p.parse_args(argv)


def train(model, loss_fn, train_ids, args, iterations: int, label: str) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    def lr_at(i: int) -> float:  # linear warm-up, then cosine decay to 10%
        if i < args.warmup:
            return (i + 1) / args.warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min((i - args.warmup) / max(iterations - args.warmup, 1), 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    started, log, running, it = time.perf_counter(), [], None, 0
    for it in range(1, iterations + 1):
        loss = loss_fn(windows(train_ids, args.batch_size, args.length, g), g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        elapsed = time.perf_counter() - started
        if it % args.log_every == 0 or it == iterations:
            log.append({"iteration": it, "train_loss_ema": running, "seconds": round(elapsed, 1)})
            print(f"{label} iter {it:5d}  loss (EMA) {running:.4f}  {elapsed:7.1f}s", flush=True)
        if args.max_minutes is not None and elapsed > 60 * args.max_minutes:
            print(f"{label}: stopping after {it} iterations (--max-minutes {args.max_minutes})", flush=True)
            break
    model.eval()
    return {"iterations": it, "wall_clock_seconds": round(time.perf_counter() - started, 1),
            "final_train_loss_ema": running, "log": log}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoModelForMaskedLM

    from specdiff.pipelines.pipeline_speculative_text import SpeculativeTextDiffusionPipeline

    tokenizer, train_ids, test_ids, info = corpus()
    vocab = len(tokenizer)
    scheduler = MaskedDiffusionScheduler(vocab_size=vocab, alpha_schedule="linear", num_inference_steps=128)
    command = "python -m specdiff.workbench.train_text " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"corpus": info, "unigram_test_nats_per_char": unigram_cross_entropy(train_ids, test_ids, vocab)}
    if args.only in ("target", "all"):
        model = build_model(vocab, args.length, args.hidden_size, args.num_layers, 4)
        chain = MaskedLMChain.from_tokenizer(model, tokenizer, scheduler)
        net = as_diffusion_model(chain)
        result = train(model, lambda x0, g: masked_mean_loss(net, scheduler, x0, g), train_ids, args,
                       args.iterations, "target")
        result.update(command=command, parameters=sum(p.numel() for p in model.parameters()),
                      test_elbo_nats_per_char=held_out_elbo(chain, scheduler, test_ids, args.length), **report)
        print(f"target: held-out ELBO {result['test_elbo_nats_per_char']:.4f} nats/char "
              f"(unigram {report['unigram_test_nats_per_char']:.4f})", flush=True)
        SpeculativeTextDiffusionPipeline(transformer=model, tokenizer=tokenizer, scheduler=scheduler).save_pretrained(
            args.out, safe_serialization=True
        )
        (args.out / "training_log.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.only in ("drafter", "all"):
        target = AutoModelForMaskedLM.from_pretrained(args.out / "transformer").eval()
        target_chain = MaskedLMChain.from_tokenizer(target, tokenizer, scheduler)
        draft = build_model(vocab, args.length, args.drafter_hidden_size, args.drafter_layers, 2)
        draft_chain = MaskedLMChain.from_tokenizer(draft, tokenizer, scheduler)

        def zero(x):
            return torch.zeros(len(x), dtype=torch.long)

        def distill(x0, g):  # KL(target || drafter) over masked positions, t ~ U(0, 1) stratified
            b = x0.shape[0]
            t = ((torch.rand((), generator=g, dtype=torch.float64) + torch.arange(b) / b) % 1.0) * 0.999 + 1e-3
            xt = scheduler.add_noise(x0, t, generator=g)
            with torch.no_grad():
                p = torch.softmax(target_chain.predict(xt, zero(xt)), -1)
            logq = torch.log_softmax(draft_chain.predict(xt, zero(xt)), -1)
            kl = (p * (p.clamp_min(1e-30).log() - logq.clamp_min(-1e4))).sum(-1)
            masked = xt == scheduler.mask_token_id
            return (kl * masked).sum(1) / masked.sum(1).clamp(min=1)

        result = train(draft, distill, train_ids, args, args.drafter_iterations, "drafter")
        result.update(command=command, parameters=sum(p.numel() for p in draft.parameters()),
                      test_elbo_nats_per_char=held_out_elbo(draft_chain, scheduler, test_ids, args.length), **report)
        print(f"drafter: held-out ELBO {result['test_elbo_nats_per_char']:.4f} nats/char", flush=True)
        draft.save_pretrained(args.out / "drafter", safe_serialization=True)
        (args.out / "drafter" / "training_log.json").write_text(json.dumps(result, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
