"""Guided merges without Dagster (`merge-dag merge` on a recipe with `guidance:`).

The statistics the recipe's guidance needs are computed in memory by the same core functions the
Dagster assets call (calibration batches, activation statistics, Grams, sensitivities, LEWIS
importance and allocation, the streamed Sens alignment, coefficients), then merged as the Dagster
merge step does: the guided recipe through the engine, AIM relaxing that merge towards the base,
RegMean solving the linears from the Grams, Fisher merging weighting each expert by its Fisher. With
the same calibration batch settings the tensors equal the Dagster project's (tested). Nothing is
cached: every run recomputes its statistics (the Dagster project caches each as an asset); each
statistics pass holds one model at a time.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..core.checkpoint import Checkpoint
from ..core.recipe import Recipe
from .calibration import DEFAULT_MAX_LENGTH, load_batches, load_tokenizer
from .errors import GuidanceError


@dataclass
class GuidedResult:
    out_dir: Path
    seconds: float
    statistics: list[str] = field(default_factory=list)  # the passes run, e.g. "activations base on arev"


class _Stats:
    """The recipe's statistics, each computed once per run (keyed like the Dagster assets)."""

    def __init__(self, recipe: Recipe, device, batch_size: int, max_length: int, max_rows, log):
        self.recipe, self.device, self.log = recipe, device, log
        self.batch = {"batch_size": batch_size, "max_length": max_length, "max_rows": max_rows}
        self.rows = recipe.guidance.row_options
        self.memo: dict = {}
        self.done: list[str] = []

    def model(self, ref: str):
        from .model import load_model

        return load_model(self.recipe.open_model(ref), device=self.device)

    def batches(self, ref: str, cal: str):
        path, base = self.recipe.model_location(ref)
        tok = load_tokenizer(base if base is not None else path)
        return load_batches(self.recipe.calibration_path(cal), tok, device=self.device, **self.batch, **self.rows)

    def _once(self, key: tuple, what: str, fn: Callable):
        if key not in self.memo:
            t0 = time.perf_counter()
            self.memo[key] = fn()
            self.done.append(what)
            self.log(f"{what}: {time.perf_counter() - t0:.1f} s")
        return self.memo[key]

    def activations(self, ref: str, cal: str, gram: bool = False, sequential: Optional[float] = None):
        from .activations import collect_activation_stats
        from .lewis import sequential_wanda_stats

        def run():
            m, b = self.model(ref), self.batches(ref, cal)
            if sequential is not None:
                return sequential_wanda_stats(m, b, sparsity=sequential, device=self.device)
            return collect_activation_stats(m, b, device=self.device, gram=gram)

        kind = "grams" if gram else "activations"
        return self._once((kind, ref, cal, sequential), f"{kind} of {ref} on {cal}", run)

    def fisher(self, ref: str, cal: str, estimator: str):
        from .fisher_info import fisher_diagonal

        return self._once(
            ("fisher", ref, cal, estimator),
            f"fisher of {ref} on {cal}",
            lambda: fisher_diagonal(self.model(ref), self.batches(ref, cal), device=self.device, estimator=estimator),
        )

    def sensitivity(self, ref: str, cal: str):
        from .sens import sensitivity

        return self._once(
            ("sensitivity", ref, cal),
            f"sensitivity of {ref} on {cal}",
            lambda: sensitivity(self.model(ref), self.batches(ref, cal), device=self.device),
        )


def _own(recipe: Recipe, ref: str) -> str:
    for m in recipe.models or []:
        if m.model == ref and m.calibration:
            return m.calibration
    raise GuidanceError(f"{recipe.where}: model {ref!r} names no calibration set")


def guided_maps(recipe: Recipe, st: _Stats) -> tuple[Optional[dict], Optional[dict]]:
    """(LEWIS densities, Sens weights) of the recipe's experts, as the allocation and coefficients assets
    compute them."""
    from . import lewis, sens

    g = recipe.guidance
    base_ref = recipe.base_model
    experts = [m.model for m in recipe.models or [] if m.model != base_ref]
    base = recipe.open_model(base_ref) if base_ref else None
    densities = weights = None
    if g.sparsity is not None:
        s = g.sparsity
        seq = s.wanda_sparsity if s.sequential else None
        sizes = {n: base.info(n).numel for n in base.tensor_names}
        densities = {}
        for e in experts:
            cal = s.calibration or _own(recipe, e)
            ib = lewis.importance(st.activations(base_ref, cal, sequential=seq), base, st.device, s.clip_quantile)
            ie = lewis.importance(
                st.activations(e, cal, sequential=seq), recipe.open_model(e), st.device, s.clip_quantile
            )
            d = lewis.rescale(lewis.shifts(ib, ie, e), s.gamma, s.epsilon, s.scaling or "minmax", s.quantile or 0.05)
            densities[e] = lewis.match_mean(d, sizes, s.mean_density) if s.mean_density is not None else d
    if g.coefficients is not None:
        c = g.coefficients
        sv = {e: st.sensitivity(e, _own(recipe, e)) for e in experts}
        if c.alignment and len(experts) > 1:
            tasks = {e: st.batches(e, _own(recipe, e)) for e in experts}

            def align():
                with tempfile.TemporaryDirectory(prefix="merge_dag_alignment_") as scratch:
                    return sens.alignment_streamed(st.model, tasks, Path(scratch) / "lp", device=st.device)

            gm = st._once(("alignment", tuple(experts)), "alignment of " + ", ".join(experts), align)
        else:
            gm = {i: {j: 0.0 for j in experts} for i in experts}
        sigma = sens.coefficients(sv, sens.tau(gm), c.temperature, c.normalize or "l2")
        weights = sens.tensor_weights(sigma, base.tensor_names)
    return densities, weights


