"""`merge-dag audit`: print where an artifact came from, as a tree of hashes, parameters and metrics.

    merged/ties  merged-3f2a9c1d7e4b5a60  (2.1 MB, created 2026-11-22 22:51:03 UTC, run 1a2b3c4d)
      method ties   code a1b2c3d4e5f6   params {density: 0.5, weight: 1.0}
      metrics: add/exact_match 0.61 ± 0.03 (n=200), sort/exact_match 0.4 ± 0.035 (n=200)
      ├─ recipe recipe/ties       sha256:...  data/recipes/ties.yaml
      ├─ base   model/ci_base     sha256:...  data/models/ci/base
      └─ expert task_vector/ci_add  <key>  data/artifacts/task_vector/ci_add-...
          ├─ base   model/ci_base  sha256:...
          └─ expert model/ci_add   sha256:...

A merged folder found on disk names its artifact in <folder>/merge_dag.json ("artifact_id"); when the
database has no record of it (another machine, a deleted database) the audit prints what the
folder's merge_dag.json itself holds. Pure: no Dagster.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from ..core.errors import MergeDagError
from .store import SOURCE_KINDS, LineageStore

CARD_FILE = "merge_dag.json"
_RECIPE_SHOWN_ELSEWHERE = {"merge_method", "base_model", "models", "slices", "parameters", "name", "evals"}


# ----------------------------------------------------------------------------------------------
# small formatters
# ----------------------------------------------------------------------------------------------


def _size(n: Optional[int]) -> Optional[str]:
    if n is None:
        return None
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return None


def _when(t: Any) -> Optional[str]:
    if isinstance(t, datetime):
        return t.strftime("%Y-%m-%d %H:%M:%S") + " UTC"
    return None if t is None else str(t)


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if v == v else "nan"
    s = str(v)
    return json.dumps(s) if (not s or any(c in s for c in ",:{}[]#\n\"'") or s != s.strip()) else s


def flow(obj: Any) -> str:
    """Compact YAML flow style: {density: 0.5, weight: [0.3, 0.7]}."""
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(flow(v) for v in obj) + "]"
    return _scalar(obj)


def _show_path(p: Optional[str], root: Optional[Path] = None) -> str:
    if not p:
        return ""
    path = Path(p)
    try:
        shown = str(path.relative_to((root or Path.cwd()).absolute())) if path.is_absolute() else p
    except ValueError:
        shown = p
    return shown if path.exists() else f"{shown} (no longer on disk)"


def _num(v: Any, digits: int) -> str:
    return f"{v:.{digits}g}" if isinstance(v, (int, float)) else str(v)


def _metric(m: dict) -> str:
    s = f"{m['task']}/{m['metric']} {_num(m['value'], 4)}"
    if m.get("stderr") is not None:
        s += f" ± {_num(m['stderr'], 2)}"
    if m.get("n") is not None:
        s += f" (n={m['n']})"
    return s


def _wrap(label: str, items: list[str], indent: str, width: int = 110) -> list[str]:
    lines, cur = [], indent + label
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if i and len(cur) + 1 + len(piece) > width:
            lines.append(cur)
            cur = indent + " " * len(label) + piece
        else:
            cur += (" " if i else "") + piece
    lines.append(cur)
    return lines


def describe_params(params: dict) -> tuple[Optional[str], list[str]]:
    """(method, lines) for an artifact's params; a merge's {'recipe': {...}} is spelled out readably."""
    params = params or {}
    recipe = params.get("recipe") if isinstance(params.get("recipe"), dict) else None
    if recipe is None:
        method = params.get("method") or params.get("merge_method")
        rest = {k: v for k, v in params.items() if k not in ("method", "merge_method")}
        return method, [f"params {flow(rest)}"] if rest else []
    first = [f"params {flow(recipe.get('parameters') or {})}"]
    first += [
        f"{k} {flow(v)}" for k, v in recipe.items() if k not in _RECIPE_SHOWN_ELSEWHERE and v not in (None, [], {})
    ]
    lines = ["   ".join(first)]
    per_model = [f"{m.get('model')} {flow(m['parameters'])}" for m in recipe.get("models") or [] if m.get("parameters")]
    if per_model:
        lines.append("per model: " + "; ".join(per_model))
    for i, sl in enumerate(recipe.get("slices") or []):
        srcs = ", ".join(
            f"{s.get('model')}{list(s.get('layer_range', []))}"
            + (f" {flow(s['parameters'])}" if s.get("parameters") else "")
            for s in sl.get("sources", [])
        )
        lines.append(f"slice {i}: {srcs}" + (f"   params {flow(sl['parameters'])}" if sl.get("parameters") else ""))
    extra = {k: v for k, v in params.items() if k != "recipe"}
    if extra:
        lines.append(f"settings {flow(extra)}")
    return recipe.get("merge_method"), lines


# ----------------------------------------------------------------------------------------------
# the tree
# ----------------------------------------------------------------------------------------------


def _label(node: dict) -> str:
    if node.get("kind"):
        return f"{node['kind']}/{node.get('name', '?')}"
    return node["artifact_id"]


def format_audit(tree: dict) -> str:
    """The text of a provenance tree (LineageStore.provenance)."""
    facts = [
        x
        for x in (
            _size(tree.get("bytes")),
            f"created {_when(tree['created_at'])}" if tree.get("created_at") else None,
            f"run {tree['run_id'][:8]}" if tree.get("run_id") else None,
        )
        if x
    ]
    out = [f"{_label(tree)}  {tree['artifact_id']}" + (f"  ({', '.join(facts)})" if facts else "")]
    method, plines = describe_params(tree.get("params") or {})
    head = [f"method {method}"] if method else []
    if tree.get("code_version") and tree["code_version"] != "-":
        head.append(f"code {tree['code_version']}")
    if plines:
        head.append(plines.pop(0))
    if head:
        out.append("  " + "   ".join(head))
    out += ["  " + line for line in plines]
    out.append(f"  {'fingerprint' if tree.get('kind') in SOURCE_KINDS else 'key'} {tree.get('key_hash')}")
    if tree.get("path"):
        out.append(f"  path {_show_path(tree['path'])}")
    if tree.get("metrics"):
        out += _wrap("metrics: ", [_metric(m) for m in tree["metrics"]], "  ")
    _format_inputs(tree.get("inputs") or [], "  ", out, printed=set())
    return "\n".join(out) + "\n"


def _format_inputs(inputs: list[dict], prefix: str, out: list[str], printed: set[str]) -> None:
    width = max((len(i["role"]) for i in inputs), default=0)
    lwidth = max((len(_label(i["node"])) for i in inputs), default=0)
    for k, inp in enumerate(inputs):
        last = k == len(inputs) - 1
        node = inp["node"]
        fp = inp.get("fingerprint") or node.get("key_hash") or ""
        line = f"{prefix}{'└─' if last else '├─'} {inp['role']:<{width}} {_label(node):<{lwidth}}  {fp}"
        if node.get("missing"):
            line += f"  ({node['artifact_id']}: not in the lineage database)"
        elif node.get("cycle"):
            line += "  (cycle: already on this path)"
        else:
            if node.get("path"):
                line += f"  {_show_path(node['path'])}"
            if node.get("key_hash") and inp.get("fingerprint") and node["key_hash"] != inp["fingerprint"]:
                line += f"  (! the artifact's recorded key is {node['key_hash']})"
        out.append(line.rstrip())
        child_prefix = prefix + ("    " if last else "│   ")
        if node.get("missing") or node.get("cycle") or (node.get("source") and not node.get("inputs")):
            continue
        method, plines = describe_params(node.get("params") or {})
        detail = [f"method {method}"] if method else []
        if node.get("code_version") and node["code_version"] != "-":
            detail.append(f"code {node['code_version']}")
        if plines:
            detail.append(plines.pop(0))
        out += [child_prefix + line for line in (["   ".join(detail)] if detail else []) + plines]
        if node.get("inputs"):
            if node["artifact_id"] in printed:
                out.append(child_prefix + "(inputs as shown above)")
                continue
            printed.add(node["artifact_id"])
            _format_inputs(node["inputs"], child_prefix, out, printed)


def _short(fp: Optional[str], n: int = 12) -> str:
    fp = fp or ""
    prefix, _, rest = fp.rpartition(":")
    return f"{prefix}:{rest[:n]}" if prefix else fp[:n]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _base_metrics(tree: dict) -> dict[tuple[str, str], dict]:
    """The metrics of the tree's base model (its own evaluations), found by role 'base' anywhere below."""
    todo = list(tree.get("inputs") or [])
    while todo:
        inp = todo.pop(0)
        if inp["role"] == "base" and inp["node"].get("metrics"):
            return {(m["task"], m["metric"]): m for m in inp["node"]["metrics"]}
        todo += inp["node"].get("inputs") or []
    return {}


