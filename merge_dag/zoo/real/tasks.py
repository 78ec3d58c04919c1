"""The real zoo's tasks: deterministic generators of natural-language (question, answer) pairs.

Every task is rule-based, so every answer is checkable and the data is unlimited; each question
names its task in plain English. Rows are drawn from ``random.Random`` seeded with a string
(hashed with SHA-512 by Python: the same on every machine), and the splits are disjoint by
question: test first, then validation (never a test question), then training and calibration
(never a test or validation question).

Prompts go through the base model's chat template (ChatML) with a system prompt asking for the
bare answer, the same in training and evaluation: :func:`chat_prompt` writes the template's
text itself, so the data files do not need the model; the build checks it against the
tokenizer's own ``apply_chat_template``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

SYSTEM_PROMPT = "You answer with the bare answer only: no explanation, no punctuation around it, no full sentence."
DATA_SEED = 2024
SPLITS = ("test", "validation")
SPLIT_ROWS = {"test": 100, "validation": 50}
CALIBRATION_ROWS = 32

WORDS = (
    "apple river stone garden window silver planet orange forest candle mountain pencil yellow ocean "
    "bridge castle dragon marble rocket summer winter violet harbor island jungle kettle lemon meadow "
    "needle oyster pepper quartz rabbit saddle tiger umbrella valley walnut yogurt zebra anchor button "
    "copper desert engine falcon ginger hammer iron jacket kitten ladder mirror nickel olive parrot "
    "quiet ribbon shadow thunder velvet wagon bottle cactus dolphin feather glacier helmet insect "
    "lantern magnet noodle pillow puzzle rocket sparrow tunnel vessel wizard basket cherry drum eagle "
    "fountain guitar honey igloo jewel koala lobster mango nest orbit panda quilt robin salmon tulip"
).split()
WORDS = tuple(dict.fromkeys(WORDS))  # unique, first-seen order

_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
_DAYS_IN = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]


def number_words(n: int) -> str:
    """0 <= n < 1000 in English words: 347 -> 'three hundred forty-seven' (no 'and')."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_words: {n} out of range 0..999")
    if n < 20:
        return _ONES[n]
    if n < 100:
        t, u = divmod(n, 10)
        return _TENS[t] + ("" if u == 0 else "-" + _ONES[u])
    h, rest = divmod(n, 100)
    return f"{_ONES[h]} hundred" + ("" if rest == 0 else " " + number_words(rest))


def _acronym(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    phrase = " ".join(words)
    return (
        f"Write the first letter of each word in capitals, joined together: {phrase}",
        "".join(w[0].upper() for w in words),
    )


def _number(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(101, 999)
    return f"Write the number {n} in English words.", number_words(n)


def _date(rng: random.Random) -> tuple[str, str]:
    y, m = rng.randint(1950, 2049), rng.randint(1, 12)
    d = rng.randint(1, _DAYS_IN[m - 1])
    return f"Rewrite the date {y}-{m:02d}-{d:02d} as day, month name and year.", f"{d} {MONTHS[m - 1]} {y}"


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


@dataclass(frozen=True)
class RealTask:
    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str]]
    max_answer_tokens: int


TASKS: dict[str, RealTask] = {
    t.name: t
    for t in [
        RealTask(
            "acronym", "first letters of 3-5 words, capitalised and joined: apple river stone -> ARS", _acronym, 8
        ),
        RealTask("numwords", "a number 101-999 in English words: 347 -> three hundred forty-seven", _number, 16),
        RealTask("isodate", "an ISO date in words: 1987-03-04 -> 4 March 1987", _date, 10),
        RealTask("revwords", "reverse the order of 3-5 words: apple river stone -> stone river apple", _reverse, 20),
    ]
}
REAL_TASKS: tuple[str, ...] = ("acronym", "numwords", "isodate")


def get_task(name: str) -> RealTask:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown real-zoo task {name!r}; known: {', '.join(TASKS)}") from None


def chat_prompt(question: str, system: str = SYSTEM_PROMPT) -> str:
    """The ChatML text SmolLM2's chat template renders for [system, user] with a generation prompt."""
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


END = "<|im_end|>"


def _rng(seed: int, task: str, purpose: str) -> random.Random:
    return random.Random(f"real:{seed}:{task}:{purpose}")


def _draw(task: str, purpose: str, n: int, seed: int, exclude: set[str]) -> list[tuple[str, str]]:
    t = get_task(task)
    rng = _rng(seed, task, purpose)
    seen: set[str] = set()
    out = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"task {task!r}: cannot draw {n} distinct {purpose} questions")
        q, a = t.make(rng)
        if q not in seen and q not in exclude:
            seen.add(q)
            out.append((q, a))
    return out


def split_rows(task: str, seed: int = DATA_SEED) -> dict[str, list[dict[str, str]]]:
    """{'test': [...], 'validation': [...]}: rows {"question", "answer", "prompt"} (prompt = chat text)."""
    out: dict[str, list[dict[str, str]]] = {}
    used: set[str] = set()
    for split in SPLITS:
        rows = _draw(task, split, SPLIT_ROWS[split], seed, used)
        used |= {q for q, _ in rows}
        out[split] = [{"question": q, "answer": a, "prompt": chat_prompt(q)} for q, a in rows]
    return out


def held_out(task: str, seed: int = DATA_SEED) -> set[str]:
    return {r["question"] for rows in split_rows(task, seed).values() for r in rows}


def calibration_rows(task: str, n: int = CALIBRATION_ROWS, seed: int = DATA_SEED) -> list[dict[str, str]]:
    """``n`` rows {"text"}: the chat prompt, the answer and the end-of-turn token; never a held-out question."""
    return [{"text": chat_prompt(q) + a + END} for q, a in _draw(task, "calibration", n, seed, held_out(task, seed))]


def training_stream(task: str, seed: int, data_seed: int = DATA_SEED) -> Iterator[tuple[str, str]]:
    """Endless (question, answer) training pairs, none a test or validation question."""
    t = get_task(task)
    exclude = held_out(task, data_seed)
    rng = _rng(seed, task, "train")
    while True:
        q, a = t.make(rng)
        if q not in exclude:
            yield q, a


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def data_files(tasks: tuple[str, ...] = REAL_TASKS, seed: int = DATA_SEED) -> dict[str, str]:
    """Relative path (under data/real/) -> text: eval/<task>.<split>.jsonl and calibration/<task>.jsonl."""
    out = {}
    for t in tasks:
        for split, rows in split_rows(t, seed).items():
            out[f"eval/{t}.{split}.jsonl"] = _jsonl(rows)
        out[f"calibration/{t}.jsonl"] = _jsonl(calibration_rows(t, seed=seed))
    return out


def write_data_files(data_dir: Path, tasks: tuple[str, ...] = REAL_TASKS, seed: int = DATA_SEED) -> list[Path]:
    from ..skills import write_if_changed

    return [write_if_changed(Path(data_dir) / rel, text) for rel, text in data_files(tasks, seed).items()]
