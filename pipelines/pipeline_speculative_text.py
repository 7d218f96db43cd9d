"""Text generation with a masked diffusion language model, accelerated by exact speculative
sampling.

    pipe = SpeculativeTextDiffusionPipeline.from_pretrained("assets/models/stdlib-text")
    out = pipe(prompt="Return the", length=128, num_inference_steps=128, window=16,
               generator=torch.Generator().manual_seed(0))
    out.texts       # ["Return the ..."]: prompt + generated text
    out.sequences   # the token ids [B, P + length] (prompt first)
    out.stats       # SpeculativeStats: target calls, acceptance, ...

``window=None`` is the plain ancestral sampler (``cache=True``: MDLM's ``ddpm_cache``, no
network call while a row is unchanged); any ``window`` samples exactly the same law, and
``window=1`` gives the same tokens from the same generator. ``block_size`` generates
semi-autoregressively, blocks of that many tokens left to right, the steps split evenly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from torch import nn

from specdiff.discrete.scheduler import MaskedDiffusionScheduler
from specdiff.drafters import Drafter, ModelDrafter, as_drafter
from specdiff.pipelines.speculative_utils import check_cache_option, check_max_rows_option, rule_options
from specdiff.sampler import sample_baseline_discrete, speculative_sample_discrete
from specdiff.stats import SpeculativeStats
from specdiff.text.blocks import sample_blocks
from specdiff.text.chain import MaskedLMChain, check_positions


@dataclass
class TextDiffusionPipelineOutput(BaseOutput):
    """``texts``: prompt + generated text per sample; ``sequences``: token ids ``[B, P + length]``
    (prompts left-padded); ``stats``: what the run cost."""

    texts: list[str]
    sequences: torch.Tensor
    stats: SpeculativeStats


class SpeculativeTextDiffusionPipeline(DiffusionPipeline):
    """Masked diffusion LM sampling (MDLM / MD4 ancestral steps) with exact speculative sampling.

    Components: ``transformer`` (a transformers masked LM: ``input_ids -> logits``),
    ``tokenizer`` (with a mask token) and ``scheduler`` (:class:`MaskedDiffusionScheduler`
    over the model's vocabulary).
    """

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: nn.Module, tokenizer, scheduler: MaskedDiffusionScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, tokenizer=tokenizer, scheduler=scheduler)

    def chain(self, model: nn.Module | None = None) -> MaskedLMChain:
        """The categorical chain of ``model`` (default: the pipeline's transformer)."""
        return MaskedLMChain.from_tokenizer(model or self.transformer, self.tokenizer, self.scheduler)

    def _drafter(self, drafter) -> Drafter:
        if isinstance(drafter, nn.Module):  # a smaller masked LM on the same tokenizer
            return ModelDrafter(self.chain(drafter).predict)
        return as_drafter(drafter)

    def _prompt_ids(self, prompt, num_samples: int) -> list[list[int]]:
        prompts = [""] if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        ids = self.tokenizer(prompts, add_special_tokens=False).input_ids
        unknown = self.tokenizer.unk_token_id
        if unknown is not None and any(unknown in p for p in ids):
            bad = sorted({c for text in prompts for c in text
                          if unknown in self.tokenizer(c, add_special_tokens=False).input_ids})
            raise ValueError(f"the prompt has characters the tokenizer does not know: {bad}; they would vanish from "
                             "the text. Remove or replace them")
        return [p for p in ids for _ in range(num_samples)]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_samples: int = 1,
        length: int = 128,
        num_inference_steps: int = 128,
        window: int | str | None = "auto",
        drafter: Drafter | nn.Module | Callable | str | None = None,
        cache: bool = False,
        block_size: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        max_rows: int | str | None = "auto",
        verify: str = "step",
    ) -> TextDiffusionPipelineOutput | tuple:
        """Generate ``num_samples`` texts of ``length`` tokens per prompt.

        Args:
            prompt: text(s) the generation continues (kept fixed); ``None``: unconditional.
            length: tokens generated after the prompt; prompt and length together must fit the network's
                ``max_position_embeddings`` (a ValueError names the largest length that does).
            num_inference_steps: ancestral steps (in total, split over the blocks).
            window: drafted steps per speculative round, ``"auto"`` (the default: chosen before every
                round, see the README's Performance section) or ``None`` = the plain sampler.
            drafter: ``None``/``"frozen"`` (reuse the last verified prediction), a smaller
                masked LM (``nn.Module``, same tokenizer), a Drafter or ``predict(x, step)``.
            cache: with ``window=None``, skip the network for rows that did not change.
            block_size: generate in blocks of this many tokens, left to right.
            generator: a ``torch.Generator`` or a list with one per sample.
            max_rows: the most states per network call of the speculative sampler (a verify call
                holds up to samples x window); larger calls run as exact micro-batches: the same
                tokens, less memory. ``"auto"``: no cap on CPU, fitted to free memory on CUDA.
            verify: ``"step"`` (each drafted step tested in order) or ``"block"`` (block verification,
                the window cut jointly; see docs/block-verification.md): acceptance only, never the law.
        """
        device = self._execution_device
        check_cache_option(cache, window)
        check_max_rows_option(max_rows, window)
        rules = rule_options(verify, plain=window is None)
        prompt_ids = self._prompt_ids(prompt, num_samples)
        positions = getattr(getattr(self.transformer, "config", None), "max_position_embeddings", None)
        check_positions(max(map(len, prompt_ids)), length, positions)
        blocks = 1 if block_size is None else -(-length // block_size)
        if num_inference_steps % blocks:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} does not split over {blocks} blocks of {block_size} "
                f"tokens; pass a multiple of {blocks}"
            )
        self.scheduler.set_timesteps(num_inference_steps // blocks, device=device)
        chain = self.chain()
        x = chain.initial_state(prompt_ids, length, device=device)
        drafter = self._drafter(drafter)
        if block_size is not None:
            out = sample_blocks(chain, x, block_size=block_size, window=window, drafter=drafter, cached=cache,
                                generator=generator, progress=self.progress_bar, max_rows=max_rows, **rules)
        elif window is None:
            out = sample_baseline_discrete(chain, x, generator, cached=cache, progress=self.progress_bar,
                                           return_stats=True)
        else:
            out = speculative_sample_discrete(chain, x, window=window, drafter=drafter, generator=generator,
                                              progress=self.progress_bar, max_rows=max_rows, **rules)
        texts = self.tokenizer.batch_decode(out.sample.cpu(), skip_special_tokens=True)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (texts, out.sample, out.stats)
        return TextDiffusionPipelineOutput(texts=texts, sequences=out.sample, stats=out.stats)
