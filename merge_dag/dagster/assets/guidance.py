"""Data-guided merging as assets: statistics, LEWIS allocations, Sens coefficients (the calibration
sets they read, calibration/<set>, are source assets: sources.py).

    activations/<model>__<set>[__seqwandaNN][__answer][__chat]   per-linear input statistics (one forward pass)
    grams/<model>__<set>                  per-linear X^T X for RegMean (one forward pass)
    fishers/<expert>__<set>[__empirical]  diagonal Fisher of every parameter (a forward + backward pass per row)
    sensitivity/<expert>__<set>           per-layer first-order sensitivity (one forward + backward pass)
    importance/<expert>__<set>[__clipQ]   LEWIS importance of expert and base, and its shift
    allocation/<recipe>                   LEWIS density per expert x tensor (per-layer chart in the UI)
    alignment/<expert>__<set>__and__...   Sens-Merging cross-task KL matrix of a set of experts (streamed)
    coefficients/<recipe>                 Sens-Merging sigma per expert x layer

Every statistic is keyed by (model fingerprint, calibration fingerprint, batch settings, code
version), so it is computed once and shared by every recipe that names the same model and set.
The math lives in merge_dag.guidance; this module only wires it to the cache and lineage.
"""

import json
import time
from pathlib import Path

import dagster as dg

from ...core.fingerprint import file_fingerprint
from ...core.markdown import md_text
from ...core.params import layer_index
from ...core.version import code_version
from ...guidance.cache import (
    FISHER_CODE,
    SENS_CODE,
    STATS_CODE,
    alignment_settings,
    save_statistic,
    stats_settings,
)
from ...project import (
    AlignmentSpec,
    CalibrationSource,
    ImportanceSpec,
    Project,
    RecipeSpec,
    StatsSpec,
    current_spec,
    register_guidance,
)
from ..resources import MergeDagResource, torch_pool, torch_tags
from ..steps import Input, run_step, upstream

GROUP = "guidance"
LEWIS_CODE = code_version("guidance/lewis.py", "guidance/activations.py", "guidance/stats_io.py")
RESULT = "result.json"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _calibration_input(cal: CalibrationSource) -> Input:
    return Input.source("calibration", "calibration", file_fingerprint(cal.path))


def _upstream_input(context, role: str, key: list[str]) -> tuple[Input, dict]:
    up = upstream(context, key)
    return Input.artifact(role, up), up


def _batches(res: MergeDagResource, model_path: Path, cal: CalibrationSource, rows: dict | None = None):
    """The calibration batches of a pass; `rows`: StatsSpec.row_options (answer-only tokens, chat template)."""
    from ...guidance.calibration import load_batches, load_tokenizer

    s = res.calibration_settings()
    return load_batches(
        cal.path,
        load_tokenizer(model_path),
        batch_size=s["batch_size"],
        max_length=s["max_length"],
        max_rows=s["max_rows"],
        device=res.device,
        **(rows or {}),
    )


def read_result(path: str | Path) -> dict:
    return json.loads((Path(path) / RESULT).read_text())


def _write_result(tmp: Path, obj: dict) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / RESULT).write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def bar(v: float, width: int = 20) -> str:
    """A text bar for v in [0, 1] (markdown charts that render in the Dagster UI)."""
    n = max(0, min(width, round(v * width)))
    return "█" * n + "·" * (width - n)


def chart_metadata(art, file: str, alt: str) -> dict:
    """{"heatmap": markdown image} for a PNG the build step saved in the artifact folder (absent in an
    artifact built before merge_dag drew pictures: then nothing)."""
    from ...charts import markdown_image

    png = Path(art.path) / file
    return {"heatmap": dg.MetadataValue.md(markdown_image(png, alt))} if png.exists() else {}


def _layer_of(name: str) -> int:
    li = layer_index(name)
    return -1 if li is None else li


# ---------------------------------------------------------------------------------------------
# per-(model, calibration set) statistics (the calibration sets themselves: sources.py)
# ---------------------------------------------------------------------------------------------


