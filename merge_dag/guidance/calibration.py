"""Calibration sets: a jsonl file of rows turned into padded token batches.

A row is a JSON object in one of three shapes (other keys are ignored):
    {"text": "..."}                                   plain text; it has no answer
    {"prompt": "...", "answer": "..."}                 the text is prompt + answer (verbatim, no separator);
                                                       the answer is the characters from len(prompt) on
    {"messages": [{"role": ..., "content": ...}, ...]} a chat, rendered with the tokenizer's chat template;
                                                       when the last message is the assistant's, the answer
                                                       is what the template writes after the rendering of
                                                       the earlier messages with the generation prompt
With `chat_template=True` a prompt/answer row is rendered as the chat [user: prompt, assistant: answer].
Blank lines are skipped; errors name the file and the 1-based line number.

Token selection (`tokens`): "all" (the default) selects every real (non-padding) token; "answer"
selects only the tokens whose characters overlap the answer (read from the tokenizer's offset
mapping, so the text is tokenized once, as a whole; tokens the tokenizer adds itself, such as BOS,
have an empty character span and are never answer tokens). With "answer" every row must have an
answer with at least one token left after truncation to `max_length`. The selection is the
batch's `select` mask: activation statistics and Grams are accumulated over the selected positions,
the Sens-Merging loss over the selected targets and the alignment KL over the positions that predict
a selected token.

No doubled BOS: a rendered text that already starts with the tokenizer's BOS token (a chat template
that writes it, or a text that carries it) is tokenized without special tokens; any other text with
the tokenizer's special tokens as before.

Batches keep the file's order (no sorting by length), so the same file and settings always give the
same batches. Padding follows the tokenizer's padding side; a tokenizer without a pad token pads
with its eos token (the attention mask, not the pad id, tells padding apart).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .errors import CalibrationError

DEFAULT_MAX_LENGTH = 512
TOKENS = ("all", "answer")
SHAPES = '"text", "prompt" + "answer", or "messages"'


@dataclass(frozen=True)
class Row:
    """One calibration row as read from the file (exactly one of the three shapes is set)."""

    where: str  # "<file>:<line>" for error messages
    text: Optional[str] = None
    prompt: Optional[str] = None
    answer: Optional[str] = None
    messages: Optional[tuple[dict, ...]] = None

    @property
    def has_answer(self) -> bool:
        if self.messages is not None:
            return self.messages[-1]["role"] == "assistant"
        return self.answer is not None


def _parse_row(row, where: str) -> Row:
    if not isinstance(row, dict):
        raise CalibrationError(f"{where}: expected a JSON object with {SHAPES}, got {type(row).__name__}")
    shapes = [k for k in ("text", "prompt", "messages") if k in row]
    if "answer" in row and "prompt" not in row:
        shapes.append("answer")
    if not shapes:
        raise CalibrationError(f"{where}: row has no {SHAPES} field (keys: {sorted(row)})")
    if len(shapes) > 1:
        raise CalibrationError(f"{where}: row gives {' and '.join(repr(s) for s in shapes)}; give one of {SHAPES}")
    kind = shapes[0]
    if kind == "answer":
        raise CalibrationError(f'{where}: row has an "answer" but no "prompt"')
    if kind == "text":
        text = row["text"]
        if not isinstance(text, str):
            raise CalibrationError(f'{where}: "text" must be a string, got {type(text).__name__}')
        if not text.strip():
            raise CalibrationError(f'{where}: "text" is empty')
        return Row(where, text=text)
    if kind == "prompt":
        if "answer" not in row:
            raise CalibrationError(f'{where}: row has a "prompt" but no "answer"')
        for k in ("prompt", "answer"):
            if not isinstance(row[k], str):
                raise CalibrationError(f'{where}: "{k}" must be a string, got {type(row[k]).__name__}')
        if not row["answer"].strip():
            raise CalibrationError(f'{where}: "answer" is empty')
        return Row(where, prompt=row["prompt"], answer=row["answer"])
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise CalibrationError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise CalibrationError(f'{where}: messages[{i}] must be an object with string "role" and "content"')
    return Row(where, messages=tuple({"role": m["role"], "content": m["content"]} for m in msgs))


def load_rows(path: str | os.PathLike, max_rows: Optional[int] = None) -> list[Row]:
    """Every row of a jsonl calibration file, in file order (the first `max_rows` if given)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{path}: cannot read calibration file: {e}") from e
    rows: list[Row] = []
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}:{no}: invalid JSON ({e.msg})") from None
        rows.append(_parse_row(obj, f"{path}:{no}"))
        if max_rows is not None and len(rows) >= max_rows:
            break
    if not rows:
        raise CalibrationError(f"{path}: no calibration rows")
    return rows


def load_texts(path: str | os.PathLike, max_rows: Optional[int] = None) -> list[str]:
    """The text of every row that needs no tokenizer to render ("text", or prompt + answer)."""
    out = []
    for r in load_rows(path, max_rows):
        if r.messages is not None:
            raise CalibrationError(f"{r.where}: a messages row is rendered by a tokenizer's chat template")
        out.append(r.text if r.text is not None else r.prompt + r.answer)
    return out


def load_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer saved in a model folder (offline only)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CalibrationError(f"{model_dir}: cannot load a tokenizer: {e}") from e
    return tok


