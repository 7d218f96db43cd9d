"""Any masked-diffusion language model from ``transformers`` as a masked-diffusion chain.

The chain is :class:`~specdiff.discrete.MaskedDiffusionChain` (the MDLM / MD4 ancestral
kernel of :class:`~specdiff.discrete.MaskedDiffusionScheduler`: linear or cosine α,
temperature, the last step unmasking every remaining position); this module only adapts
the network:

* the chain's MASK is the scheduler's id ``vocab_size``; the model sees the tokenizer's
  ``mask_token_id`` there;
* the model's logits over its vocabulary are the clean-token logits, with the special
  tokens (MASK, PAD, ...) removed so they are never generated;
* a time-conditioned model gets the time per row as a keyword (``timesteps=`` by default,
  as MDLM's custom-code checkpoints), either ``t`` or MDLM's ``σ = -log α_t``; a time-free
  one (MDLM's default) lets the samplers reuse predictions while a row is unchanged;
* a prompt is a prefix of positions that start unmasked: the kernel copies them, so they
  stay fixed and condition every call. Left padding (``pad_token_id``) is hidden from the
  model by an attention mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..discrete.chain import MaskedDiffusionChain
from ..discrete.scheduler import MaskedDiffusionScheduler, alpha

TIME_INPUTS = ("t", "sigma")


class MaskedLMDenoiser:
    """``tokens -> clean-token logits`` for a transformers masked LM (``model(input_ids, ...)``
    returning ``.logits`` of shape ``(B, L, vocab)``), on the chain's token ids."""

    def __init__(
        self,
        model: Callable,
        mask_token_id: int,
        chain_mask_id: int,
        *,
        suppress_token_ids: Sequence[int] = (),
        pad_token_id: int | None = None,
        time_argument: str = "timesteps",
    ):
        self.model, self.mask_token_id, self.chain_mask_id = model, mask_token_id, chain_mask_id
        self.suppress = sorted({int(i) for i in suppress_token_ids} | {mask_token_id})
        self.pad_token_id, self.time_argument = pad_token_id, time_argument

    def __call__(self, x: Tensor, time: Tensor | None = None) -> Tensor:
        ids = torch.where(x == self.chain_mask_id, torch.full_like(x, self.mask_token_id), x)
        kwargs = {}
        if self.pad_token_id is not None and (x == self.pad_token_id).any():
            kwargs["attention_mask"] = (x != self.pad_token_id).long()
        if time is not None:
            kwargs[self.time_argument] = time
        out = self.model(ids, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
        if logits.shape[-1] <= max(self.suppress):
            raise ValueError(
                f"the model returns {logits.shape[-1]} logits; special token id {max(self.suppress)} is out of range"
            )
        # Specials (MASK above all: SUBS "zero masking probability") are never clean tokens.
        return logits.index_fill(-1, torch.tensor(self.suppress, device=logits.device), float("-inf"))


def check_positions(prompt_tokens: int, length: int | None, positions: int | None, cli: bool = False) -> None:
    """A prompt of ``prompt_tokens`` tokens and ``length`` generated ones must fit the network's ``positions``
    (``max_position_embeddings``; ``None``: not known, not checked): a rotary-position network accepts more
    silently, a learned-position one fails inside. Otherwise a ValueError naming the fix (``cli``: in flags)."""
    prompt, size = ("--prompt", "--length ") if cli else ("prompt", "length=")
    if positions is None:
        return
    if prompt_tokens >= positions:
        raise ValueError(f"the prompt is {prompt_tokens} tokens and the text model has {positions} positions; "
                         f"shorten {prompt}")
    if length is not None and prompt_tokens + length > positions:
        raise ValueError(f"{prompt} ({prompt_tokens} tokens) and {size}{length} need {prompt_tokens + length} "
                         f"positions, and the text model has {positions}; pass {size}{positions - prompt_tokens} or "
                         "less (or a shorter prompt)")


class MaskedLMChain(MaskedDiffusionChain):
    """A transformers masked diffusion LM (an ``AutoModelForMaskedLM``, a custom-code MDLM,
    ...) plus its mask token as a :class:`~specdiff.CategoricalChain` on token ids.

    Args:
        model: ``model(input_ids[, attention_mask][, timesteps]) -> logits (B, L, V)``.
        scheduler: a :class:`MaskedDiffusionScheduler` with ``vocab_size = V`` (its MASK id,
            ``V``, stands for ``mask_token_id`` inside the chain).
        mask_token_id: the model's MASK id (the tokenizer's ``mask_token_id``).
        suppress_token_ids: ids never generated (the tokenizer's special tokens).
        pad_token_id: left padding of prompts of different lengths (kept fixed, masked out
            of attention).
        time_input: ``None`` (time-free, MDLM's default), ``"t"`` (continuous time in [0, 1])
            or ``"sigma"`` (``-log α_t``, MDLM's ``timesteps``, clamped at ``α = 1e-3``).
        time_argument: the keyword the model takes the time by.
    """

    def __init__(
        self,
        model: Callable,
        scheduler: MaskedDiffusionScheduler,
        *,
        mask_token_id: int,
        suppress_token_ids: Sequence[int] = (),
        pad_token_id: int | None = None,
        time_input: str | None = None,
        time_argument: str = "timesteps",
    ):
        if time_input is not None and time_input not in TIME_INPUTS:
            raise ValueError(f"time_input must be None (time-free) or one of {TIME_INPUTS}, got {time_input!r}")
        vocab = scheduler.config.vocab_size
        if not 0 <= mask_token_id < vocab:
            raise ValueError(
                f"mask_token_id {mask_token_id} is not a token of the scheduler's vocabulary (size {vocab})"
            )
        self.denoiser = MaskedLMDenoiser(
            model,
            mask_token_id,
            scheduler.mask_token_id,
            suppress_token_ids=suppress_token_ids,
            pad_token_id=pad_token_id,
            time_argument=time_argument,
        )
        self.time_input = time_input
        super().__init__(self._call, scheduler, time_conditioned=time_input is not None)

    @classmethod
    def from_tokenizer(
        cls, model, tokenizer, scheduler: MaskedDiffusionScheduler | None = None, **kwargs
    ) -> MaskedLMChain:
        """Mask, padding and special tokens from ``tokenizer``; a default scheduler (linear α,
        64 steps) over the model's vocabulary when none is given."""
        if tokenizer.mask_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no mask token; pass a tokenizer with mask_token set")
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or len(tokenizer)
        scheduler = scheduler or MaskedDiffusionScheduler(vocab_size=vocab)
        kwargs.setdefault("suppress_token_ids", tokenizer.all_special_ids)
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        return cls(model, scheduler, mask_token_id=tokenizer.mask_token_id, **kwargs)

    def _call(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        if t is not None and self.time_input == "sigma":
            t = -alpha(t, self.scheduler.config.alpha_schedule).clamp(min=1e-3).log()
        if t is not None:  # in the model's dtype (fp16/bf16 models take half-precision times)
            t = t.to(x.device, getattr(self.denoiser.model, "dtype", torch.float32))
        return self.denoiser(x, t)

    def initial_state(self, prompt_ids: Sequence[Sequence[int]], length: int, device=None) -> Tensor:
        """``[B, P + length]``: each prompt (token ids), left-padded to the longest, then
        ``length`` MASKs. The prompt positions start unmasked, so every step copies them."""
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        prompt_ids = [list(p) for p in prompt_ids]
        width = max(len(p) for p in prompt_ids)
        if any(len(p) < width for p in prompt_ids) and self.denoiser.pad_token_id is None:
            raise ValueError(
                "prompts of different token lengths need padding: pass pad_token_id (or equal-length prompts)"
            )
        pad = self.denoiser.pad_token_id
        rows = [[pad] * (width - len(p)) + p + [self.mask_token_id] * length for p in prompt_ids]
        return torch.tensor(rows, dtype=torch.long, device=device)