def stats_asset(kind: str, src: StatsSpec) -> dg.AssetsDefinition:
    """activations/<name> (kind "activations") or grams/<name> (kind "grams")."""
    gram = kind == "grams"
    what = "Gram matrices X^T X" if gram else "input statistics (count, sum x^2, sum |x|, max |x|)"
    variant = f", sequential Wanda {src.sequential}" if src.sequential is not None else ""

    @dg.asset(
        key=[kind, src.name],
        deps=[["model", src.model.name], ["calibration", src.calibration.name]],
        group_name=GROUP,
        code_version=STATS_CODE,
        pool=torch_pool(),
        op_tags=torch_tags(),
        kinds={"pytorch", "safetensors"},
        description=f"Per-linear {what} of {md_text(src.model.ref)} on calibration set "
        f"{md_text(src.calibration.ref)}{variant}.",
    )
    def _stats(context: dg.AssetExecutionContext, merge_dag: MergeDagResource) -> dg.MaterializeResult:
        inputs = [Input.model("model", src.model), _calibration_input(src.calibration)]
        settings = stats_settings(kind, src, merge_dag.calibration_settings(), merge_dag.checked("stats_dtype"))

        def build(tmp, art):
            from ...guidance.activations import collect_activation_stats
            from ...guidance.lewis import sequential_wanda_stats
            from ...guidance.model import load_model

            model = load_model(src.model.open(), device=merge_dag.device, dtype=merge_dag.stats_torch_dtype())
            batches = _batches(merge_dag, src.model.model_folder, src.calibration, src.row_options)
            t0 = time.perf_counter()
            if src.sequential is not None:
                stats = sequential_wanda_stats(model, batches, sparsity=src.sequential, device=merge_dag.device)
            else:
                stats = collect_activation_stats(model, batches, device=merge_dag.device, gram=gram)
            return save_statistic(kind, stats, tmp, src, settings, time.perf_counter() - t0)

        return run_step(
            context,
            merge_dag,
            kind=kind,
            name=src.name,
            code_version=STATS_CODE,
            settings=settings,
            inputs=inputs,
            build=build,
            metadata=lambda art, info: {k: info.get(k) for k in ("tokens", "linears", "pass_seconds")},
        )

    return _stats


def sensitivity_asset(src: StatsSpec) -> dg.AssetsDefinition:
    @dg.asset(
        key=["sensitivity", src.name],
        deps=[["model", src.model.name], ["calibration", src.calibration.name]],
        group_name=GROUP,
        code_version=SENS_CODE,
        pool=torch_pool(),
        op_tags=torch_tags(),
        kinds={"pytorch"},
        description=f"Sens-Merging per-layer sensitivity of {md_text(src.model.ref)} on {md_text(src.calibration.ref)} "
        "(sum |theta * dL/dtheta| per layer, one backward pass per batch).",
    )
    def _sens(context: dg.AssetExecutionContext, merge_dag: MergeDagResource) -> dg.MaterializeResult:
        inputs = [Input.model("model", src.model), _calibration_input(src.calibration)]

        def build(tmp, art):
            from ...guidance.model import load_model
            from ...guidance.sens import alpha, sensitivity

            model = load_model(src.model.open(), device=merge_dag.device, dtype=merge_dag.stats_torch_dtype())
            batches = _batches(merge_dag, src.model.model_folder, src.calibration, src.row_options)
            t0 = time.perf_counter()
            s = sensitivity(model, batches, device=merge_dag.device)
            out = {
                "sensitivity": {str(k): v for k, v in s.items()},
                "alpha": {str(k): v for k, v in alpha(s).items()},
                "pass_seconds": time.perf_counter() - t0,
            }
            _write_result(tmp, out)
            from ...charts import heatmaps, layer_panel

            heatmaps(
                [
                    layer_panel(
                        "sensitivity S per layer (share)", {src.model.ref: {int(k): v for k, v in out["alpha"].items()}}
                    )
                ],
                tmp / "sensitivity.png",
                title=f"Sens-Merging sensitivity of {src.model.ref} on {src.calibration.ref}",
                label="alpha (share of S)",
            )
            return out

        def meta(art, info):
            a = info.get("alpha", {})
            top = max(a.values(), default=0) or 1
            rows = "\n".join(
                f"| {md_text(k)} | {info['sensitivity'][k]:.4g} | {v:.3f} | `{bar(v / top)}` |" for k, v in a.items()
            )
            return {
                **chart_metadata(art, "sensitivity.png", f"sensitivity of {src.model.ref}"),
                "per_layer": dg.MetadataValue.md("| layer | S | alpha | |\n|---|---|---|---|\n" + rows),
                "pass_seconds": info.get("pass_seconds"),
            }

        return run_step(
            context,
            merge_dag,
            kind="sensitivity",
            name=src.name,
            code_version=SENS_CODE,
            settings=stats_settings(
                "sensitivity", src, merge_dag.calibration_settings(), merge_dag.checked("stats_dtype")
            ),
            inputs=inputs,
            build=build,
            metadata=meta,
        )

    return _sens


