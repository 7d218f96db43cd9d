"""Masked diffusion language models (MDLM / MD4) from ``transformers``, with exact speculative
sampling. ``transformers`` is an optional extra (``pip install specdiff[text]``), imported
only by what needs it.

chain      MaskedLMChain, MaskedLMDenoiser   a transformers masked LM + mask token as a chain
blocks     sample_blocks                     semi-autoregressive blocks, speculation inside each
tokenizer  char_tokenizer                    an offline character-level tokenizer
"""

from .blocks import sample_blocks
from .chain import MaskedLMChain, MaskedLMDenoiser
from .tokenizer import char_tokenizer

__all__ = ["MaskedLMChain", "MaskedLMDenoiser", "char_tokenizer", "sample_blocks"]
