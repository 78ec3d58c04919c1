"""The record a merged model carries: merge_dag.json (machine-readable) and README.md (the model card).

One builder for every merge: the engine's, RegMean's (written outside the engine) and AIM's (the
engine's card plus its settings) all go through `build_card` and `card_files`, so the two files
have one format.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from .. import __version__
from .fingerprint import checkpoint_fingerprint
from .lora import LoraCheckpoint
from .markdown import md_text
from .version import merge_code_version


def build_card(
    method: str,
    recipe: dict,
    recipe_file: str,
    inputs: list[dict],
    out_dtype: str,
    seed: int,
    tokenizer_source: Optional[str],
    tensor_count: int,
    extra: Optional[dict[str, Any]] = None,
) -> dict:
    """The card of a merged model (merge_dag.json); `inputs`: one `card_input` per input, in order."""
    return {
        "merge_dag_version": __version__,
        "code_version": merge_code_version(),
        "method": method,
        "recipe": recipe,
        "recipe_file": recipe_file,
        "inputs": inputs,
        "out_dtype": out_dtype,
        "seed": seed,
        "tokenizer_source": tokenizer_source,
        "tensor_count": tensor_count,
        **(extra or {}),
    }


def card_input(ck, role: str, fingerprint: str) -> dict:
    """One input of the card: its role, name, resolved path and content fingerprint."""
    out = {"role": role, "model": ck.name, "path": str(ck.path.resolve()), "fingerprint": fingerprint}
    if isinstance(ck, LoraCheckpoint):  # base + adapter: both, with the base's own fingerprint
        out.update(
            adapter=str(ck.adapter_dir.resolve()),
            base_path=str(ck.base.path.resolve()),
            base_fingerprint=checkpoint_fingerprint(ck.base),
        )
    return out


def card_files(card: dict) -> dict[str, str]:
    """File name -> text of the two files that carry `card`."""
    return {"merge_dag.json": json.dumps(card, indent=2) + "\n", "README.md": model_card(card)}


def write_card(folder: str | Path, card: dict) -> None:
    """(Re)write merge_dag.json and the model card README.md of a finished folder not yet in place
    (post-processing steps such as AIM, or merges written outside the engine such as RegMean)."""
    for name, text in card_files(card).items():
        (Path(folder) / name).write_text(text)


def method_reference(method: str) -> str:
    """The paper or page a registered merge method follows (its class's reference_url), else ""."""
    from .methods.registry import METHODS

    m = METHODS.get(method)
    return m.reference_url if m is not None else ""


def _fence(body: str) -> str:
    """A backtick fence longer than any backtick run in `body`, so nothing inside can close it."""
    longest = max((len(m) for m in re.findall(r"`+", body)), default=0)
    return "`" * max(3, longest + 1)


_HUB_CACHE = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")


def hub_id(inp: dict) -> str:
    """The name a card's `base_model` gives one input: `org/name` for a folder in the Hugging Face
    cache layout (`.../models--org--name/snapshots/<rev>`), else the name the recipe gives it (a
    LoRA expert `base+adapter`: its adapter's). Name inputs by their hub id in the recipe, as with
    mergekit, for the hub to link them."""
    path = str(inp.get("adapter") or inp.get("path") or "")
    m = _HUB_CACHE.search(path)
    if m:
        return f"{m[1]}/{m[2]}"
    name = str(inp["model"])
    return name.split("+", 1)[1] if inp.get("adapter") and "+" in name else name


def front_matter(card: dict) -> dict:
    """The Hugging Face metadata of a merged model's card (the YAML front matter of its README.md):

    - `base_model`: every input (the base first), as `hub_id` names it; `base_model_relation: merge`;
    - `tags`: merge, mergekit-compatible (the recipe is mergekit's YAML), merge_dag, the method;
    - `merge_dag`: version, method, the recipe, and each input's role, name and content fingerprint
      (`sha256:` hash tree over tensor names, dtypes, shapes, bytes and config.json);
    - `model-index`: the lm-eval results, when the card carries them (`eval_results`, added by
      `merge-dag card` from lineage; see `with_eval_results`)."""
    inputs = sorted(card["inputs"], key=lambda i: i["role"] != "base")  # stable: the base first
    front: dict[str, Any] = {
        "library_name": "transformers",
        "base_model": list(dict.fromkeys(hub_id(i) for i in inputs)),
        "base_model_relation": "merge",
        "tags": list(dict.fromkeys(["merge", "mergekit-compatible", "merge_dag", str(card["method"])])),
        "merge_dag": {
            "version": str(card["merge_dag_version"]),
            "method": str(card["method"]),
            "recipe": card["recipe"],
            "inputs": [
                {"role": str(i["role"]), "model": str(i["model"]), "fingerprint": str(i["fingerprint"])}
                for i in card["inputs"]
            ],
        },
    }
    if card.get("artifact_id"):
        front["merge_dag"]["artifact_id"] = str(card["artifact_id"])
    if card.get("eval_results"):
        front["model-index"] = model_index(card_title(card), card["eval_results"])
    return front


def card_title(card: dict) -> str:
    return str(card.get("name") or card["recipe"].get("name") or "merged model")


EVAL_SOURCE = "lm-evaluation-harness, run by merge_dag (lineage)"


def model_index(name: str, results: list[dict]) -> list[dict]:
    """Hugging Face `model-index` from lm-eval results [{task, metric, value, stderr?, n?}]: one
    result per task (dataset type and name: the lm-eval task), one metric entry per metric."""
    by_task: dict[str, list[dict]] = {}
    for r in results:
        by_task.setdefault(str(r["task"]), []).append(r)
    out = []
    for task, rows in by_task.items():
        out.append(
            {
                "task": {"type": "text-generation", "name": "Text Generation"},
                "dataset": {"name": task, "type": task},
                "metrics": [
                    {"type": str(r["metric"]), "value": float(r["value"]), "name": str(r["metric"]), "verified": False}
                    for r in rows
                ],
                "source": {"name": EVAL_SOURCE},
            }
        )
    return [{"name": name, "results": out}]


def with_eval_results(card: dict, metrics: list[dict]) -> dict:
    """The card with `eval_results`: [{task, metric, value, stderr, n}] (sorted by task and metric;
    the keys lineage records per metric), which the front matter turns into `model-index`."""
    rows = [
        {k: m.get(k) for k in ("task", "metric", "value", "stderr", "n")}
        for m in sorted(metrics, key=lambda m: (str(m["task"]), str(m["metric"])))
        if isinstance(m.get("value"), (int, float)) and not isinstance(m.get("value"), bool)
    ]
    return {**card, "eval_results": rows}


def model_card(card: dict) -> str:
    """The README.md of a merged model: Hugging Face front matter (`front_matter`), then the card.
    Every user string (names, paths, parameters) is escaped (md_text), sits in a code fence it
    cannot close, or in the YAML front matter (yaml.safe_dump quotes it)."""
    import yaml

    front = front_matter(card)
    title = card_title(card)
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {md_text(title)}",
        "",
        f"Merged by merge_dag {md_text(card['merge_dag_version'])} (code version {md_text(card['code_version'])}) "
        f"with the **{md_text(card['method'])}** method, written as {md_text(card['out_dtype'])}.",
    ]
    reference = method_reference(str(card["method"]))
    if reference:
        lines += ["", f"Method reference: <{reference}>"]
    if card.get("artifact_id"):
        aid = md_text(card["artifact_id"])
        lines += ["", f"Artifact id: <code>{aid}</code> (trace it with <code>merge-dag audit {aid}</code>)."]
    lines += ["", "## Inputs", "", "| role | model | content fingerprint |", "|---|---|---|"]
    for i in card["inputs"]:
        lines.append(
            f"| {md_text(i['role'])} | <code>{md_text(i['model'])}</code> | <code>{md_text(i['fingerprint'])}</code> |"
        )
    voc = card.get("vocabulary")
    if voc:
        added = voc.get("union_added_tokens") or []
        pad = voc.get("padding_rows") or 0
        size = f"{md_text(voc.get('size'))} tokens" if not pad else f"{md_text(voc['size'] - pad)} tokens and {pad} "
        size += "zero padding rows (`tokenizer.pad_to_multiple_of`)" if pad else ""
        lines += [
            "",
            "## Vocabulary",
            "",
            f"{size}; embedding rows mapped by token in "
            + ", ".join(f"<code>{md_text(n)}</code>" for n in voc.get("tensors", []))
            + (f"; `tokenizer_source: union` added {len(added)} token(s): " if added else "")
            + ", ".join(f"<code>{md_text(t)}</code>" for t in added),
        ]
    if card.get("skipped_tensors"):
        lines += ["", "## Tensors left out (`missing_tensors: skip`)", ""]
        lines += [f"- <code>{md_text(n)}</code>" for n in card["skipped_tensors"]]
    if card.get("base_stand_ins"):
        lines += ["", "## Tensors read from the base for models that lack them (`missing_tensors: base`)", ""]
        lines += [
            f"- <code>{md_text(n)}</code>: {', '.join(f'<code>{md_text(m)}</code>' for m in models)}"
            for n, models in card["base_stand_ins"].items()
        ]
    if card.get("eval_results"):
        lines += ["", "## Evaluation (lm-eval)", "", "| task | metric | value | stderr | n |", "|---|---|---|---|---|"]
        for r in card["eval_results"]:
            err = "" if r.get("stderr") is None else f"{r['stderr']:.4f}"
            n = "" if r.get("n") is None else md_text(r["n"])
            lines.append(f"| {md_text(r['task'])} | {md_text(r['metric'])} | {r['value']:.4f} | {err} | {n} |")
    recipe_text = yaml.safe_dump(card["recipe"], sort_keys=False).strip()
    fence = _fence(recipe_text)
    lines += [
        "",
        "## Recipe (method and all parameters)",
        "",
        f"{fence}yaml",
        recipe_text,
        fence,
        "",
        "Fingerprints are sha256 hash trees over tensor names, dtypes, shapes and bytes plus "
        "config.json (see merge_dag/core/fingerprint.py). Machine-readable provenance: merge_dag.json.",
        "",
    ]
    return "\n".join(lines)