def provenance_markdown(tree: dict, root: Optional[Path] = None) -> str:
    """What `format_audit` prints, as markdown for the Dagster UI: the artifact's facts, method, code
    version and parameters, its evaluation scores with Δ vs the base model's, then every input of
    the provenance tree (one row per edge, depth shown by indentation) with role, name, short
    fingerprint and path relative to `root`; guidance artifacts are the inputs of guidance kinds."""
    facts = [
        x
        for x in (
            _size(tree.get("bytes")),
            f"created {_when(tree['created_at'])}" if tree.get("created_at") else None,
            f"run {tree['run_id'][:8]}" if tree.get("run_id") else None,
        )
        if x
    ]
    method, plines = describe_params(tree.get("params") or {})
    out = [f"**{_label(tree)}** `{tree['artifact_id']}`" + (f" ({', '.join(facts)})" if facts else ""), ""]
    head = [f"method **{method}**"] if method else []
    if tree.get("code_version") and tree["code_version"] != "-":
        head.append(f"code `{tree['code_version']}`")
    out += ["- " + " · ".join(head)] if head else []
    out += [f"- `{line}`" for line in plines]
    out.append(f"- {'fingerprint' if tree.get('kind') in SOURCE_KINDS else 'key'} `{tree.get('key_hash')}`")
    if tree.get("path"):
        out.append(f"- path `{_show_path(tree['path'], root)}`")
    guidance = [i for i in tree.get("inputs") or [] if i["role"] not in ("base", "expert", "model", "recipe", "tasks")]
    if guidance:
        out.append(
            "- guidance: "
            + ", ".join(f"{i['role']} `{_label(i['node'])}` `{_short(i.get('fingerprint'))}`" for i in guidance)
        )
    out.append("")
    base = _base_metrics(tree)
    if tree.get("metrics"):
        out += ["| task | metric | value ± SE | n | base | Δ vs base |", "|---|---|---:|---:|---:|---:|"]
        for m in tree["metrics"]:
            b = base.get((m["task"], m["metric"]))
            se = f" ± {m['stderr']:.3f}" if m.get("stderr") is not None else ""
            delta = f"{m['value'] - b['value']:+.3f}" if b else ""
            if b and m["value"] < b["value"]:
                delta += " ▼"
            out.append(
                f"| {m['task']} | {m['metric']} | {m['value']:.3f}{se} | {m.get('n') or ''} | "
                f"{'' if not b else format(b['value'], '.3f')} | {delta} |"
            )
    else:
        out.append("*no evaluation of this artifact recorded yet* (its eval asset materializes after it)")
    out += ["", "| role | input | fingerprint / key | path |", "|---|---|---|---|"]
    _inputs_rows(tree.get("inputs") or [], 0, out, set(), root)
    return "\n".join(out) + "\n"


