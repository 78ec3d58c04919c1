"""Every merge method merge_dag ships, named in one place."""

from __future__ import annotations

from ..errors import RecipeError
from .base import MergeMethod
from .arcee_fusion import ArceeFusion
from .breadcrumbs import Breadcrumbs, BreadcrumbsTies
from .della import Della, DellaLinear
from .dare import DareLinear, DareTies
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


def get_method(name: str) -> type[MergeMethod]:
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise RecipeError(f"unknown merge_method {name!r} (known: {known})") from None
