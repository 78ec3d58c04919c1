"""Greedy generation for the real zoo's own checks (the build's quality table): batched, left padded,
stopped at the end-of-turn token. lm-eval runs the same prompts through the task YAMLs
(merge_dag.zoo.real.lmeval); this in-process loop is only faster for the build's table."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def normalize(text: str) -> str:
    """What exact match compares: the generation up to the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else end_id
    model.eval()
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        enc = [tok(p, add_special_tokens=False)["input_ids"] for p in chunk]
        width = max(len(e) for e in enc)
        ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in enc])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
        dev = next(model.parameters()).device
        gen = model.generate(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end_id,
            pad_token_id=pad_id,
        )
        for row in gen[:, width:].tolist():
            if end_id in row:
                row = row[: row.index(end_id)]
            out.append(tok.decode(row, skip_special_tokens=True))
    return out


@dataclass
class Score:
    correct: int
    n: int

    @property
    def value(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def stderr(self) -> float:
        """Binomial standard error sqrt(p(1-p)/n)."""
        p = self.value
        return math.sqrt(p * (1 - p) / self.n) if self.n else 0.0

    def __str__(self) -> str:
        return f"{self.value:.3f} ± {self.stderr:.3f}"


def exact_match(model, tok, rows: list[dict], max_new_tokens: int, batch_size: int = 16) -> tuple[Score, list[str]]:
    gens = generate(model, tok, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    correct = sum(normalize(g) == r["answer"] for g, r in zip(gens, rows))
    return Score(correct, len(rows)), gens