def guided_merge(
    recipe: Recipe,
    out_dir: str | Path,
    device: str = "cpu",
    shard_size: str | int = "2GB",
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_rows: Optional[int] = None,
    progress: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda _m: None,
) -> GuidedResult:
    """Compute the statistics `recipe.guidance` needs and write the guided merge into `out_dir`
    (atomically; an existing `out_dir` only if it is an earlier merge_dag output, as for plain merges)."""
    from ..core.card import build_card, card_input, write_card
    from ..core.checkpoint import atomic_replace_dir
    from ..core.engine import check_target, execute, plan_merge
    from ..core.fingerprint import checkpoint_fingerprint
    from .apply import guided_recipe

    if recipe.guidance is None:
        raise GuidanceError(f"{recipe.where}: no guidance: merge it with the plain engine")
    g = recipe.guidance
    t0 = time.perf_counter()
    st = _Stats(recipe, device, batch_size, max_length, max_rows, log)
    out_dir = Path(out_dir)
    extra = lambda: {"guidance": {"recipe": g.model_dump(mode="json", exclude_none=True), "statistics": st.done}}  # noqa: E731
    base = recipe.open_model(recipe.base_model) if recipe.base_model else None
    plain = recipe.model_copy(deep=True)
    plain.guidance = None
    plain.source_path, plain.root = recipe.source_path, recipe.root
    check_target(plan_merge(plain, device=device), out_dir, overwrite=overwrite)  # before any statistics pass
    if g.regmean is None and g.fisher is None:
        densities, weights = guided_maps(recipe, st)
        layers = base.config().get("num_hidden_layers") if base is not None else None
        plan = plan_merge(guided_recipe(recipe, densities, weights, layers), device=device)
        if g.aim is None:
            execute(plan, out_dir, shard_size=shard_size, progress=progress, overwrite=overwrite, card_extra=extra())
            return GuidedResult(out_dir, time.perf_counter() - t0, st.done)
    out_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.guided-", dir=out_dir.absolute().parent) as tmp:
        staged = Path(tmp) / "out"
        if g.regmean is not None:  # as the Dagster merge step: the Grams, the closed form, a card
            from .regmean import regmean_checkpoint

            refs = ([recipe.base_model] if recipe.base_model else []) + [
                m.model for m in recipe.models or [] if m.model != recipe.base_model
            ]
            stats = [st.activations(r, _own(recipe, r), gram=True) for r in refs]
            cks = [recipe.open_model(r) for r in refs]
            rm = g.regmean
            regmean_checkpoint(cks, stats, staged, a=rm.a, ridge=rm.ridge, device=device, shard_size=shard_size)
            out = Checkpoint(staged)
            dtype = str(next(iter(out.tensors.values())).dtype).removeprefix("torch.")
            inputs = [card_input(ck, "model", checkpoint_fingerprint(ck)) for ck in cks]
            card = build_card(
                "regmean",
                recipe.to_yaml_dict(),
                str(recipe.source_path),
                inputs,
                dtype,
                recipe.seed,
                refs[0],
                len(out.tensors),
                extra(),
            )
        elif g.fisher is not None:  # as the Dagster merge step: each expert's Fisher, the weighted average, a card
            from .fisher import fisher_checkpoint, recipe_out_dtype, recipe_weights

            experts = [m.model for m in recipe.models or [] if m.model != recipe.base_model]
            stats = [st.fisher(e, _own(recipe, e), g.fisher.estimator) for e in experts]
            cks = [recipe.open_model(r) for r in experts]
            fisher_checkpoint(
                cks,
                stats,
                staged,
                weights=recipe_weights(recipe, experts),
                base=base,
                epsilon=g.fisher.epsilon,
                device=device,
                shard_size=shard_size,
                out_dtype=recipe_out_dtype(recipe),
                normalize=g.fisher.normalize,
            )
            out = Checkpoint(staged)
            dtype = str(next(iter(out.tensors.values())).dtype).removeprefix("torch.")
            refs = ([recipe.base_model] if recipe.base_model else []) + experts
            all_cks = ([base] if base is not None else []) + cks
            roles = (["base"] if base is not None else []) + ["model"] * len(cks)
            inputs = [card_input(ck, r, checkpoint_fingerprint(ck)) for ck, r in zip(all_cks, roles)]
            card = build_card(
                "fisher",
                recipe.to_yaml_dict(),
                str(recipe.source_path),
                inputs,
                dtype,
                recipe.seed,
                refs[0],
                len(out.tensors),
                extra(),
            )
        else:  # AIM: the guided (or plain) merge, relaxed towards the base by its activations
            from .activations import sum_stats
            from .aim import aim_checkpoint

            stats = sum_stats([st.activations(recipe.base_model, c) for c in g.aim.calibrations])
            res = execute(plan, Path(tmp) / "premerge", shard_size=shard_size, progress=progress, card_extra=extra())
            pre = Checkpoint(res.out_dir)
            aim_checkpoint(base, pre, stats, staged, omega=g.aim.omega, device=device, shard_size=shard_size)
            card = {**res.card, **extra(), "aim": {"omega": g.aim.omega}}
        write_card(staged, card)
        atomic_replace_dir(staged, out_dir)
    return GuidedResult(out_dir, time.perf_counter() - t0, st.done)
