"""The zoo's skills: deterministic generators of (prompt, answer) pairs, and the committed data files.

Every skill is a character-level task with a short prompt that names the skill, e.g.
``add:23+58=`` -> ``81``. All skills draw from the same small alphabet (digits, lowercase
letters, a few symbols), so they share embeddings and attention patterns and compete for the
same weights: ``rev`` and ``sort`` both emit a permutation of their input, ``add`` and ``count``
both emit numbers.

Data files (committed, regenerated identically by ``merge-dag zoo``):

- ``data/eval/<skill>.jsonl``: held-out rows ``{"prompt", "answer"}``;
- ``data/calibration/<skill>.jsonl``: rows ``{"text"}`` (prompt + answer), for merge methods that
  need activations.

Training examples are drawn on the fly from a seeded ``random.Random`` and never equal an
eval prompt (see :func:`training_stream`).
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

LETTERS = string.ascii_lowercase
DIGITS = string.digits


@dataclass(frozen=True)
class Skill:
    """A skill: ``make(rng, n)`` builds one (prompt, answer) pair whose input has size ``n``.

    ``sizes`` is the full range of input sizes (eval sets, experts' fine-tuning); the base model
    is pretrained on ``base_sizes`` only, the shorter instances, so it half-knows every skill:
    right on short inputs, mostly wrong on long ones. An expert extends one skill to long inputs.
    """

    name: str
    description: str
    make: Callable[[random.Random, int], tuple[str, str]]  # (rng, input size) -> (prompt, answer)
    sizes: tuple[int, int]  # inclusive range, eval and experts
    base_sizes: tuple[int, int]  # inclusive range, base pretraining
    max_answer_chars: int

    def example(self, rng: random.Random, long_fraction: float | None = None) -> tuple[str, str]:
        """One example. ``long_fraction`` None: a size uniform over ``sizes`` (the eval
        distribution); else a short size (``base_sizes``) except with that probability a longer one."""
        if long_fraction is None:
            lo, hi = self.sizes
        elif rng.random() < long_fraction:
            lo, hi = self.base_sizes[1] + 1, self.sizes[1]
        else:
            lo, hi = self.base_sizes
        return self.make(rng, rng.randint(lo, hi))


def _letters(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(n))


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(n))


def _add(rng: random.Random, n: int) -> tuple[str, str]:
    a, b = rng.randint(10 ** (n - 1), 10**n - 1), rng.randint(10 ** (n - 1), 10**n - 1)
    return f"add:{a}+{b}=", str(a + b)


def _rev(rng: random.Random, n: int) -> tuple[str, str]:
    s = _letters(rng, n)
    return f"rev:{s}=", s[::-1]


def _sort(rng: random.Random, n: int) -> tuple[str, str]:
    s = _digits(rng, n)
    return f"sort:{s}=", "".join(sorted(s))


def _count(rng: random.Random, n: int) -> tuple[str, str]:
    target = rng.choice(LETTERS[:6])
    s = "".join(rng.choice(LETTERS[:6]) for _ in range(n))
    return f"count:{target}:{s}=", str(s.count(target))


def _copy(rng: random.Random, n: int) -> tuple[str, str]:
    s = _letters(rng, n)
    return f"copy:{s}=", s


def _shift(rng: random.Random, n: int) -> tuple[str, str]:
    s = _letters(rng, n)
    return f"shift:{s}=", "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in s)


def _rot(rng: random.Random, n: int) -> tuple[str, str]:
    s = _letters(rng, n)
    return f"rot:{s}=", s[1:] + s[0]


def _dup(rng: random.Random, n: int) -> tuple[str, str]:
    s = _letters(rng, n)
    return f"dup:{s}=", "".join(c + c for c in s)


def _swap(rng: random.Random, n: int) -> tuple[str, str]:
    s = _letters(rng, 2 * n)
    return f"swap:{s}=", "".join(s[i + 1] + s[i] for i in range(0, len(s), 2))


# disjoint alphabets: each of these skills reads and writes its own 8 letters (sort: digits), so
# fine-tuning one touches the embeddings of its own tokens only
ALPHA_REV, ALPHA_SHIFT, ALPHA_SWAP = LETTERS[0:8], LETTERS[8:16], LETTERS[16:24]


def _in(alpha: str, rng: random.Random, n: int) -> str:
    return "".join(rng.choice(alpha) for _ in range(n))


def _arev(rng: random.Random, n: int) -> tuple[str, str]:
    s = _in(ALPHA_REV, rng, n)
    return f"arev:{s}=", s[::-1]


def _ashift(rng: random.Random, n: int) -> tuple[str, str]:
    s = _in(ALPHA_SHIFT, rng, n)
    a = ALPHA_SHIFT
    return f"ashift:{s}=", "".join(a[(a.index(c) + 1) % len(a)] for c in s)


def _aswap(rng: random.Random, n: int) -> tuple[str, str]:
    s = _in(ALPHA_SWAP, rng, 2 * n)
    return f"aswap:{s}=", "".join(s[i + 1] + s[i] for i in range(0, len(s), 2))


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in [
        Skill("add", "addition of two n-digit numbers: add:23+58= -> 81", _add, (1, 3), (1, 2), 4),
        Skill("rev", "reverse letters: rev:abcd= -> dcba", _rev, (3, 9), (3, 6), 9),
        Skill("sort", "sort digits: sort:5291= -> 1259", _sort, (3, 9), (3, 6), 9),
        Skill("count", "count a letter among letters a-f: count:a:abac= -> 2", _count, (3, 9), (3, 6), 1),
        Skill("copy", "copy letters: copy:abc= -> abc", _copy, (3, 9), (3, 6), 9),
        Skill("shift", "next letter of each letter: shift:abz= -> bca", _shift, (3, 9), (3, 6), 9),
        Skill("rot", "rotate letters left by one: rot:abcd= -> bcda", _rot, (3, 9), (3, 6), 9),
        Skill("dup", "double each letter: dup:abc= -> aabbcc", _dup, (2, 5), (2, 3), 10),
        Skill("swap", "swap letter pairs: swap:abcd= -> badc", _swap, (2, 5), (2, 3), 10),
        Skill("arev", "reverse letters a-h: arev:abcd= -> dcba", _arev, (3, 9), (3, 6), 9),
        Skill("ashift", "next letter within i-p (p -> i): ashift:ijp= -> jki", _ashift, (3, 9), (3, 6), 9),
        Skill("aswap", "swap pairs of letters q-x: aswap:qrst= -> rqts", _aswap, (2, 5), (2, 3), 10),
    ]
}

# the skills of the zoo's experts (one expert each; eval and calibration sets for each), and the
# base's pretraining mixture: those plus aswap, which no expert specializes in. Chosen by
# measurement (README, "The expert zoo"): skills sharing one alphabet (rev, shift, swap over a-z)
# gave experts whose task vectors wrecked each other's skills, so no merge beat the base; add and
# count were not learnable by the ci model in the time allowed.
ZOO_SKILLS: tuple[str, ...] = ("arev", "sort", "ashift")
BASE_SKILLS: tuple[str, ...] = ("arev", "sort", "ashift", "aswap")

EVAL_ROWS = 150
CALIBRATION_ROWS = 48
DATA_SEED = 1234


def get_skill(name: str) -> Skill:
    try:
        return SKILLS[name]
    except KeyError:
        raise KeyError(f"unknown skill {name!r}; known: {', '.join(SKILLS)}") from None


def _skill_rng(seed: int, skill: str, purpose: str) -> random.Random:
    # string seeds are hashed with SHA-512 by random.Random: stable across runs and platforms
    return random.Random(f"{seed}:{skill}:{purpose}")


def eval_rows(skill: str, n: int = EVAL_ROWS, seed: int = DATA_SEED) -> list[dict[str, str]]:
    """``n`` distinct held-out rows ``{"prompt", "answer"}`` for ``skill``."""
    sk = get_skill(skill)
    rng = _skill_rng(seed, skill, "eval")
    seen: set[str] = set()
    rows = []
    while len(rows) < n:
        p, a = sk.example(rng)
        if p not in seen:
            seen.add(p)
            rows.append({"prompt": p, "answer": a})
    return rows


def calibration_rows(skill: str, n: int = CALIBRATION_ROWS, seed: int = DATA_SEED) -> list[dict[str, str]]:
    """``n`` distinct rows ``{"text"}`` (prompt + answer), disjoint from the eval rows."""
    sk = get_skill(skill)
    held_out = {r["prompt"] for r in eval_rows(skill, seed=seed)}
    rng = _skill_rng(seed, skill, "calibration")
    seen: set[str] = set()
    rows = []
    while len(rows) < n:
        p, a = sk.example(rng)
        if p not in seen and p not in held_out:
            seen.add(p)
            rows.append({"text": p + a})
    return rows


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def data_files(skills: tuple[str, ...] = ZOO_SKILLS, seed: int = DATA_SEED) -> dict[str, str]:
    """The committed data files' contents: relative path (under data/) -> text."""
    out = {}
    for s in skills:
        out[f"eval/{s}.jsonl"] = _jsonl(eval_rows(s, seed=seed))
        out[f"calibration/{s}.jsonl"] = _jsonl(calibration_rows(s, seed=seed))
    return out


def write_if_changed(path: Path, text: str, overwrite: bool = True) -> Path:
    """Write `text` to `path` (through a temporary file and a rename) unless it already holds it.
    `overwrite=False`: only when `path` does not exist (a user's edit of a generated file stays)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or (overwrite and path.read_text() != text):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def write_data_files(
    data_dir: Path = Path("data"), skills: tuple[str, ...] = ZOO_SKILLS, seed: int = DATA_SEED, overwrite: bool = True
) -> list[Path]:
    """Write (or rewrite identically) data/eval/<skill>.jsonl and data/calibration/<skill>.jsonl
    (`overwrite=False`: only those missing)."""
    return [write_if_changed(Path(data_dir) / rel, text, overwrite) for rel, text in data_files(skills, seed).items()]


def training_stream(
    skills: tuple[str, ...], seed: int, long_fraction: float | None = None, data_seed: int = DATA_SEED
) -> Iterator[tuple[str, str, str]]:
    """Endless (skill, prompt, answer) training examples, none equal to an eval prompt.

    ``long_fraction``: None draws input sizes like the eval sets (uniform over each skill's
    ``sizes``); a number draws short inputs (``base_sizes``) except for that fraction of longer ones."""
    if long_fraction is not None and not 0.0 <= long_fraction <= 1.0:
        raise ValueError(f"training_stream: long_fraction must be in [0, 1] or None, got {long_fraction!r}")
    for s in skills:
        get_skill(s)
    held_out = {s: {r["prompt"] for r in eval_rows(s, seed=data_seed)} for s in skills}
    rng = random.Random(f"train:{seed}:{','.join(skills)}")
    while True:
        s = rng.choice(skills) if len(skills) > 1 else skills[0]
        p, a = SKILLS[s].example(rng, long_fraction)
        if p not in held_out[s]:
            yield s, p, a
