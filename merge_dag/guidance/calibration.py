"""Calibration sets: a jsonl file of rows {"text": ...} turned into padded token batches.

Blank lines are skipped; any other line must be a JSON object with a non-empty string "text"
(other keys are ignored). Errors name the file and the 1-based line number.

Batches keep the file's order (no sorting by length), so the same file and settings always give the
same batches. Padding follows the tokenizer's padding side; a tokenizer without a pad token pads
with its eos token (the attention mask, not the pad id, tells padding apart).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .errors import CalibrationError

DEFAULT_MAX_LENGTH = 512


def load_texts(path: str | os.PathLike, max_rows: Optional[int] = None) -> list[str]:
    """The "text" of every row of a jsonl file, in file order (the first `max_rows` if given)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{path}: cannot read calibration file: {e}") from e
    texts: list[str] = []
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}:{no}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise CalibrationError(f'{path}:{no}: expected a JSON object with a "text" field, got {type(row).__name__}')
        if "text" not in row:
            raise CalibrationError(f'{path}:{no}: row has no "text" field (keys: {sorted(row)})')
        text = row["text"]
        if not isinstance(text, str):
            raise CalibrationError(f'{path}:{no}: "text" must be a string, got {type(text).__name__}')
        if not text.strip():
            raise CalibrationError(f'{path}:{no}: "text" is empty')
        texts.append(text)
        if max_rows is not None and len(texts) >= max_rows:
            break
    if not texts:
        raise CalibrationError(f"{path}: no calibration rows")
    return texts


def load_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer saved in a model folder (offline only)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CalibrationError(f"{model_dir}: cannot load a tokenizer: {e}") from e
    return tok


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64, 1 = real token, 0 = padding

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: str | torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device))

    def labels(self) -> torch.Tensor:
        """Language-model labels: the input ids with padding set to -100 (ignored by the loss)."""
        return self.input_ids.masked_fill(self.attention_mask == 0, -100)


def make_batches(
    texts: list[str],
    tokenizer,
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    add_special_tokens: bool = True,
    device: str | torch.device = "cpu",
) -> list[Batch]:
    """Tokenize `texts` into batches of at most `batch_size` rows, each padded to its longest row
    (truncated to `max_length` tokens)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CalibrationError("tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
            add_special_tokens=add_special_tokens,
        )
        mask = enc["attention_mask"].long()
        empty = (mask.sum(1) == 0).nonzero().flatten().tolist()
        if empty:
            raise CalibrationError(f"calibration text #{i + empty[0]} tokenizes to no tokens")
        batches.append(Batch(enc["input_ids"].long().to(device), mask.to(device)))
    return batches


def load_batches(
    path: str | os.PathLike,
    tokenizer,
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_rows: Optional[int] = None,
    add_special_tokens: bool = True,
    device: str | torch.device = "cpu",
) -> list[Batch]:
    """load_texts + make_batches."""
    return make_batches(load_texts(path, max_rows), tokenizer, batch_size, max_length, add_special_tokens, device)
