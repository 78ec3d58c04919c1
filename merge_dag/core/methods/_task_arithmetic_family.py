"""The task-arithmetic family: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

One recipe for all of them (mergekit's "generalized task arithmetic"):

    d_i   = sparsify(theta_i - theta_0)                  (per model: density, gamma, epsilon; rescale)
    w_i d_i                                               (per model weight)
    TIES sign consensus (ties, dare_ties, breadcrumbs_ties, della):
        s   = +1 where sum_i w_i d_i >= 0, else -1        (elected from the weighted, sparsified deltas)
        a_i = [sign(w_i d_i) == s]                        (zeros never agree)
        mix = sum_i w_i d_i a_i,  div = sum_i w_i a_i,  div := 1 where div == 0
    without consensus:
        mix = sum_i w_i d_i,      div = sum_i w_i,      div := 1 where |div| < 1e-8
    theta = theta_0 + lambda * (mix / div if normalize else mix)

Everything is float32 and in place: each expert's tensor becomes its delta, the base tensor
becomes the result. The combination runs chunk by chunk so its temporaries stay in cache. The
consensus uses only arithmetic (no boolean temporaries): with m = copysign(1, s),
clamp(w d m, min=0) * m is w d where it agrees and 0 where it does not, and its sign() is the
agreement indicator for the divisor. Sums run in expert order, like mergekit's stacked sum, so
with the same masks the results agree bit for bit.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Optional

import torch

from ..chunks import workers
from ..errors import RecipeError
from ..sparsify import (
    KEEP_ALL,
    MAGNITUDE,
    Deltas,
    TopCut,
    each_masked_chunk,
    magnitude_cut,
    magnitude_cuts,
    sparsify,
)
from .base import MergeMethod, Param, TensorTask, in_range


def ta_params(
    normalize: bool, rescale: bool, sparsifies: bool, gamma: bool = False, epsilon: bool = False
) -> tuple[Param, ...]:
    """mergekit's parameters for one member of the family, with its defaults."""
    ps = [
        Param(
            "weight",
            required=True,
            per_model=True,
            help="coefficient of this model's task vector (negative subtracts it)",
        ),
        Param(
            "density",
            default=1.0,
            per_model=True,
            check=in_range(0, 1, lo_open=True),
            help=(
                "fraction of the task vector to keep"
                if sparsifies
                else "accepted for mergekit compatibility; task_arithmetic keeps the whole task vector"
            ),
        ),
    ]
    if gamma:
        ps.append(
            Param(
                "gamma",
                default=0.01,
                per_model=True,
                check=in_range(0, 1),
                help="fraction of largest-magnitude entries dropped as outliers",
            )
        )
    if epsilon:
        ps.append(
            Param(
                "epsilon",
                default=0.15,
                per_model=True,
                check=in_range(0, 1, hi_open=True),
                help="keep probability spans density - epsilon .. density + epsilon by magnitude rank",
            )
        )
    ps += [
        Param("lambda", default=1.0, help="scale of the merged task vector"),
        Param(
            "normalize",
            default=normalize,
            kind=bool,
            help="divide by the sum of the weights (of the agreeing models, with sign consensus)",
        ),
        Param(
            "rescale",
            default=rescale,
            kind=bool,
            help="after sparsifying, rescale each task vector to its original L1 norm",
        ),
        Param(
            "int8_mask",
            default=False,
            kind=bool,
            help="accepted for mergekit compatibility; no effect (masks here take no memory)",
        ),
    ]
    return tuple(ps)


