"""Guided merges without Dagster (`merge-dag merge` on a recipe with `guidance:`).

The statistics the recipe's guidance needs are computed in memory by the same core functions the
Dagster assets call (calibration batches, activation statistics, Grams, sensitivities, LEWIS
importance and allocation, the streamed Sens alignment, coefficients), then merged as the Dagster
merge step does: the guided recipe through the engine, AIM relaxing that merge towards the base,
RegMean solving the linears from the Grams, Fisher merging weighting each expert by its Fisher. With
the same calibration batch settings the tensors equal the Dagster project's (tested). Each statistics
pass holds one model at a time, loaded in the working dtype (`dtype`, as MERGE_DAG_STATS_DTYPE for
the assets).

Inside a project (`cache`: a ProjectCache, which `merge-dag merge` opens when the settings find the
project's data folder) the per-model statistics (activations, Grams, sensitivities, Fishers) and the
Sens alignment come from, and go to, the project's artifact store under the keys the Dagster assets use
(merge_dag.guidance.cache): a statistic the UI built is not recomputed here, and one computed here is
a cache hit for the UI. Outside a project nothing is cached and every run recomputes its statistics.
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
    cache_hits: list[str] = field(default_factory=list)  # those read from the project's cache, e.g. "grams/<name>"


class ProjectCache:
    """The project's artifact store, seen from a guided recipe: which statistic asset (name and key) a
    pass of the recipe is, as the Dagster project registers it (merge_dag.project.register_guidance)."""

    def __init__(self, root: str | Path, recipe_file: str | Path, artifacts: str | Path):
        from ..artifacts import ArtifactStore
        from ..project import Project, recipe_spec

        self.root = Path(root).absolute()
        self.spec = recipe_spec(self.root, Path(recipe_file))
        self.project = Project(self.root)
        self.store = ArtifactStore(artifacts)
        self.rows = self.spec.guidance.row_options if self.spec.guidance is not None else {}

    def source(
        self, table: str, ref: str, cal: str, sequential: Optional[float] = None, estimator: Optional[str] = None
    ):
        """The StatsSpec of `ref` on `cal` (table: activations, grams, sensitivities, fishers)."""
        model = next((m for m in self.spec.members if m.ref == ref), None)
        if model is None:
            raise GuidanceError(f"{self.spec.file}: model {ref!r} is not in the recipe")
        extra = {"estimator": estimator} if estimator is not None else {}
        return self.project.stats(table, model, self.spec.calibration(cal), sequential, **self.rows, **extra)


class _Stats:
    """The recipe's statistics, each computed once per run (keyed like the Dagster assets); with a
    ProjectCache each is read from the project's artifact store when there, and stored there when not."""

    def __init__(
        self,
        recipe: Recipe,
        device,
        batch_size: int,
        max_length: int,
        max_rows,
        log,
        dtype: str = "float32",
        cache: Optional[ProjectCache] = None,
    ):
        self.recipe, self.device, self.log, self.dtype, self.cache = recipe, device, log, dtype, cache
        self.batch = {"batch_size": batch_size, "max_length": max_length, "max_rows": max_rows}
        self.rows = recipe.guidance.row_options
        self.memo: dict = {}
        self.done: list[str] = []
        self.hits: list[str] = []  # statistics read from the project's cache

    def model(self, ref: str):
        from ..core.checkpoint import parse_dtype
        from .model import load_model

        return load_model(self.recipe.open_model(ref), device=self.device, dtype=parse_dtype(self.dtype))

    def _cached(self, kind: str, name: str, key: str, compute: Callable, save: Callable, load: Callable):
        """compute() through the project's artifact <kind>/<name>-<key[:16]>: load(path) on a hit; else
        save(value, tmp) into a temporary folder renamed into place (as a Dagster step does)."""
        import json

        from .cache import META_FILE

        art = self.cache.store.artifact(kind, name, key)
        if art.exists:
            self.hits.append(f"{kind}/{name}")
            self.log(f"{kind}/{name}: cache hit {art.id} ({art.path})")
            return load(art.path)
        t0 = time.perf_counter()
        value = compute()
        seconds = time.perf_counter() - t0

        def build(tmp: Path):
            info = save(value, tmp, seconds)
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / META_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")

        self.cache.store.build(art, build)
        self.log(f"{kind}/{name}: built {art.id} in {seconds:.1f} s (stored in the project's cache)")
        return value

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
        from .activations import ActivationStats, collect_activation_stats
        from .lewis import sequential_wanda_stats

        def compute():
            m, b = self.model(ref), self.batches(ref, cal)
            if sequential is not None:
                return sequential_wanda_stats(m, b, sparsity=sequential, device=self.device)
            return collect_activation_stats(m, b, device=self.device, gram=gram)

        kind = "grams" if gram else "activations"
        run = compute
        if self.cache is not None:
            from .cache import save_statistic, stats_key, stats_settings

            src = self.cache.source(kind, ref, cal, sequential)
            settings = stats_settings(kind, src, self.batch, self.dtype)

            def save(stats, tmp, seconds):  # what the activations/grams asset writes
                return save_statistic(kind, stats, tmp, src, settings, seconds)

            def run():
                key = stats_key(kind, src, self.batch, self.dtype)
                return self._cached(kind, src.name, key, compute, save, ActivationStats.load)

        return self._once((kind, ref, cal, sequential), f"{kind} of {ref} on {cal}", run)

    def fisher(self, ref: str, cal: str, estimator: str):
        from .fisher_info import FisherStats, fisher_diagonal

        def compute():
            return fisher_diagonal(self.model(ref), self.batches(ref, cal), device=self.device, estimator=estimator)

        run = compute
        if self.cache is not None:
            from .cache import save_statistic, stats_key, stats_settings

            src = self.cache.source("fishers", ref, cal, estimator=estimator)
            settings = stats_settings("fishers", src, self.batch, self.dtype)

            def save(stats, tmp, seconds):  # what the fishers asset writes
                return save_statistic("fishers", stats, tmp, src, settings, seconds)

            def run():
                key = stats_key("fishers", src, self.batch, self.dtype)
                return self._cached("fishers", src.name, key, compute, save, FisherStats.load)

        return self._once(("fisher", ref, cal, estimator), f"fisher of {ref} on {cal}", run)

    def sensitivity(self, ref: str, cal: str):
        from .sens import alpha, sensitivity

        def compute():
            return sensitivity(self.model(ref), self.batches(ref, cal), device=self.device)

        run = compute
        if self.cache is not None:
            from .cache import stats_key

            src = self.cache.source("sensitivities", ref, cal)

            def save(s, tmp, seconds):  # result.json as the sensitivity asset writes it (no chart)
                out = {
                    "sensitivity": {str(k): v for k, v in s.items()},
                    "alpha": {str(k): v for k, v in alpha(s).items()},
                    "pass_seconds": seconds,
                }
                _write_result(tmp, out)
                return out

            def load(path):
                return {int(k): v for k, v in _read_result(path)["sensitivity"].items()}

            def run():
                key = stats_key("sensitivity", src, self.batch, self.dtype)
                return self._cached("sensitivity", src.name, key, compute, save, load)

        return self._once(("sensitivity", ref, cal), f"sensitivity of {ref} on {cal}", run)

    def alignment(self, experts: list[str], compute: Callable):
        """The Sens alignment matrix of `experts` (compute(): the streamed pass)."""
        run = compute
        if self.cache is not None:
            from .cache import alignment_key

            al = self.cache.project.alignment(
                [self.cache.source("sensitivities", e, _own(self.recipe, e)) for e in experts]
            )

            def save(g, tmp, seconds):
                out = {"alignment": g, "alignment_seconds": seconds}
                _write_result(tmp, out)
                return out

            def run():
                key = alignment_key(al, self.batch, self.dtype)
                return self._cached("alignment", al.name, key, compute, save, lambda p: _read_result(p)["alignment"])

        return self._once(("alignment", tuple(experts)), "alignment of " + ", ".join(experts), run)


