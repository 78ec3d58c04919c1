"""Parameter maps, as mergekit defines them.

A parameter value is one of:
- a scalar (number, bool, string): the same for every tensor;
- a list of numbers (a "gradient"): interpolated linearly over the layers. The position of layer
  `i` of `n` is t = i / (n - 1) (t = 1 when n == 1); tensors outside the layers (embeddings, final
  norm, lm_head) take t = 0, as in mergekit;
- a list of `{filter, value}` entries: the first entry whose filter is a substring of the tensor
  name (or is missing / "*") gives the value, which may itself be a scalar or a gradient.
LEWIS densities and Sens-Merging coefficients (merge_dag.guidance) are maps of this same shape.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterator, Optional

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(tensor_name: str) -> Optional[int]:
    m = LAYER_RE.search(tensor_name)
    return int(m.group(1)) if m else None


def layer_position(tensor_name: str, num_layers: int) -> float:
    idx = layer_index(tensor_name)
    if idx is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return idx / (num_layers - 1)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_conditional(x: Any) -> bool:
    return isinstance(x, dict) and "value" in x and set(x) <= {"filter", "value"}


def evaluate(value: Any, tensor_name: str, t: float) -> Any:
    """Resolve a parameter value for one tensor at layer position t. Returns None if no filter matched."""
    if _is_conditional(value):
        value = [value]
    if isinstance(value, list):
        if not value:
            return None
        if all(_is_number(v) for v in value):
            scaled = t * (len(value) - 1)
            i0 = int(math.floor(scaled))
            i1 = min(len(value) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * value[i0] + frac * value[i1]
        if all(_is_conditional(v) for v in value):
            for cond in value:
                f = cond.get("filter")
                if f is None or f == "*" or f in tensor_name:
                    return evaluate(cond["value"], tensor_name, t)
            return None
        if all(not isinstance(v, (list, dict)) for v in value):
            return value[int(t * (len(value) - 1))]
        raise ValueError(f"cannot mix filters and plain values in one list: {value!r}")
    return value


def leaves(value: Any) -> Iterator[Any]:
    """Every scalar a parameter value can produce (for range checks at load time)."""
    if _is_conditional(value):
        yield from leaves(value["value"])
    elif isinstance(value, list):
        for v in value:
            yield from leaves(v)
    else:
        yield value


def validate_shape(value: Any) -> Optional[str]:
    """Return an error text if `value` is not a valid parameter value."""
    if isinstance(value, dict):
        if not _is_conditional(value):
            return f"a mapping must have keys 'filter' and 'value', got {sorted(value)}"
        return validate_shape(value["value"])
    if isinstance(value, list):
        if not value:
            return "an empty list"
        kinds = {
            (
                "cond"
                if _is_conditional(v)
                else "dict"
                if isinstance(v, dict)
                else "list"
                if isinstance(v, list)
                else "scalar"
            )
            for v in value
        }
        if "dict" in kinds:
            return "list entries that are mappings must have keys 'filter' and 'value'"
        if "list" in kinds:
            return "nested lists are only allowed as the value of a {filter, value} entry"
        if len(kinds) > 1:
            return "cannot mix {filter, value} entries and plain values in one list"
        if kinds == {"cond"}:
            for v in value:
                err = validate_shape(v["value"])
                if err:
                    return err
        return None
    if value is None:
        return "no value given"
    return None