def fisher_asset(src: StatsSpec) -> dg.AssetsDefinition:
    """fishers/<name>: the diagonal Fisher of one expert on its own calibration set (Fisher merging),
    shared by every recipe that merges that expert with that set and estimator."""
    estimator = src.estimator or "sampled"

    @dg.asset(
        key=["fishers", src.name],
        deps=[["model", src.model.name], ["calibration", src.calibration.name]],
        group_name=GROUP,
        code_version=FISHER_CODE,
        pool=torch_pool(),
        kinds={"pytorch", "safetensors"},
        description=f"Diagonal Fisher ({estimator}) of every parameter of {md_text(src.model.ref)} on "
        f"{md_text(src.calibration.ref)}: mean over the target tokens of the squared score, one forward and "
        "backward pass per calibration row.",
    )
    def _fisher(context: dg.AssetExecutionContext, merge_dag: MergeDagResource) -> dg.MaterializeResult:
        inputs = [Input.model("model", src.model), _calibration_input(src.calibration)]
        settings = stats_settings("fishers", src, merge_dag.calibration_settings(), merge_dag.checked("stats_dtype"))

        def build(tmp, art):
            from ...guidance.fisher_info import fisher_diagonal
            from ...guidance.model import load_model

            model = load_model(src.model.open(), device=merge_dag.device, dtype=merge_dag.stats_torch_dtype())
            batches = _batches(merge_dag, src.model.model_folder, src.calibration, src.row_options)
            t0 = time.perf_counter()
            stats = fisher_diagonal(model, batches, device=merge_dag.device, estimator=estimator)
            seconds = time.perf_counter() - t0
            del model
            return save_statistic("fishers", stats, tmp, src, settings, seconds)

        return run_step(
            context,
            merge_dag,
            kind="fishers",
            name=src.name,
            code_version=FISHER_CODE,
            settings=settings,
            inputs=inputs,
            build=build,
            metadata=lambda art, info: {k: info.get(k) for k in ("rows", "tokens", "parameters", "pass_seconds")},
        )

    return _fisher


def importance_asset(imp: ImportanceSpec) -> dg.AssetsDefinition:
    b, e = imp.base, imp.expert

    @dg.asset(
        key=["importance", imp.name],
        deps=[["activations", b.name], ["activations", e.name], ["model", b.model.name], ["model", e.model.name]],
        group_name=GROUP,
        code_version=LEWIS_CODE,
        kinds={"pytorch"},
        description=f"LEWIS importance ||W * sqrt(s)||_F per linear of {md_text(e.model.ref)} and of the base "
        f"{md_text(b.model.ref)} on {md_text(e.calibration.ref)}, and its normalised shift"
        + (f" (s clipped at its {imp.clip_quantile} quantile per linear)." if imp.clip_quantile is not None else "."),
    )
    def _importance(context: dg.AssetExecutionContext, merge_dag: MergeDagResource) -> dg.MaterializeResult:
        ib, ub = _upstream_input(context, "base_activations", ["activations", b.name])
        ie, ue = _upstream_input(context, "expert_activations", ["activations", e.name])
        inputs = [Input.model("base", b.model), Input.model("expert", e.model), ib, ie]

        def build(tmp, art):
            from ...guidance.activations import ActivationStats
            from ...guidance.lewis import importance, shifts

            clip = imp.clip_quantile
            i_base = importance(ActivationStats.load(ub["path"]), b.model.open(), merge_dag.device, clip)
            i_exp = importance(ActivationStats.load(ue["path"]), e.model.open(), merge_dag.device, clip)
            out = {"base": i_base, "expert": i_exp, "shift": shifts(i_base, i_exp, e.model.ref)}
            _write_result(tmp, out)
            from ...charts import heatmaps, shift_panel

            heatmaps(
                [shift_panel(e.model.ref, out["shift"])],
                tmp / "shift.png",
                title=f"LEWIS importance shift of {e.model.ref} vs {b.model.ref} on {e.calibration.ref}",
                label="normalised shift",
                ncols=1,
            )
            return out

        def meta(art, info):
            per_layer: dict[int, float] = {}
            for n, v in info.get("shift", {}).items():
                per_layer[_layer_of(n)] = per_layer.get(_layer_of(n), 0.0) + v
            top = max(per_layer.values(), default=0) or 1
            rows = "\n".join(f"| {md_text(k)} | {v:.4f} | `{bar(v / top)}` |" for k, v in sorted(per_layer.items()))
            return {
                **chart_metadata(art, "shift.png", f"importance shift of {e.model.ref}"),
                "shift_per_layer": dg.MetadataValue.md(
                    "| layer | sum of normalised shifts | |\n|---|---|---|\n" + rows
                ),
            }

        return run_step(
            context,
            merge_dag,
            kind="importance",
            name=imp.name,
            code_version=LEWIS_CODE,
            settings={} if imp.clip_quantile is None else {"clip_quantile": imp.clip_quantile},
            inputs=inputs,
            build=build,
            metadata=meta,
        )

    return _importance


