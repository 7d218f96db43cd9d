"""A character-level tokenizer built offline with ``tokenizers`` (no download, no training):
one id per character of a given alphabet, plus ``[PAD]``, ``[UNK]`` and ``[MASK]``."""

from __future__ import annotations

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[MASK]")


def char_tokenizer(alphabet: str):
    """A ``transformers.PreTrainedTokenizerFast`` with ids 0-2 the special tokens and one id
    per distinct character of ``alphabet`` (in order of first appearance); other characters
    become ``[UNK]``. ``decode`` concatenates characters (no spaces added or cleaned up)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet))
    if not chars:
        raise ValueError("alphabet is empty; pass the characters the tokenizer should know")
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")  # one piece per character
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
        clean_up_tokenization_spaces=False,
    )