class TaskArithmeticFamily(MergeMethod):
    """Subclasses set name, params and these two."""

    sparsification: ClassVar[Optional[str]] = None  # a sparsify() method, or None
    consensus: ClassVar[bool] = False  # TIES sign election
    requires_base = True
    min_models = 1
    uses_task_vectors = True
    takes_coefficients = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.sparsifies = cls.sparsification is not None

    def streams(self, params: dict) -> bool:
        """task_arithmetic and TIES without rescale merge from the storage dtype (merge_into)."""
        if self.sparsification is None:
            return True
        return self.sparsification == MAGNITUDE and self.consensus and not bool(params["rescale"])

    def prepare(self, task: TensorTask) -> Optional[list[TopCut]]:
        """TIES, streamed: each task vector's top-k cut (the inputs stay as they are)."""
        if not self.consensus or task.base is None:
            return None
        densities = [float(mp["density"]) if self.sparsification else 1.0 for mp in task.model_params]
        with workers(task.base):
            cuts = magnitude_cuts(task.models, densities, task.base, stream=True)
        assert all(c is not None for c in cuts), "streamed inputs are contiguous"
        return cuts  # type: ignore[return-value]

    def merge_into(self, task: TensorTask, out: torch.Tensor, prepared: Optional[list[TopCut]] = None) -> None:
        """merge(), streamed: task vectors are recomputed chunk by chunk from the inputs in their
        storage dtype, each chunk's result cast into `out`; no float32 copy of any tensor exists.
        `prepared`: prepare(task)'s cuts (TIES)."""
        base = task.base
        assert base is not None, f"{self.name} needs a base model"
        p = task.params
        if not task.models:
            out.copy_(base)
            return
        weights = [float(mp["weight"]) for mp in task.model_params]
        with workers(base):
            if not self.consensus:  # (streams(): no sparsification)
                combine_linear(base, task.models, weights, bool(p["normalize"]), float(p["lambda"]), out=out)
                return
            cuts = prepared if prepared is not None else self.prepare(task)
            combine_ties(base, task.models, weights, bool(p["normalize"]), float(p["lambda"]), cuts=cuts, out=out)

    def merge(self, task: TensorTask) -> torch.Tensor:
        base = task.base
        assert base is not None, f"{self.name} needs a base model"
        experts = task.models
        if not experts:
            return base
        p = task.params
        weights = [float(mp["weight"]) for mp in task.model_params]
        combine = combine_ties if self.consensus else combine_linear
        # TIES: each task vector's top-k mask is applied inside the combination's chunk loop
        fuse_mask = self.sparsification == MAGNITUDE and self.consensus and not bool(p["rescale"])
        cuts: Optional[list[TopCut]] = [] if fuse_mask else None
        with workers(base):
            if self.sparsification is not None:
                for i, (x, mp) in enumerate(zip(experts, task.model_params)):
                    if cuts is not None:  # x becomes its task vector; its mask is kept for later
                        cut = magnitude_cut(x, float(mp["density"]), base)
                        if cut is not None:
                            cuts.append(cut)
                            continue
                        cuts.append(KEEP_ALL)  # not contiguous: masked right away below
                    try:  # x becomes its sparsified task vector (the subtraction is fused in)
                        sparsify(
                            x,
                            float(mp["density"]),
                            self.sparsification,
                            gamma=float(mp.get("gamma", 0.01)),
                            epsilon=float(mp.get("epsilon", 0.15)),
                            rescale=bool(p["rescale"]),
                            generator=task.generator,
                            base=base,
                        )
                    except ValueError as e:  # della: density +/- epsilon outside (0, 1)
                        raise RecipeError(f"{self.name}: tensor {task.name!r}, model {i}: {e}") from None
            if cuts is not None:
                return combine_ties(base, experts, weights, bool(p["normalize"]), float(p["lambda"]), cuts=cuts)
            return combine(
                base,
                experts,
                weights,
                bool(p["normalize"]),
                float(p["lambda"]),
                deltas_ready=self.sparsification is not None,
            )