# ---------------------------------------------------------------------------------------------
# per recipe: allocation (LEWIS) and coefficients (Sens-Merging)
# ---------------------------------------------------------------------------------------------


def allocation_chart(densities: dict[str, dict[str, float]], sizes: dict[str, int]) -> str:
    """Markdown: per layer, each expert's parameter-weighted mean density with a bar."""
    experts = list(densities)
    layers = sorted({_layer_of(n) for d in densities.values() for n in d})
    head = "| layer | " + " | ".join(md_text(e) for e in experts) + " |\n|---|" + "---|" * len(experts)
    rows = []
    for li in layers:
        cells = []
        for ex in experts:
            items = [(d, sizes[n]) for n, d in densities[ex].items() if _layer_of(n) == li]
            mean = sum(d * s for d, s in items) / max(1, sum(s for _, s in items))
            cells.append(f"{mean:.2f} `{bar(mean, 10)}`")
        rows.append(f"| {'other' if li < 0 else li} | " + " | ".join(cells) + " |")
    return head + "\n" + "\n".join(rows)


def allocation_asset(project: Project, spec: RecipeSpec, imps: list[ImportanceSpec]) -> dg.AssetsDefinition:
    @dg.asset(
        key=["allocation", spec.name],
        deps=[["importance", i.name] for i in imps] + [["recipe", spec.name]],
        group_name=GROUP,
        code_version=LEWIS_CODE,
        kinds={"pytorch"},
        description=f"LEWIS density map (expert x layer x module) for recipe {md_text(spec.file.name)}.",
    )
    def _allocation(context: dg.AssetExecutionContext, merge_dag: MergeDagResource) -> dg.MaterializeResult:
        now = current_spec(project, spec)
        g = now.guidance.sparsity if now.guidance else None
        if g is None:
            raise dg.Failure(f"recipe {spec.file}: guidance.sparsity was removed; reload the code location")
        by_expert = dict(zip([i.expert.model.ref for i in imps], imps))
        missing = [e.ref for e in now.experts if e.ref not in by_expert]
        if missing:
            raise dg.Failure(
                f"recipe {spec.file}: {missing} joined after the definitions loaded; their LEWIS "
                "importance appears after a reload of the code location"
            )
        ups = {
            ref: _upstream_input(context, "importance", ["importance", by_expert[ref].name])
            for ref in (e.ref for e in now.experts)
        }
        inputs = [i for i, _ in ups.values()]
        settings = g.settings_dump()

        def build(tmp, art):
            from ...guidance.lewis import match_mean, rescale, weighted_mean

            ck = now.base.open()
            sizes = {n: ck.info(n).numel for n in ck.tensor_names}
            dens, means = {}, {}
            for ref, (_, up) in ups.items():
                d = rescale(
                    read_result(up["path"])["shift"], g.gamma, g.epsilon, g.scaling or "minmax", g.quantile or 0.05
                )
                if g.mean_density is not None:
                    d = match_mean(d, sizes, g.mean_density)
                dens[ref], means[ref] = d, weighted_mean(d, sizes)
            out = {"densities": dens, "mean_density": means, "chart": allocation_chart(dens, sizes)}
            _write_result(tmp, out)
            from ...charts import allocation_panels, heatmaps

            heatmaps(
                allocation_panels(dens),
                tmp / "allocation.png",
                vmin=0.0,
                vmax=1.0,
                label="density",
                title=f"LEWIS density per expert x layer, per module kind (recipe {spec.name}; "
                f"gamma {g.gamma}, epsilon {g.epsilon})",
            )
            return out

        def meta(art, info):
            return {
                **chart_metadata(art, "allocation.png", f"LEWIS allocation of {spec.name}"),
                "per_layer_density": dg.MetadataValue.md(info.get("chart", "")),
                "mean_density": dg.MetadataValue.json(
                    {k: round(v, 4) for k, v in info.get("mean_density", {}).items()}
                ),
                "gamma": g.gamma,
                "epsilon": g.epsilon,
            }

        return run_step(
            context,
            merge_dag,
            kind="allocation",
            name=spec.name,
            code_version=LEWIS_CODE,
            settings=settings,
            inputs=inputs,
            build=build,
            metadata=meta,
        )

    return _allocation


