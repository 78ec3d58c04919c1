"""Vocabularies: merging models whose tokenizers or embedding sizes differ.

An embedding (input embedding or lm_head) row belongs to a token, not to an id: an expert that added
tokens (a chat template's `<|im_start|>`) or padded its vocabulary to a round size has rows the base
has not, at ids that may mean something else there. The plan maps every input's rows onto the
output vocabulary by token string before the method runs (`VocabMap`):

- the map is made when the inputs' vocabulary tensors differ in rows, or their tokenizers give some
  id to different tokens (tokenizer files that differ in bytes are loaded and compared), or the
  recipe says `union`; otherwise rows merge by id and no tokenizer is loaded;
- the output vocabulary is the tokenizer of `tokenizer_source` (`base`, default; a model), or, for
  `union`, the base's tokenizer (the first model's without a base) with every token of the other
  models it lacks appended in input order (a token added to a model stays special if it was);
- for output token j, input i contributes its own row where its tokenizer has the token (at an id
  below its row count: rows past its tokenizer are padding and are never read); an input that lacks
  the token contributes the default row: the base's row where the base has the token, else the row
  of the one model that has it, else the mean of the rows of the models that have it (mergekit's
  documented rule); a token no input has is an error naming it;
- `tokenizer: {pad_to_multiple_of: N}` rounds the output's rows up to a multiple of N (mergekit's
  option): the added rows are held by no input, so every input contributes a zero row there and
  they come out zero; they lie past the tokenizer's last id, where no token reads them;
- the method then merges the mapped rows like any tensor; the output's config `vocab_size`, its
  embedding rows and its tokenizer (written with the output) all have the output vocabulary's size,
  and tied embeddings stay tied (only the tensors the inputs hold are written).

Tensors indexed by token are recognised by name (`VOCAB_SUFFIXES`) and by their first dimension
equalling that input's embedding rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import MergeInputError

VOCAB_SUFFIXES = (
    "embed_tokens.weight",
    "lm_head.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "embed_out.weight",
)
INPUT_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


@dataclass
class VocabMap:
    """How each input's vocabulary rows map onto the output vocabulary.

    index[k][j]: the row of input k holding output token j, or -1 where input k lacks it."""

    size: int
    index: dict[int, torch.Tensor]
    base: Optional[int]  # input index of the base (its rows are the default where it has the token)
    tensors: set[str]  # the tensor names indexed by token
    tokenizer: Any = None  # the union tokenizer to write with the output (None: copy tokenizer_source's files)
    added: list[str] = field(default_factory=list)  # tokens the union appended to the base's vocabulary
    padding: int = 0  # zero rows added at the end by tokenizer.pad_to_multiple_of

    def remap(self, tensors: list[torch.Tensor], models: list[int]) -> list[torch.Tensor]:
        """`tensors[k]` (float32, rows in input models[k]'s vocabulary) as rows of the output
        vocabulary: own rows where that input has the token, the default row elsewhere. Holds the
        inputs, one default matrix and the outputs: (2 x inputs + 1) copies of the vocabulary tensor."""
        dev = tensors[0].device
        rest = tuple(tensors[0].shape[1:])
        idx = {m: self.index[m].to(dev) for m in dict.fromkeys(models)}
        first = {m: models.index(m) for m in idx}
        fill = torch.zeros((self.size, *rest), dtype=torch.float32, device=dev)  # sum, then mean
        count = torch.zeros(self.size, dtype=torch.float32, device=dev)
        for m, k in first.items():
            have = idx[m] >= 0
            fill[have] += tensors[k][idx[m][have]]
            count[have] += 1
        fill /= count.clamp(min=1).view(-1, *([1] * len(rest)))
        if self.base is not None and self.base in idx:
            have = idx[self.base] >= 0
            fill[have] = tensors[first[self.base]][idx[self.base][have]]
        out = []
        for m, t in zip(models, tensors):
            o = fill.clone()
            have = idx[m] >= 0
            o[have] = t[idx[m][have]]
            out.append(o)
        return out


def vocab_rows(ck) -> Optional[int]:
    """The number of rows of an input's input embedding (None when no tensor name says which)."""
    for n, info in ck.tensors.items():
        if n.endswith(INPUT_EMBED_SUFFIXES) and len(info.shape) == 2:
            return info.shape[0]
    return None


def vocab_tensors(inputs: list, rows: list[Optional[int]]) -> set[str]:
    """Names indexed by token: a VOCAB_SUFFIXES name whose first dimension is each holder's rows."""
    out: set[str] = set()
    for k, ck in enumerate(inputs):
        for n, info in ck.tensors.items():
            if n.endswith(VOCAB_SUFFIXES) and len(info.shape) >= 1 and rows[k] is not None:
                if info.shape[0] == rows[k]:
                    out.add(n)
    return out


def load_tokenizer(folder: Path, name: str):
    """The transformers tokenizer of a model folder; MergeInputError naming the model if none loads."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; one line names the model
        raise MergeInputError(
            f"model {name!r}: its tokenizer (in {folder}) does not load ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); merging vocabularies that differ needs every "
            "input's tokenizer"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _token_ids(tok) -> dict[str, int]:
    return dict(tok.get_vocab())


def plan_vocab(
    where: str,
    inputs: list,
    base_idx: Optional[int],
    source: Optional[int],
    union: bool,
    pad_to: Optional[int] = None,
) -> Optional[VocabMap]:
    """The VocabMap of a merge, or None when every input has the same vocabulary rows, the recipe
    does not ask for `union` and the rows are a multiple of `pad_to` already (then rows merge by id,
    as always).

    source: input index whose tokenizer is the output's (tokenizer_source), ignored for union.
    pad_to: `tokenizer.pad_to_multiple_of`: the output's rows rounded up to a multiple of it; the added
    rows are held by no input and come out zero (past the tokenizer's last id, never looked up)."""
    rows = [vocab_rows(ck) for ck in inputs]
    padded = pad_to is not None and any(r is not None and r % pad_to for r in rows)
    if not union and len(set(rows)) <= 1 and not padded and not _tokenizers_differ(inputs):
        return None
    if any(r is None for r in rows):
        k = rows.index(None)
        raise MergeInputError(
            f"model {inputs[k].name!r}: no input embedding tensor (a name ending in "
            f"{', '.join(INPUT_EMBED_SUFFIXES)}) to map its vocabulary by"
        )
    if not union and len(set(rows)) <= 1 and not _tokenizers_differ(inputs):
        # one vocabulary, only the padding asked for: rows by id, then zero rows up to the multiple
        size = rows[0] + (-rows[0]) % pad_to
        ids = torch.cat([torch.arange(rows[0]), torch.full((size - rows[0],), -1)])
        index = {k: ids.clone() for k in range(len(inputs))}
        return VocabMap(size, index, base_idx, vocab_tensors(inputs, rows), padding=size - rows[0])
    toks = [load_tokenizer(ck.folder, ck.name) for ck in inputs]
    vocabs = [_token_ids(t) for t in toks]
    if not union and len(set(rows)) <= 1 and not padded:
        # same rows, different tokenizer files: map only if some id means another token somewhere
        within = [{s: i for s, i in v.items() if i < r} for v, r in zip(vocabs, rows)]
        if all(w == within[0] for w in within[1:]):
            return None
    lead = base_idx if base_idx is not None else 0
    out_tok = None
    added: list[str] = []
    if union:
        first = lead
        out_vocab = dict(vocabs[first])
        ids = sorted(out_vocab.values())
        if ids != list(range(len(ids))):
            raise MergeInputError(
                f"model {inputs[first].name!r}: tokenizer ids are not 0..{len(ids) - 1} without gaps; "
                "tokenizer_source: union builds on them"
            )
        out_tok = toks[first]
        for k in range(len(inputs)):
            if k == first:
                continue
            for s, _ in sorted(vocabs[k].items(), key=lambda kv: kv[1]):
                if s in out_vocab or vocabs[k][s] >= rows[k]:
                    continue
                out_vocab[s] = len(out_vocab)
                added.append(s)
        if added:
            from tokenizers import AddedToken

            for s in added:
                sp = any(s in _specials(toks[k]) for k in range(len(inputs)))
                out_tok.add_tokens([AddedToken(s, special=sp, normalized=not sp)], special_tokens=sp)
            got = _token_ids(out_tok)
            wrong = [s for s in added if got.get(s) != out_vocab[s]]
            if wrong:
                raise MergeInputError(
                    f"{where}: tokenizer_source: union: token {wrong[0]!r} got id {got.get(wrong[0])} in the "
                    f"union tokenizer, expected {out_vocab[wrong[0]]}"
                )
        size = len(out_vocab)
    else:
        # the source's rows are the output's (its padding rows stay); ids past them have no row
        src = lead if source is None else source
        size = rows[src]
        out_vocab = {s: i for s, i in vocabs[src].items() if i < size}
    held_rows = size  # rows some input holds; padding rows past them are zero in every input
    if pad_to is not None and size % pad_to:
        size += pad_to - size % pad_to
    by_id: dict[int, str] = {i: s for s, i in out_vocab.items()}
    index: dict[int, torch.Tensor] = {}
    for k in range(len(inputs)):
        m = torch.full((size,), -1, dtype=torch.long)
        for j in range(held_rows):
            s = by_id.get(j)
            if s is None:
                if not union and k == (lead if source is None else source):
                    m[j] = j  # a padding row of the tokenizer source: its own row
                continue
            i = vocabs[k].get(s)
            if i is not None and i < rows[k]:
                m[j] = i
        index[k] = m
    held = torch.stack([m[:held_rows] >= 0 for m in index.values()]).any(0)
    if not bool(held.all()):
        j = int((~held).nonzero()[0])
        raise MergeInputError(f"{where}: output token {by_id.get(j)!r} (id {j}) has a row in no input")
    tok = out_tok if union else None
    return VocabMap(size, index, base_idx, vocab_tensors(inputs, rows), tok, added, size - held_rows)


def tokenizer_length(folder: Path) -> Optional[int]:
    """The number of ids of a model folder's tokenizer.json (added tokens included), or None without
    one: embedding rows at and past it are padding (`tokenizer.pad_to_multiple_of`, or a vocabulary
    the model was trained with rounded up)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)


TOKEN_FILES = ("tokenizer.json", "added_tokens.json", "vocab.json", "tokenizer.model")


def _tokenizers_differ(inputs: list) -> bool:
    """Whether the inputs' vocabulary files differ in bytes (only inputs that all hold tokenizer.json
    are compared; without it there is nothing to map by, and rows merge by id as before)."""
    import hashlib

    digests = set()
    for ck in inputs:
        folder = Path(ck.folder)
        if not (folder / "tokenizer.json").is_file():
            return False
        h = hashlib.sha256()
        for name in TOKEN_FILES:
            p = folder / name
            h.update(name.encode() + b"\0" + (p.read_bytes() if p.is_file() else b"") + b"\0")
        digests.add(h.hexdigest())
    return len(digests) > 1


def _specials(tok) -> set[str]:
    out = {str(t) for t in getattr(tok, "all_special_tokens", [])}
    decoder = getattr(tok, "added_tokens_decoder", {}) or {}
    out |= {str(t.content) for t in decoder.values() if getattr(t, "special", False)}
    return out