def combine_linear(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: list[float],
    normalize: bool,
    lam: float,
    deltas_ready: bool = True,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """base += lambda * sum_i w_i d_i [/ sum_i w_i], in place; `deltas` are overwritten.
    deltas_ready=False: `deltas` hold the experts' weights; d_i = theta_i - base is fused in.
    `out`: streamed instead (see sparsify.Deltas): `deltas` hold the experts' weights and base and
    they stay untouched, in any float dtype; the result goes into `out`, in its dtype."""
    div = float(torch.tensor(weights, dtype=torch.float32).sum())
    if abs(div) < 1e-8:
        div = 1.0
    return _combine(base, deltas, weights, deltas_ready, out, None, _linear_mix(weights, normalize, div, lam), 1)


def _linear_mix(weights: list[float], normalize: bool, div: float, lam: float) -> Callable[..., None]:
    def mix(s: int, e: int, bc: torch.Tensor, dcs: list[torch.Tensor], m: torch.Tensor) -> None:
        for i, (dc, w) in enumerate(zip(dcs, weights)):
            if w != 1:  # (x * 1.0 is x, bit for bit)
                dc.mul_(w)
            if i == 0:
                m.copy_(dc)
            else:
                m.add_(dc)
        if normalize:
            m.div_(div)
        if lam != 1:
            m.mul_(lam)
        bc.add_(m)

    return mix


def _combine(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: list[float],
    deltas_ready: bool,
    out: Optional[torch.Tensor],
    cuts: Optional[list[TopCut]],
    mix: Callable[..., None],
    scratch_n: int,
) -> torch.Tensor:
    """The chunk loop under combine_linear and combine_ties: mix(s, e, bc, dcs, *bufs) adds the
    merged task vector of chunk [s, e) into bc, the base's chunk."""
    stream = out is not None
    if not stream and not base.is_contiguous():
        return base.copy_(_combine(base.contiguous(), deltas, weights, deltas_ready, None, cuts, mix, scratch_n))
    if stream and not (base.is_contiguous() and out.is_contiguous() and all(d.is_contiguous() for d in deltas)):
        raise ValueError("streamed merge: inputs and output must be contiguous")
    b = base.view(-1)
    srcs = [
        Deltas(d if d.is_contiguous() else d.contiguous(), base if (stream or not deltas_ready) else None, stream)
        for d in deltas
    ]
    if stream:
        o = out.view(-1)

        def fn(s: int, e: int, bc: torch.Tensor, dcs: list[torch.Tensor], *bufs: torch.Tensor) -> None:
            mix(s, e, bc, dcs, *bufs)
            o[s:e].copy_(bc)  # the cast to the output dtype, chunk by chunk

    else:
        fn = mix
    each_masked_chunk(b, list(zip(srcs, cuts or [KEEP_ALL] * len(srcs))), fn, scratch_n=scratch_n)
    return out if stream else base


def combine_ties(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: list[float],
    normalize: bool,
    lam: float,
    deltas_ready: bool = True,
    cuts: Optional[list[TopCut]] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """TIES: elect a sign per entry, sum the agreeing weighted deltas, in place into base.
    `cuts`: each delta's top-k mask (sparsify.magnitude_cut), applied chunk by chunk here.
    `out`: streamed, as in combine_linear."""
    # all weights >= 0: div is 0 exactly where nothing agrees (and mix is 0 there) and otherwise
    # at least the smallest positive weight, so clamping to that weight stands for "0 -> 1"
    pos_w = [w for w in weights if w > 0]
    clamp_to = min(pos_w) if pos_w and all(w >= 0 for w in weights) else None
    return _combine(
        base,
        deltas,
        weights,
        deltas_ready,
        out,
        cuts,
        _ties_mix(weights, normalize, lam, clamp_to, base.device),
        4,
    )


def _ties_mix(
    weights: list[float], normalize: bool, lam: float, clamp_to: Optional[float], device: torch.device
) -> Callable[..., None]:
    one = torch.ones((), dtype=torch.float32, device=device)

    def mix(
        s: int,
        e: int,
        bc: torch.Tensor,
        dcs: list[torch.Tensor],
        m: torch.Tensor,
        sg: torch.Tensor,
        dv: torch.Tensor,
        t: torch.Tensor,
    ) -> None:
        for dc, w in zip(dcs, weights):
            if w != 1:  # (x * 1.0 is x, bit for bit)
                dc.mul_(w)  # weighted deltas, in place
        # elected sign: +1 where the sum is >= 0 (copysign(1, -0.0) = -1 only if all terms are 0)
        if len(dcs) == 1:
            torch.copysign(one, dcs[0], out=sg)
        else:
            torch.add(dcs[0], dcs[1], out=m)
            for dc in dcs[2:]:
                m.add_(dc)
            torch.copysign(one, m, out=sg)
        # with s = +-1: sum_i [w_i d_i agrees] w_i d_i = s * sum_i relu(s w_i d_i), exactly (a sign
        # flip commutes with rounding), so the sum is taken on the magnitudes and signed once
        for i, (dc, w) in enumerate(zip(dcs, weights)):
            dc.mul_(sg).clamp_(min=0)  # |w d| where it agrees, else 0
            if normalize:
                torch.sign(dc, out=t)  # agreement indicator (zeros never agree)
                if i == 0:
                    dv.copy_(t) if w == 1 else torch.mul(t, w, out=dv)
                else:
                    dv.add_(t, alpha=w)
            if i == 0:
                m.copy_(dc)
            else:
                m.add_(dc)
        m.mul_(sg)
        if normalize:
            if clamp_to is not None:
                dv.clamp_(min=clamp_to)
            else:
                dv.masked_fill_(dv == 0, 1.0)
            m.div_(dv)
        if lam != 1:
            m.mul_(lam)
        bc.add_(m)

    return mix
