"""Every merge method merge_dag ships, named in one place."""

from __future__ import annotations

from typing import Callable

from ..errors import RecipeError
from .arcee_fusion import ArceeFusion
from .base import MergeMethod
from .breadcrumbs import Breadcrumbs, BreadcrumbsTies
from .dare import DareLinear, DareTies
from .della import Della, DellaLinear
from .iso_c import IsoC
from .iso_cts import IsoCTS
from .karcher import Karcher
from .linear import Linear
from .model_stock import ModelStock
from .multislerp import MultiSlerp
from .nearswap import NearSwap
from .nuslerp import NuSlerp
from .passthrough import Passthrough
from .sce import Sce
from .slerp import Slerp
from .task_arithmetic import TaskArithmetic
from .ties import Ties
from .tsv_merge import TSVMerge

METHODS: dict[str, type[MergeMethod]] = {
    m.name: m
    for m in (
        Linear,
        TaskArithmetic,
        Ties,
        DareLinear,
        DareTies,
        Breadcrumbs,
        BreadcrumbsTies,
        Della,
        DellaLinear,
        Slerp,
        ModelStock,
        Passthrough,
        NuSlerp,
        MultiSlerp,
        Karcher,
        Sce,
        ArceeFusion,
        NearSwap,
        TSVMerge,
        IsoC,
        IsoCTS,
    )
}


def names_where(ability: Callable[[type[MergeMethod]], bool]) -> tuple[str, ...]:
    """The registered methods with an ability, in registry order: names_where(lambda m: m.sparsifies)."""
    return tuple(name for name, m in METHODS.items() if ability(m))


TASK_VECTOR_METHODS = names_where(lambda m: m.uses_task_vectors)
SPARSIFYING = names_where(lambda m: m.sparsifies)
COEFFICIENT_METHODS = names_where(lambda m: m.takes_coefficients)


def get_method(name: str) -> type[MergeMethod]:
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise RecipeError(f"unknown merge_method {name!r} (known: {known})") from None
