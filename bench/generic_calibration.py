#!/usr/bin/env python
"""Write a generic-text calibration set: text that is not from any task of the zoo (issue 18, item 3).

    .venv/bin/python bench/generic_calibration.py [--out data/real/calibration/generic.jsonl]

Source: the docstrings of 32 objects of the Python standard library as installed with the project's
interpreter (CPython's own text, Python Software Foundation License; read locally with
`inspect.getdoc`, nothing downloaded). Each row is `{"text": ...}`: the docstring's first paragraphs
up to about 120 words (cut at a paragraph boundary), so the rows are plain English prose with some
code, about the length of a short paragraph. The committed data/real/calibration/generic.jsonl was
written by this script under CPython 3.11; another Python version may word a docstring differently,
which changes the file's sha256 and so rebuilds every statistic computed on it.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OBJECTS = (
    "json.dumps json.loads collections.namedtuple collections.Counter functools.lru_cache "
    "functools.reduce itertools.groupby heapq bisect.bisect_left textwrap.wrap textwrap.dedent "
    "shutil.copytree shutil.rmtree os.walk os.makedirs subprocess.run subprocess.Popen re.sub "
    "random.sample statistics.median sqlite3 logging.basicConfig dataclasses.dataclass typing.NamedTuple "
    "contextlib.contextmanager pathlib.PurePath.relative_to statistics.stdev itertools "
    "difflib.SequenceMatcher fractions.Fraction decimal.Decimal.quantize tempfile.mkstemp"
).split()
MAX_WORDS = 120


def resolve(name: str):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            continue
    for p in parts[i:]:
        obj = getattr(obj, p)
    return obj


def excerpt(doc: str) -> str:
    """The first paragraphs of `doc` while they stay within MAX_WORDS words (at least one)."""
    out: list[str] = []
    words = 0
    for para in doc.split("\n\n"):
        n = len(para.split())
        if out and words + n > MAX_WORDS:
            break
        out.append(para.strip())
        words += n
    return "\n\n".join(out)


def rows() -> list[dict]:
    out = []
    for name in OBJECTS:
        doc = inspect.getdoc(resolve(name)) or ""
        if len(doc.split()) < 20:
            raise SystemExit(f"error: {name}: docstring too short for a calibration row")
        out.append({"text": excerpt(doc)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "real" / "calibration" / "generic.jsonl")
    args = ap.parse_args()
    data = rows()
    tmp = args.out.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data))
    tmp.replace(args.out)
    print(f"{args.out}: {len(data)} rows, {sum(len(r['text'].split()) for r in data)} words")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
