"""The contract every merge method follows.

A method merges ONE tensor at a time. The engine reads that tensor from every input as float32 on
the configured device, resolves the parameters for this tensor (scalars, layer gradients, filters;
see merge_dag.core.params) and calls `merge(task)`. The method returns the merged float32 tensor;
the engine casts it to the output dtype and writes it. Inputs in `task` belong to the method and
may be modified in place (this keeps peak memory near (inputs + 2) x one tensor; methods that need
more temporaries say how many in `work_copies`, which the engine's memory estimate uses).

A method may also stream: where `streams(params)` is true the engine (on the CPU) calls
`prepare(task)` as soon as a tensor's inputs are read (on the read-ahead thread, so it overlaps
the previous tensor's merge; TIES finds each task vector's top-k cut there), then
`merge_into(task, out, prepared)`, with the inputs in their storage dtype (bf16, fp16 or float32;
read-only) and `out` a tensor of the output's shape and dtype to fill. Computing chunk by chunk
in float32 from there, the method never makes a float32 copy of a whole tensor: less memory, and
every input byte is read once per pass instead of cast, written and re-read. The bits must equal
those of merge() followed by the cast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch


@dataclass(frozen=True)
class Param:
    """One parameter a method accepts.

    per_model: given per input model (`models[i].parameters`) and/or top-level as a default for all.
    default: None with required=True means the recipe must give it.
    check: returns an error text ("must be in (0, 1]") for a bad value, or None.
    """

    name: str
    default: Any = None
    required: bool = False
    per_model: bool = False
    kind: type = float
    check: Optional[Callable[[Any], Optional[str]]] = None
    help: str = ""


def in_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[Any], Optional[str]]:
    """A check for lo <= x <= hi, with open ends where asked: in_range(0, 1, lo_open=True) is (0, 1]."""

    def check(x: Any) -> Optional[str]:
        v = float(x)
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi) and not math.isnan(v)
        if ok:
            return None
        return f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}, got {x}"

    return check


def non_negative(x: Any) -> Optional[str]:
    return None if float(x) >= 0 else f"must be >= 0, got {x}"


def positive(x: Any) -> Optional[str]:
    v = float(x)
    return None if v > 0 and not math.isnan(v) else f"must be > 0, got {x}"


@dataclass
class TensorTask:
    """Everything a method needs to merge one tensor."""

    name: str  # tensor name in the output checkpoint
    base: Optional[torch.Tensor]  # base model's tensor (float32), None if the method takes no base
    models: list[torch.Tensor]  # the other inputs (float32), in recipe order, base excluded
    model_params: list[dict[str, Any]]  # per-model parameters resolved for this tensor
    params: dict[str, Any]  # global parameters resolved for this tensor
    generator: Optional[torch.Generator] = None  # seeded per (seed, tensor name) for random methods


class MergeMethod:
    """Subclass, set the class attributes, implement `merge`, register in registry.py."""

    name: ClassVar[str]
    requires_base: ClassVar[bool] = True
    optional_base: ClassVar[bool] = False  # requires_base False: still takes a base when the recipe names one
    min_models: ClassVar[int] = 1  # inputs besides the base
    max_models: ClassVar[Optional[int]] = None
    randomized: ClassVar[bool] = False
    params: ClassVar[tuple[Param, ...]] = ()
    description: ClassVar[str] = ""
    reference_url: ClassVar[str] = ""  # the paper or page the method follows ("" when it has none)
    # abilities (the registry derives every list of method names from these)
    uses_task_vectors: ClassVar[bool] = False  # with a base, reads each expert as base + its stored task vector
    sparsifies: ClassVar[bool] = False  # drops task-vector entries by per-model `density` (LEWIS applies)
    takes_coefficients: ClassVar[bool] = False  # scales each task vector by a per-model `weight` (Sens-Merging applies)

    def merge(self, task: TensorTask) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def streams(self, params: dict[str, Any]) -> bool:
        """Whether merge_into handles a tensor with these global parameters (see the module
        docstring). A method may say so only if its output is NaN or Inf somewhere whenever an
        input is: the engine then checks the output alone, and the inputs only to name the culprit."""
        return False

    def prepare(self, task: TensorTask) -> Any:
        """A streamed merge's work on one tensor's inputs alone (see the module docstring)."""
        return None

    def merge_into(self, task: TensorTask, out: torch.Tensor, prepared: Any = None) -> None:  # pragma: no cover
        """merge() from the inputs' storage dtype into `out`, given prepare(task) (module docstring)."""
        raise NotImplementedError

    @classmethod
    def work_copies(cls, n_models: int) -> int:
        """Float32 temporaries of one tensor's size the method holds at its peak, besides its inputs
        (counted from its code; the engine's memory estimate uses it)."""
        return 2

    @classmethod
    def takes_base(cls, base_model: Optional[str]) -> bool:
        """Whether a recipe with this base_model (None: none given) feeds the method a base tensor."""
        return cls.requires_base or (cls.optional_base and bool(base_model))

    @classmethod
    def param(cls, name: str) -> Optional[Param]:
        for p in cls.params:
            if p.name == name:
                return p
        return None