def _inputs_rows(inputs: list[dict], depth: int, out: list[str], printed: set[str], root: Optional[Path]) -> None:
    pad = "&nbsp;&nbsp;&nbsp;&nbsp;" * depth + ("└ " if depth else "")
    for inp in inputs:
        node = inp["node"]
        fp = inp.get("fingerprint") or node.get("key_hash") or ""
        note = ""
        if node.get("missing"):
            note = " (not in the lineage database)"
        elif node.get("cycle"):
            note = " (cycle)"
        elif node.get("key_hash") and inp.get("fingerprint") and node["key_hash"] != inp["fingerprint"]:
            note = f" (! recorded key {_short(node['key_hash'])})"
        repeat = node["artifact_id"] in printed and bool(node.get("inputs"))
        out.append(
            f"| {pad}{_cell(inp['role'])} | `{_cell(_label(node))}` | `{_short(fp)}`{note} | "
            f"{_cell(_show_path(node.get('path'), root))}{' (inputs as above)' if repeat else ''} |"
        )
        if node.get("inputs") and not repeat and not node.get("source"):
            printed.add(node["artifact_id"])
            _inputs_rows(node["inputs"], depth + 1, out, printed, root)


def format_card(card: dict, folder: Path, note: str = "") -> str:
    """The text of a merged folder's merge_dag.json, for a folder the lineage database does not know."""
    out = [
        f"{card.get('name') or (card.get('recipe') or {}).get('name') or folder.name}  "
        f"{card.get('artifact_id') or '(no artifact id)'}  ({folder}, from its {CARD_FILE})"
    ]
    if note:
        out.append(f"  {note}")
    method, plines = describe_params({"recipe": card["recipe"]} if isinstance(card.get("recipe"), dict) else {})
    head = [f"method {card.get('method') or method}"]
    if card.get("code_version"):
        head.append(f"code {card['code_version']}")
    if card.get("merge_dag_version"):
        head.append(f"merge_dag {card['merge_dag_version']}")
    out.append("  " + "   ".join(head))
    out += ["  " + line for line in plines]
    extra = [f"{k} {card[k]}" for k in ("out_dtype", "tensor_count", "seed") if card.get(k) is not None]
    if extra:
        out.append("  " + "   ".join(extra))
    if card.get("recipe_file"):
        out.append(f"  recipe file {_show_path(str(card['recipe_file']))}")
    inputs = card.get("inputs") or []
    width = max((len(str(i.get("role", ""))) for i in inputs), default=0)
    lwidth = max((len(str(i.get("model", "?"))) for i in inputs), default=0)
    for k, i in enumerate(inputs):
        branch = "└─" if k == len(inputs) - 1 else "├─"
        out.append(
            f"  {branch} {str(i.get('role', '?')):<{width}} {str(i.get('model', '?')):<{lwidth}}"
            f"  {i.get('fingerprint', '')}"
            f"  {_show_path(i.get('path'))}".rstrip()
        )
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------