def alignment_asset(al: AlignmentSpec) -> dg.AssetsDefinition:
    """alignment/<members>: the cross-task KL matrix of a set of experts, each on its own set (streamed:
    one model in memory at a time), shared by every Sens-Merging recipe with that set of experts."""
    ms = al.members
    deps = [["model", m.model.name] for m in ms] + [
        ["calibration", c.name] for c in dict.fromkeys(m.calibration for m in ms)
    ]

    @dg.asset(
        key=["alignment", al.name],
        deps=deps,
        group_name=GROUP,
        code_version=SENS_CODE,
        pool=torch_pool(),
        op_tags=torch_tags(),
        kinds={"pytorch"},
        description="Sens-Merging cross-task alignment g_ij = mean KL(expert j || expert i) on task j's texts, for "
        + ", ".join(f"{md_text(m.model.ref)} on {md_text(m.calibration.ref)}" for m in ms)
        + " (one model in memory at a time).",
    )
    def _alignment(context: dg.AssetExecutionContext, merge_dag: MergeDagResource) -> dg.MaterializeResult:
        inputs = [Input.model("expert", m.model) for m in ms]
        inputs += [_calibration_input(c) for c in dict.fromkeys(m.calibration for m in ms)]
        settings = alignment_settings(al, merge_dag.calibration_settings(), merge_dag.checked("stats_dtype"))

        def build(tmp, art):
            from ...guidance.model import load_model
            from ...guidance.sens import alignment_streamed

            by_ref = {m.model.ref: m for m in ms}
            dtype = merge_dag.stats_torch_dtype()
            tasks = {
                r: _batches(merge_dag, m.model.model_folder, m.calibration, m.row_options) for r, m in by_ref.items()
            }
            t0 = time.perf_counter()
            g = alignment_streamed(
                lambda r: load_model(by_ref[r].model.open(), device=merge_dag.device, dtype=dtype),
                tasks,
                Path(tmp) / "_scratch",
                device=merge_dag.device,
            )
            out = {"alignment": g, "alignment_seconds": time.perf_counter() - t0}
            _write_result(tmp, out)
            return out

        return run_step(
            context,
            merge_dag,
            kind="alignment",
            name=al.name,
            code_version=SENS_CODE,
            settings=settings,
            inputs=inputs,
            build=build,
            metadata=lambda art, info: {
                "alignment_kl": dg.MetadataValue.json(info.get("alignment", {})),
                "alignment_seconds": info.get("alignment_seconds"),
            },
        )

    return _alignment