def _chat(tokenizer, messages: list[dict], where: str, **kw) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise CalibrationError(f"{where}: a chat row needs a tokenizer with a chat template; this one has none")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    except Exception as e:  # noqa: BLE001 - jinja and template errors, named with the row
        raise CalibrationError(f"{where}: the chat template fails on this row: {type(e).__name__}: {e}") from None


def render(row: Row, tokenizer=None, chat_template: bool = False) -> tuple[str, Optional[int]]:
    """(text, character offset where the answer starts, or None for a row without an answer)."""
    if row.text is not None:
        return row.text, None
    if row.messages is None and not chat_template:
        return row.prompt + row.answer, len(row.prompt)
    msgs = (
        list(row.messages)
        if row.messages is not None
        else [{"role": "user", "content": row.prompt}, {"role": "assistant", "content": row.answer}]
    )
    full = _chat(tokenizer, msgs, row.where)
    if msgs[-1]["role"] != "assistant":
        return full, None
    prefix = _chat(tokenizer, msgs[:-1], row.where, add_generation_prompt=True) if len(msgs) > 1 else ""
    if not full.startswith(prefix):
        raise CalibrationError(
            f"{row.where}: the chat template does not render the earlier messages (with the generation "
            "prompt) as a prefix of the whole chat, so the answer cannot be located"
        )
    return full, len(prefix)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64, 1 = real token, 0 = padding
    answer_mask: Optional[torch.Tensor] = None  # (B, T) int64, 1 = answer token (tokens="answer" only)

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def select(self) -> torch.Tensor:
        """(B, T) bool: the positions statistics and losses cover (answer tokens, else every real token)."""
        return (self.attention_mask if self.answer_mask is None else self.answer_mask).bool()

    @property
    def selected_tokens(self) -> int:
        return int(self.select.sum())

    def to(self, device: str | torch.device) -> "Batch":
        am = None if self.answer_mask is None else self.answer_mask.to(device)
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), am)

    def labels(self) -> torch.Tensor:
        """Language-model labels: the input ids, -100 (ignored by the loss) where not selected."""
        return self.input_ids.masked_fill(~self.select, -100)


def _encode(tokenizer, text: str, answer_start: Optional[int], max_length: int, add_special_tokens: bool, where: str):
    """(ids, answer flags or None) of one rendered text."""
    bos = getattr(tokenizer, "bos_token", None)
    add = add_special_tokens and not (bos and text.startswith(bos))
    kw = {"truncation": True, "max_length": max_length, "add_special_tokens": add}
    if answer_start is None:
        return list(tokenizer(text, **kw)["input_ids"]), None
    try:
        enc = tokenizer(text, return_offsets_mapping=True, **kw)
    except NotImplementedError:
        raise CalibrationError(
            f"{where}: answer-only tokens need a fast tokenizer (offset mapping); this one is slow"
        ) from None
    # a token the tokenizer adds itself (BOS, EOS) has an empty span and is never an answer token
    flags = [int(end > answer_start and end > start) for start, end in enc["offset_mapping"]]
    return list(enc["input_ids"]), flags


def make_batches(
    texts: Sequence[Union[str, Row]],
    tokenizer,
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    add_special_tokens: bool = True,
    device: str | torch.device = "cpu",
    tokens: str = "all",
    chat_template: bool = False,
) -> list[Batch]:
    """Tokenize `texts` (strings or rows) into batches of at most `batch_size` rows, each padded to
    its longest row (truncated to `max_length` tokens). tokens="answer" adds each batch's answer mask."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokens not in TOKENS:
        raise CalibrationError(f"calibration tokens must be one of {', '.join(TOKENS)}, got {tokens!r}")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CalibrationError("tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    rows = [t if isinstance(t, Row) else Row(f"calibration text #{i}", text=t) for i, t in enumerate(texts)]
    encoded = []
    for r in rows:
        if tokens == "answer" and not r.has_answer:
            raise CalibrationError(
                f"{r.where}: answer-only calibration (tokens: answer) needs an answer in every row "
                '("prompt" + "answer", or "messages" ending with the assistant\'s)'
            )
        text, start = render(r, tokenizer, chat_template)
        ids, flags = _encode(
            tokenizer, text, start if tokens == "answer" else None, max_length, add_special_tokens, r.where
        )
        if not ids:
            raise CalibrationError(f"{r.where}: tokenizes to no tokens")
        if flags is not None and not any(flags):
            raise CalibrationError(f"{r.where}: no answer token within max_length {max_length}")
        encoded.append((ids, flags))
    left = getattr(tokenizer, "padding_side", "right") == "left"
    pad = tokenizer.pad_token_id
    batches = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids_t = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        ans = torch.zeros((len(chunk), width), dtype=torch.long) if tokens == "answer" else None
        for r, (ids, flags) in enumerate(chunk):
            sl = slice(width - len(ids), width) if left else slice(0, len(ids))
            ids_t[r, sl] = torch.tensor(ids, dtype=torch.long)
            mask[r, sl] = 1
            if ans is not None:
                ans[r, sl] = torch.tensor(flags, dtype=torch.long)
        batches.append(Batch(ids_t, mask, ans).to(device))
    return batches


def load_batches(
    path: str | os.PathLike,
    tokenizer,
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_rows: Optional[int] = None,
    add_special_tokens: bool = True,
    device: str | torch.device = "cpu",
    tokens: str = "all",
    chat_template: bool = False,
) -> list[Batch]:
    """load_rows + make_batches."""
    return make_batches(
        load_rows(path, max_rows), tokenizer, batch_size, max_length, add_special_tokens, device, tokens, chat_template
    )
