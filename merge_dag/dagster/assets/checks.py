"""Asset checks users read next to a merge: its embeddings are sane, and its evaluation against the base.

    merged/<recipe>       embeddings_sane      no NaN/Inf and no new all-zero, near-zero or copied row in the
                                               embedding / lm_head (untrained-looking rows)
    merged/<recipe>       evaluated_vs_base    the merge's eval scores beside the base's, per task with Δ
                                               (after eval/merged/<recipe>: the merged page shows this build's scores)
    eval/merged/<recipe>  not_below_base       average of the primary metric >= the base's (WARN if below)
    eval/merged/<recipe>  no_task_collapsed    no task below half the base's score (ERROR)

The two score checks sit on eval/merged/<recipe>, the asset that holds the scores: a check runs right
after its asset in the same run, so it always reads the evaluation just made (a check on merged/<recipe>
would run before that merge's evaluation and read the previous one). They also depend on
eval/model/<base> (additional_deps), so in a run that evaluates both, the base is evaluated first.
"""

from pathlib import Path

import dagster as dg
import torch

from ...artifacts import read_json
from ...core.checkpoint import Checkpoint
from ...core.vocab import tokenizer_length
from ...evaluation.report import ScoreTable
from ...project import Project, RecipeSpec
from ..resources import MergeDagResource
from ..steps import META_FILE, resolve_path

COLLAPSE = 0.5  # a task "collapsed" when the merge scores below this fraction of the base's score
EMBEDDING_HINTS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "lm_head", "embed_out")


def _latest_info(context, key: list[str], root: str) -> dict | None:
    ev = context.instance.get_latest_materialization_event(dg.AssetKey(key))
    if ev is None or ev.asset_materialization is None or "path" not in ev.asset_materialization.metadata:
        return None
    return read_json(Path(resolve_path(root, ev.asset_materialization.metadata["path"].value)) / META_FILE)


NEAR_ZERO = 1e-3  # a row whose norm is below this fraction of the median row norm looks untrained