def coefficients_asset(
    project: Project, spec: RecipeSpec, sens: list[StatsSpec], align: list[AlignmentSpec]
) -> dg.AssetsDefinition:
    deps = [["sensitivity", s.name] for s in sens] + [["alignment", a.name] for a in align] + [["recipe", spec.name]]

    @dg.asset(
        key=["coefficients", spec.name],
        deps=deps,
        group_name=GROUP,
        code_version=SENS_CODE,
        kinds={"pytorch"},
        description=f"Sens-Merging coefficients sigma (expert x layer) for recipe {md_text(spec.file.name)}, "
        "from the experts' sensitivities and their cross-task alignment (its own asset).",
    )
    def _coefficients(context: dg.AssetExecutionContext, merge_dag: MergeDagResource) -> dg.MaterializeResult:
        now = current_spec(project, spec)
        g = now.guidance.coefficients if now.guidance else None
        if g is None:
            raise dg.Failure(f"recipe {spec.file}: guidance.coefficients was removed; reload the code location")
        by_expert = {s.model.ref: s for s in sens}
        missing = [e.ref for e in now.experts if e.ref not in by_expert]
        if missing:
            raise dg.Failure(
                f"recipe {spec.file}: {missing} joined after the definitions loaded; their "
                "sensitivity appears after a reload of the code location"
            )
        refs = [e.ref for e in now.experts]
        ups = {r: _upstream_input(context, "sensitivity", ["sensitivity", by_expert[r].name]) for r in refs}
        inputs = [i for i, _ in ups.values()]
        aligned = g.alignment and len(refs) > 1
        if aligned and not align:
            raise dg.Failure(
                f"recipe {spec.file}: guidance.coefficients.alignment was switched on after the definitions "
                "loaded; its alignment asset appears after a reload of the code location"
            )
        if aligned:
            ia, ua = _upstream_input(context, "alignment", ["alignment", align[0].name])
            inputs.append(ia)
        settings = g.settings_dump()

        def build(tmp, art):
            from ...guidance.sens import coefficients, tau

            s = {
                r: {int(k): v for k, v in read_result(up["path"])["sensitivity"].items()} for r, (_, up) in ups.items()
            }
            if aligned:
                full = read_result(ua["path"])["alignment"]
                gm = {i: {j: full[i][j] for j in refs} for i in refs}
            else:
                gm = {i: {j: 0.0 for j in refs} for i in refs}
            taus = tau(gm)
            sigma = coefficients(s, taus, g.temperature, g.normalize or "l2")
            out = {
                "sigma": {r: {str(k): v for k, v in c.items()} for r, c in sigma.items()},
                "tau": taus,
                "alignment": gm,
            }
            _write_result(tmp, out)
            from ...charts import heatmaps, layer_panel

            heatmaps(
                [layer_panel("sigma per expert x layer", {r: c for r, c in sigma.items()})],
                tmp / "coefficients.png",
                label="sigma",
                ncols=1,
                title=f"Sens-Merging coefficients of recipe {spec.name} (temperature {g.temperature})",
            )
            return out

        def meta(art, info):
            sigma = info.get("sigma", {})
            names = list(sigma)
            layers = sorted({int(k) for c in sigma.values() for k in c})
            head = "| layer | " + " | ".join(md_text(n) for n in names) + " |\n|---|" + "---|" * len(names)
            rows = "\n".join(
                f"| {li} | "
                + " | ".join(f"{sigma[n][str(li)]:.3f} `{bar(sigma[n][str(li)], 10)}`" for n in names)
                + " |"
                for li in layers
            )
            return {
                **chart_metadata(art, "coefficients.png", f"Sens coefficients of {spec.name}"),
                "sigma_per_layer": dg.MetadataValue.md(head + "\n" + rows),
                "tau": dg.MetadataValue.json(info.get("tau", {})),
                "alignment_kl": dg.MetadataValue.json(info.get("alignment", {})),
            }

        return run_step(
            context,
            merge_dag,
            kind="coefficients",
            name=spec.name,
            code_version=SENS_CODE,
            settings=settings,
            inputs=inputs,
            build=build,
            metadata=meta,
        )

    return _coefficients


def guidance_assets(project: Project) -> list[dg.AssetsDefinition]:
    out: list[dg.AssetsDefinition] = [stats_asset("activations", s) for s in project.activations.values()]
    out += [stats_asset("grams", s) for s in project.grams.values()]
    out += [fisher_asset(s) for s in project.fishers.values()]
    out += [sensitivity_asset(s) for s in project.sensitivities.values()]
    out += [importance_asset(i) for i in project.importances.values()]
    out += [alignment_asset(a) for a in project.alignments.values()]
    for spec in project.recipes.values():
        need = register_guidance(project, spec)  # already registered at load: returns the same sources
        if need["importance"]:
            out.append(allocation_asset(project, spec, need["importance"]))
        if need["sensitivity"]:
            out.append(coefficients_asset(project, spec, need["sensitivity"], need["alignment"]))
    return out