def _solved_card(method: str, recipe: Recipe, staged: Path, inputs: list[dict], first: str, extra: dict) -> dict:
    """The model card of a merge written outside the engine (RegMean, Fisher), as the Dagster step's."""
    from ..core.card import build_card

    out = Checkpoint(staged)
    dtype = str(next(iter(out.tensors.values())).dtype).removeprefix("torch.")
    to_yaml, where = recipe.to_yaml_dict(), str(recipe.source_path)
    return build_card(method, to_yaml, where, inputs, dtype, recipe.seed, first, len(out.tensors), extra)


def _write_result(tmp: Path, obj: dict) -> None:
    import json

    from .cache import RESULT

    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / RESULT).write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _read_result(path: Path) -> dict:
    import json

    from .cache import RESULT

    return json.loads((Path(path) / RESULT).read_text())


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

            gm = st.alignment(experts, align)
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
    dtype: str = "float32",
    cache: Optional[ProjectCache] = None,
) -> GuidedResult:
    """Compute the statistics `recipe.guidance` needs and write the guided merge into `out_dir`
    (atomically; an existing `out_dir` only if it is an earlier merge_dag output, as for plain merges).
    `dtype`: the working dtype each statistics pass loads its model in; `cache`: the project's
    artifact store (statistics read from it and stored in it), None: recomputed in memory."""
    from ..core.card import card_input, write_card
    from ..core.checkpoint import atomic_replace_dir
    from ..core.engine import check_target, execute, plan_merge
    from ..core.fingerprint import checkpoint_fingerprint
    from .apply import guided_recipe

    if recipe.guidance is None:
        raise GuidanceError(f"{recipe.where}: no guidance: merge it with the plain engine")
    g = recipe.guidance
    t0 = time.perf_counter()
    st = _Stats(recipe, device, batch_size, max_length, max_rows, log, dtype=dtype, cache=cache)
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
            return GuidedResult(out_dir, time.perf_counter() - t0, st.done, st.hits)
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
            inputs = [card_input(ck, "model", checkpoint_fingerprint(ck)) for ck in cks]
            card = _solved_card("regmean", recipe, staged, inputs, refs[0], extra())
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
            refs = ([recipe.base_model] if recipe.base_model else []) + experts
            all_cks = ([base] if base is not None else []) + cks
            roles = (["base"] if base is not None else []) + ["model"] * len(cks)
            inputs = [card_input(ck, r, checkpoint_fingerprint(ck)) for ck, r in zip(all_cks, roles)]
            card = _solved_card("fisher", recipe, staged, inputs, refs[0], extra())
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
    return GuidedResult(out_dir, time.perf_counter() - t0, st.done, st.hits)
