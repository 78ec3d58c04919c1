"""A character-level tokenizer made locally with the `tokenizers` library (nothing is downloaded).

One token per character (digits, lowercase letters, a few symbols) plus four special tokens.
It is saved as a transformers tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json``)
that ``AutoTokenizer.from_pretrained`` loads offline, with ``pad`` and ``eos`` tokens set.
"""

from __future__ import annotations

import string
from pathlib import Path

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIALS = (PAD, EOS, BOS, UNK)
CHARS = string.digits + string.ascii_lowercase + ":=+-><,. \n"
VOCAB_SIZE = 64  # padded so embedding shapes are round; ids past the chars are unused
MAX_LENGTH = 64


def vocab() -> dict[str, int]:
    v = {t: i for i, t in enumerate(SPECIALS)}
    for c in CHARS:
        v[c] = len(v)
    if len(v) > VOCAB_SIZE:  # pragma: no cover - guards edits to CHARS
        raise ValueError(f"tokenizer: {len(v)} symbols exceed VOCAB_SIZE={VOCAB_SIZE}")
    return v


def build_tokenizer():
    """A ``transformers`` fast tokenizer over :data:`CHARS` (ids are fixed, so it is deterministic)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocab(), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        model_max_length=MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(folder: Path):
    tok = build_tokenizer()
    tok.save_pretrained(str(folder))
    return tok


def encode(tok, text: str) -> list[int]:
    """Ids of ``text`` without special tokens (as lm-eval encodes contexts for causal models)."""
    return tok.encode(text, add_special_tokens=False)
