r"""Text from the user's files (model paths, recipe file names, task and tensor names, errors) as
inert Markdown: for the model card a merge writes (README.md, which users publish) and for Dagster
asset descriptions and `MetadataValue.md`, which the UI renders.

`md_text` turns a string into one line that renders as exactly that text: `&`, `<` and `>` become
entities (no HTML tag, e.g. `<script>` or `<img onerror=...>`, can form); the punctuation that can
open a Markdown construct mid-line (\ ` * _ { } [ ] ( ) # ! | ~) is backslash-escaped (no
emphasis, link, image, code span or fence, table cell boundary); line breaks become spaces
(nothing can start a new block: heading, list, fence).
"""

from __future__ import annotations

import re

_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_PUNCT = re.compile(r"([\\`*_{}\[\]()#!|~])")
_BREAKS = re.compile(r"[\r\n\t\v\f\u2028\u2029]+")


def md_text(value: object) -> str:
    """`value` as Markdown text that renders literally, on one line."""
    s = _BREAKS.sub(" ", str(value))
    s = _PUNCT.sub(r"\\\1", s)
    return "".join(_ENTITIES.get(c, c) for c in s)