def read_card(path: str | os.PathLike) -> Optional[tuple[Path, dict]]:
    """(folder, merge_dag.json contents) when `path` is a merged folder or its merge_dag.json."""
    p = Path(path).expanduser()
    card = p / CARD_FILE if p.is_dir() else p if p.name == CARD_FILE else None
    if card is None or not card.is_file():
        return None
    try:
        data = json.loads(card.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MergeDagError(f"{card}: not readable JSON ({e})") from None
    return (card.parent, data) if isinstance(data, dict) else None


def _db_label(store: LineageStore) -> str:
    try:
        return str(store.path.relative_to(Path.cwd()))
    except ValueError:
        return str(store.path)


def resolve(store: LineageStore, path_or_name: str | os.PathLike) -> tuple[Optional[dict], Optional[tuple[Path, dict]]]:
    """(artifact row or None, (folder, merge_dag.json) or None) for what the user named."""
    found = read_card(path_or_name)
    if found is not None:
        folder, card = found
        aid = card.get("artifact_id")
        row = store.artifact(aid) if isinstance(aid, str) else None
        if row is None:
            row = store.find(folder)  # a folder merged without an id, recorded by path
        return row, found
    return store.find(path_or_name), None


def audit(store_or_path: LineageStore | str | os.PathLike, path_or_name: str | os.PathLike) -> str:
    """The audit text of an artifact given by path, name, id or id prefix; see the module docstring."""
    store = store_or_path if isinstance(store_or_path, LineageStore) else LineageStore(store_or_path)
    row, found = resolve(store, path_or_name)
    if row is not None:
        text = format_audit(store.provenance(row["artifact_id"]))
        if found is not None and row.get("path"):
            here, recorded = found[0].resolve(), Path(row["path"]).resolve()
            if here != recorded:
                text += f"  note: {found[0]} is a copy; the artifact was recorded at {row['path']}\n"
        return text
    if found is not None:
        folder, card = found
        aid = card.get("artifact_id")
        where = _db_label(store) + ("" if store.path.exists() else " (no such file)")
        note = (
            f"no record of {aid} in {where}; shown from the folder's {CARD_FILE}"
            if aid
            else f"{CARD_FILE} names no artifact id (merged outside the pipeline); not in {where}"
        )
        return format_card(card, folder, note)
    if not store.path.exists():
        raise MergeDagError(
            f"no artifact matches {str(path_or_name)!r}: there is no lineage database at "
            f"{_db_label(store)} (materialize something first, or pass --db / set MERGE_DAG_DB)"
        )
    known = store.names("merged")
    raise MergeDagError(
        f"no artifact matches {str(path_or_name)!r} in {_db_label(store)}; known merged models: "
        + (", ".join(known[:20]) + (" ..." if len(known) > 20 else "") if known else "none")
    )