def untrained_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(near_zero, duplicate) row masks of a 2-D float tensor: rows not all zero whose L2 norm is below
    NEAR_ZERO x the median row norm, and rows equal to another row (copies, as a vocabulary resized
    with one fill value leaves them). Duplicates are found through a random projection (rows with
    equal projections are compared exactly), in O(rows log rows)."""
    norms = torch.linalg.vector_norm(t, dim=1)
    nonzero = norms > 0
    near = torch.zeros_like(nonzero)
    if bool(nonzero.any()):
        near = nonzero & (norms < NEAR_ZERO * norms[nonzero].median())
    g = torch.Generator().manual_seed(0)
    proj = t.to(torch.float64) @ torch.randn(t.shape[1], generator=g, dtype=torch.float64)
    order = torch.argsort(proj)
    same = (proj[order][1:] == proj[order][:-1]).nonzero().flatten().tolist()
    dup = torch.zeros_like(nonzero)
    for i in same:
        a, b = int(order[i]), int(order[i + 1])
        if bool(nonzero[a]) and torch.equal(t[a], t[b]):
            dup[a] = dup[b] = True
    return near, dup


def embedding_problems(path: str | Path, reference: str | Path | None = None) -> tuple[list[str], int]:
    """(problems, tensors checked): every 2-D embedding-like tensor must be finite, with no all-zero row,
    no near-zero row and no row copied from another (untrained_rows) that is not so in `reference`
    too (a padding token's row is zero in the base already). Rows past the output tokenizer's ids
    (padding, e.g. `tokenizer.pad_to_multiple_of`) are checked for NaN/Inf only."""
    ck = Checkpoint(path)
    ref = Checkpoint(reference) if reference is not None else None
    tokens = tokenizer_length(Path(path))  # rows past the tokenizer are padding, zero on purpose
    problems, checked = [], 0
    for name in ck.tensor_names:
        if not any(h in name for h in EMBEDDING_HINTS) or len(ck.info(name).shape) != 2:
            continue
        checked += 1
        t = ck.get(name, dtype=torch.float32)
        if not bool(torch.isfinite(t).all()):
            problems.append(f"{name}: {int((~torch.isfinite(t)).any(dim=1).sum())} row(s) with NaN/Inf")
        used = t.shape[0] if tokens is None else min(tokens, t.shape[0])
        t = t[:used]  # rows past the tokenizer's ids are padding (zero after pad_to_multiple_of): not looked up
        zero = (t == 0).all(dim=1)
        near, dup = untrained_rows(t)
        ref_shape = ref.info(name).shape if ref is not None and name in ref.tensors else None
        if ref_shape is not None and (ref_shape == ck.info(name).shape or ref_shape[0] == used):
            # the same rows (or the reference's are the output's before padding): what is so there is fine
            r = ref.get(name, dtype=torch.float32)[:used]
            zero &= ~(r == 0).all(dim=1)
            r_near, r_dup = untrained_rows(r)
            near &= ~r_near
            dup &= ~r_dup
        for mask, what in (
            (zero, "all-zero row(s)"),
            (near, f"near-zero row(s) (norm below {NEAR_ZERO:g} x the median row's)"),
            (dup, "row(s) identical to another row"),
        ):
            if bool(mask.any()):
                rows = mask.nonzero().flatten().tolist()
                problems.append(f"{name}: {len(rows)} {what}, e.g. {rows[:5]}")
    return problems, checked


def embeddings_check(spec: RecipeSpec) -> dg.AssetChecksDefinition:
    key = dg.AssetKey(["merged", spec.name])

    reference = spec.base or spec.experts[0]

    @dg.asset_check(
        asset=key,
        name="embeddings_sane",
        description=f"The merged embedding and lm_head matrices hold no NaN/Inf and no untrained-looking "
        f"row: all-zero, near-zero or a copy of another row (other than rows so in {reference.ref} too, "
        "e.g. padding).",
    )
    def _check(context: dg.AssetCheckExecutionContext, merge_dag: MergeDagResource) -> dg.AssetCheckResult:
        ev = context.instance.get_latest_materialization_event(key)
        path = resolve_path(merge_dag.root, ev.asset_materialization.metadata["path"].value)
        # a LoRA expert's folder holds no full checkpoint: its base's rows are the reference
        problems, checked = embedding_problems(path, reference.base if reference.is_adapter else reference.path)
        return dg.AssetCheckResult(
            passed=not problems and checked > 0,
            metadata={
                "tensors_checked": checked,
                "problems": "\n".join(problems) or ("none" if checked else "no embedding tensor found"),
            },
        )

    return _check


def score_checks(project: Project, spec: RecipeSpec) -> list[dg.AssetChecksDefinition]:
    if spec.base is None or spec.base.name not in project.model_evals:
        return []
    key = dg.AssetKey(["eval", "merged", spec.name])
    base_key = ["eval", "model", spec.base.name]
    label, base_label = f"merged/{spec.name}", f"model/{spec.base.name}"

    def table(context, merge_dag) -> ScoreTable | None:
        mine = _latest_info(context, key.path, merge_dag.root)
        base = _latest_info(context, base_key, merge_dag.root)
        if not mine or not base:
            return None
        t = ScoreTable.from_results([{**base, "model": base_label}, {**mine, "model": label}])
        if base_label not in t.scores or label not in t.scores or not t.common_tasks(label, base_label):
            return None  # nothing to compare (e.g. the base's latest eval ran other tasks: a search's report)
        return t

    missing = dg.AssetCheckResult(
        passed=False,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"no evaluation of {base_label} and {label} on a common task to compare yet",
    )

    @dg.asset_check(
        asset=key,
        name="not_below_base",
        additional_deps=[dg.AssetKey(base_key)],
        description=f"The merge's average score (primary metric) is not below {base_label}'s, over "
        "the tasks both were evaluated on (a warning when it is).",
    )
    def _not_below(context: dg.AssetCheckExecutionContext, merge_dag: MergeDagResource) -> dg.AssetCheckResult:
        t = table(context, merge_dag)
        if t is None:
            return missing
        d, se = t.diff(label, base_label)
        return dg.AssetCheckResult(
            passed=d >= 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "average": round(t.average(label), 4),
                "base_average": round(t.average(base_label), 4),
                "delta_vs_base": round(d, 4),
                "delta_se": round(se, 4),
            },
        )

    @dg.asset_check(
        asset=key,
        name="no_task_collapsed",
        additional_deps=[dg.AssetKey(base_key)],
        description=f"No task scores below {COLLAPSE:g} x {base_label}'s score on it.",
    )
    def _collapsed(context: dg.AssetCheckExecutionContext, merge_dag: MergeDagResource) -> dg.AssetCheckResult:
        t = table(context, merge_dag)
        if t is None:
            return missing
        common = t.common_tasks(label, base_label)
        bad = [x for x in common if t.value(label, x) < COLLAPSE * t.value(base_label, x)]
        return dg.AssetCheckResult(
            passed=not bad,
            metadata={
                "collapsed": ", ".join(
                    f"{x} {t.value(label, x):.3f} < {COLLAPSE:g} x {t.value(base_label, x):.3f}" for x in bad
                )
                or "none",
                "tasks": len(common),
            },
        )

    @dg.asset_check(
        asset=dg.AssetKey(["merged", spec.name]),
        name="evaluated_vs_base",
        additional_deps=[key, dg.AssetKey(base_key)],
        description=f"This merge's own evaluation beside {base_label}'s, per task with Δ (runs after "
        "the merge's eval, so the merged page shows the scores of this very build).",
    )
    def _evaluated(context: dg.AssetCheckExecutionContext, merge_dag: MergeDagResource) -> dg.AssetCheckResult:
        t = table(context, merge_dag)
        if t is None:
            return missing
        return dg.AssetCheckResult(passed=True, metadata=score_metadata(t, label, base_label))

    return [_not_below, _collapsed, _evaluated]


def score_metadata(t: ScoreTable, label: str, base_label: str) -> dict:
    """A merge's scores beside the base's: a markdown table per task (value ± SE, base, Δ) and the
    averages and their difference as numbers (so the UI's Plots tab charts them)."""
    from ...core.markdown import md_text

    common = t.common_tasks(label, base_label)
    rows = [
        f"| {md_text(x)} | {t.value(label, x):.3f} ± {t.se(label, x):.3f} | {t.value(base_label, x):.3f} | "
        f"{t.value(label, x) - t.value(base_label, x):+.3f} |"
        for x in common
    ]
    d, se = t.diff(label, base_label)
    table_md = "\n".join(
        [
            "| task | this merge | base | Δ |",
            "|---|---:|---:|---:|",
            *rows,
            f"| **average** | {t.average(label, common):.3f} ± {t.se_average(label, common):.3f} | "
            f"{t.average(base_label, common):.3f} | {d:+.3f} ± {se:.3f}{' ▼' if d < 0 else ''} |",
        ]
    )
    return {
        "scores": dg.MetadataValue.md(table_md),
        "average": round(t.average(label, common), 4),
        "base_average": round(t.average(base_label, common), 4),
        "delta_vs_base": round(d, 4),
        "delta_se": round(se, 4),
    }


def extra_checks(project: Project) -> list[dg.AssetChecksDefinition]:
    out: list[dg.AssetChecksDefinition] = []
    for spec in project.recipes.values():
        out.append(embeddings_check(spec))
        if spec.evals:
            out += score_checks(project, spec)
    return out
