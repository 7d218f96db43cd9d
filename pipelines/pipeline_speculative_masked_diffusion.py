"""Unconditional masked-diffusion pipeline with exact speculative sampling.

    pipe = SpeculativeMaskedDiffusionPipeline.from_pretrained("assets/models/digits-mdm")
    out = pipe(batch_size=16, num_inference_steps=128, window=8, generator=torch.Generator().manual_seed(0))
    out.images      # 16 PIL grey images (8x8)
    out.sequences   # the raw tokens, LongTensor [16, 64]
    out.stats       # SpeculativeStats: target calls, acceptance, ...

``window=None`` runs the plain ancestral loop through ``scheduler.step`` (the reference
diffusers loop; ``cache=True`` skips the network for rows that did not change, as MDLM's
``ddpm_cache``). Any ``window`` draws from exactly the same law, and ``window=1`` gives the
same tokens as ``window=None`` from the same generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from torch import nn

from specdiff.discrete.chain import MaskedDiffusionChain
from specdiff.discrete.model import MaskedDiffusionTransformer
from specdiff.discrete.scheduler import MaskedDiffusionScheduler
from specdiff.drafters import Drafter, ModelDrafter, as_drafter
from specdiff.pipelines.speculative_utils import (
    check_cache_option,
    check_max_rows_option,
    progress_for,
    rule_options,
)
from specdiff.sampler import speculative_sample_discrete
from specdiff.stats import SpeculativeStats


@dataclass
class MaskedDiffusionPipelineOutput(BaseOutput):
    """``images``: PIL list, ``np`` (B, H, W, 1) or ``pt`` (B, 1, H, W) grey images in [0, 1]
    (``output_type="latent"``: the tokens); ``sequences``: the raw tokens ``[B, L]``;
    ``stats``: what the run cost."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    sequences: torch.Tensor
    stats: SpeculativeStats


class SpeculativeMaskedDiffusionPipeline(DiffusionPipeline):
    """Masked-diffusion sampling (MDLM / MD4 ancestral steps) of token images, accelerated by
    exact speculative sampling.

    Components: ``transformer`` (clean-token logits from tokens, MASK id = vocab size) and
    ``scheduler`` (:class:`MaskedDiffusionScheduler`).
    """

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: MaskedDiffusionTransformer, scheduler: MaskedDiffusionScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    def _logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        return out.logits if hasattr(out, "logits") else out[0]

    def _drafter(self, drafter) -> Drafter:
        if isinstance(drafter, nn.Module):  # an independent (smaller) token model
            return ModelDrafter(lambda x, step: self._logits(drafter, x))
        return as_drafter(drafter)

    def decode(self, tokens: torch.Tensor, output_type: str = "pil"):
        """Tokens ``[B, L]`` -> grey images (token v -> v / (vocab - 1)); MASK shows as 0."""
        if output_type == "latent":
            return tokens
        levels = self.scheduler.config.vocab_size
        side = self.transformer.config.sample_size
        t = tokens.reshape(tokens.shape[0], 1, side, side).float()
        images = torch.where(t >= levels, torch.zeros_like(t), t / max(levels - 1, 1)).cpu()
        if output_type == "pt":
            return images
        images = images.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return images
        if output_type == "pil":
            return self.numpy_to_pil(images)
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 64,
        window: int | str | None = "auto",
        drafter: Drafter | nn.Module | Callable | str | None = None,
        cache: bool = False,
        output_type: str = "pil",
        return_dict: bool = True,
        callback: Callable[[dict], None] | None = None,
        max_rows: int | str | None = "auto",
        verify: str = "step",
    ) -> MaskedDiffusionPipelineOutput | tuple:
        """Generate ``batch_size`` token images.

        Args:
            generator: a ``torch.Generator`` or a list with one per sample (a sample then does
                not depend on its batch).
            num_inference_steps: steps of the ancestral grid from t = 1 to t = 0.
            window: drafted steps per speculative round, ``"auto"`` (the default: chosen before every
                round, see the README's Performance section) or ``None`` = the plain loop.
            drafter: ``None``/``"frozen"`` (reuse the last verified prediction, no network),
                a smaller token model (``nn.Module``), a :class:`~specdiff.Drafter` or a
                callable ``predict(tokens, step)``.
            cache: with ``window=None``, skip the network for rows whose tokens did not change (the
                speculative sampler does this by itself).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (tokens).
            callback: called with ``{"round", "x", "step", "stats"}`` after every round (or step).
            max_rows: the most states per network call of the speculative sampler (a verify call
                holds up to batch x window); larger calls run as exact micro-batches: the same tokens,
                less memory. ``"auto"``: no cap on CPU, fitted to free memory on CUDA.
            verify: ``"step"`` (each drafted step tested in order) or ``"block"`` (block verification,
                the window cut jointly; see docs/block-verification.md): acceptance only, never the law.
        """
        check_cache_option(cache, window)
        check_max_rows_option(max_rows, window)
        rules = rule_options(verify, plain=window is None)
        device = self._execution_device
        length = self.transformer.config.sample_size**2
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        chain = MaskedDiffusionChain(lambda x: self._logits(self.transformer, x), self.scheduler)
        x = chain.prior(batch_size, (length,), device=device)
        if window is None:
            tokens, stats = self._plain_loop(chain, x, generator, cache, callback)
        else:
            out = speculative_sample_discrete(
                chain,
                x,
                window=window,
                drafter=self._drafter(drafter),
                generator=generator,
                progress=progress_for(self, num_inference_steps),
                callback=callback,
                max_rows=max_rows,
                **rules,
            )
            tokens, stats = out.sample, out.stats
        images = self.decode(tokens, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, tokens, stats)
        return MaskedDiffusionPipelineOutput(images=images, sequences=tokens, stats=stats)

    def _plain_loop(self, chain, x, generator, cache, callback):
        """The reference diffusers loop: ``model`` then ``scheduler.step`` at every timestep."""
        if cache and chain.time_conditioned:
            raise ValueError("cache=True needs a time-free model")
        batch = x.shape[0]
        stats = SpeculativeStats(num_steps=len(self.scheduler.timesteps), batch_size=batch, window=1)
        logits, changed = None, torch.ones(batch, dtype=torch.bool, device=x.device)
        bar = progress_for(self, desc="cached plain sampling" if cache else "plain sampling")
        for i, t in enumerate(_iterate(bar, self.scheduler.timesteps)):
            ask = changed if cache else torch.ones_like(changed)
            if ask.any():
                new = self._logits(self.transformer, x[ask])
                logits = new if logits is None or ask.all() else logits.index_put((ask,), new.to(logits))
                stats.target_calls += 1
                stats.target_rows += int(ask.sum())
                for b in ask.nonzero().squeeze(1).tolist():
                    stats.per_sample_target_calls[b] += 1
            x_next = self.scheduler.step(logits, t, x, generator=generator).prev_sample
            changed = (x_next != x).flatten(1).any(1)
            x = x_next
            if callback is not None:
                callback({"round": i + 1, "x": x.clone(), "step": torch.full((batch,), i + 1), "stats": stats})
        return x, stats


def _iterate(open_bar, items):
    """Iterate ``items`` under a labelled step bar."""
    with open_bar(len(items)) as bar:
        for item in items:
            yield item
            bar.update(1)
