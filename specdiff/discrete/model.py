"""A small masked-diffusion transformer (MDLM-style: bidirectional, time-free) as a diffusers
model, saved and loaded with ``save_pretrained`` / ``from_pretrained``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import Tensor, nn


@dataclass
class MaskedDiffusionTransformerOutput(BaseOutput):
    """``logits``: ``(*input_ids.shape, vocab_size)``, the clean-token logits per position
    (the MASK token is never predicted)."""

    logits: Tensor


class MaskedDiffusionTransformer(ModelMixin, ConfigMixin):
    """Bidirectional transformer from tokens (MASK id = ``vocab_size``) to clean-token logits.

    Time-free like MDLM's default (``time_conditioning=False``): the mask pattern already
    tells how noisy the input is, and a time-free model lets samplers skip the network on
    steps where nothing changed. ``sample_size`` is the side of the square token grid
    (``sample_size ** 2`` positions); inputs may be ``(B, L)`` or ``(B, H, W)``.
    """

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 8,
        sample_size: int = 8,
        hidden_size: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        length = sample_size * sample_size
        self.token_embedding = nn.Embedding(vocab_size + 1, hidden_size)
        self.position_embedding = nn.Parameter(torch.randn(length, hidden_size) * 0.02)
        layer = nn.TransformerEncoderLayer(
            hidden_size,
            num_heads,
            int(hidden_size * mlp_ratio),
            dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_size)
        self.head = nn.Linear(hidden_size, vocab_size)
        # GPT-style small embeddings: with PyTorch's N(0, 1) token embedding the positions
        # (std 0.02) are drowned out and the model stalls at per-position marginals.
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    @property
    def mask_token_id(self) -> int:
        return self.config.vocab_size

    def forward(self, input_ids: Tensor, timestep: Tensor | float | None = None, return_dict: bool = True):
        """``timestep`` is accepted for the diffusers calling convention and ignored."""
        shape = input_ids.shape
        tokens = input_ids.reshape(shape[0], -1).long()
        if tokens.shape[1] != self.position_embedding.shape[0]:
            raise ValueError(f"expected {self.position_embedding.shape[0]} positions per sample, got {tokens.shape[1]}")
        h = self.token_embedding(tokens) + self.position_embedding
        logits = self.head(self.norm(self.encoder(h))).reshape(*shape, -1)
        if not return_dict:
            return (logits,)
        return MaskedDiffusionTransformerOutput(logits=logits)
