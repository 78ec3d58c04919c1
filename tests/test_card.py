"""The model card (README.md of a merged model): the method's reference comes from its class."""

from merge_dag.core.card import build_card, card_files, method_reference
from merge_dag.core.methods import METHODS


def card_for(method: str) -> dict:
    inputs = [
        {"role": "base", "model": "b", "path": "/b", "fingerprint": "sha256:00"},
        {"role": "model", "model": "e", "path": "/e", "fingerprint": "sha256:11"},
    ]
    return build_card(method, {"merge_method": method}, "r.yaml", inputs, "bfloat16", 0, "b", 3, {"name": "x"})


def test_the_card_cites_the_methods_reference_url():
    readme = card_files(card_for("ties"))["README.md"]
    assert "Method reference: <https://arxiv.org/abs/2306.01708>" in readme
    assert method_reference("ties") == METHODS["ties"].reference_url


def test_no_reference_line_for_a_method_without_one():
    for method in ("passthrough", "regmean"):  # no paper of its own; not a registered method
        assert method_reference(method) == ""
        assert "Method reference" not in card_files(card_for(method))["README.md"]


def test_card_keys_keep_their_order():
    assert list(card_for("ties")) == [
        "merge_dag_version",
        "code_version",
        "method",
        "recipe",
        "recipe_file",
        "inputs",
        "out_dtype",
        "seed",
        "tokenizer_source",
        "tensor_count",
        "name",
    ]


# ---- Hub-ready front matter (issue 14, item 6) ----------------------------------------------------


def front(readme: str) -> dict:
    """The YAML front matter of a README.md, parsed."""
    import yaml

    assert readme.startswith("---\n")
    head, sep, _ = readme[4:].partition("\n---\n")
    assert sep
    return yaml.safe_load(head)


def test_front_matter_carries_the_hub_fields():
    card = card_for("ties")
    card["recipe"] = {"merge_method": "ties", "base_model": "b", "models": [{"model": "e"}], "parameters": {"x": 1}}
    fm = front(card_files(card)["README.md"])
    assert fm["library_name"] == "transformers"
    assert fm["base_model"] == ["b", "e"]
    assert fm["base_model_relation"] == "merge"
    assert fm["tags"] == ["merge", "mergekit-compatible", "merge_dag", "ties"]
    assert fm["merge_dag"]["method"] == "ties"
    assert fm["merge_dag"]["recipe"] == card["recipe"]
    assert fm["merge_dag"]["inputs"] == [
        {"role": "base", "model": "b", "fingerprint": "sha256:00"},
        {"role": "model", "model": "e", "fingerprint": "sha256:11"},
    ]
    assert "model-index" not in fm


def test_base_model_lists_the_inputs_base_first_and_hub_ids_from_the_cache_layout():
    from merge_dag.core.card import hub_id

    inputs = [
        {"role": "model", "model": "x", "path": "/hf/hub/models--org--math-7b/snapshots/abc123", "fingerprint": "f1"},
        {"role": "base", "model": "org/base-7b", "path": "/m/base", "fingerprint": "f0"},
        {"role": "model", "model": "org/base-7b+ad", "path": "/m/ad", "adapter": "/m/ad", "fingerprint": "f2"},
    ]
    card = build_card("linear", {"merge_method": "linear"}, "r.yaml", inputs, "bfloat16", 0, None, 3)
    assert front(card_files(card)["README.md"])["base_model"] == ["org/base-7b", "org/math-7b", "ad"]
    assert hub_id({"model": "m", "path": "/c/models--a--b/snapshots/r/"}) == "a/b"
    # no base: every input, in order
    inputs = [{**i, "role": "model"} for i in inputs[:2]]
    card = build_card("linear", {"merge_method": "linear"}, "r.yaml", inputs, "bfloat16", 0, None, 3)
    assert front(card_files(card)["README.md"])["base_model"] == ["org/math-7b", "org/base-7b"]


def test_user_strings_cannot_break_out_of_the_front_matter():
    card = card_for("ties")
    card["inputs"][1]["model"] = "e\n---\nevil: true\n"
    card["recipe"] = {"merge_method": "ties", "name": "x\n---\n# injected"}
    readme = card_files(card)["README.md"]
    fm = front(readme)
    assert "evil" not in fm and fm["base_model"][1] == "e\n---\nevil: true\n"
    assert fm["merge_dag"]["recipe"]["name"] == "x\n---\n# injected"


def test_eval_results_become_a_model_index():
    from merge_dag.core.card import EVAL_SOURCE, with_eval_results

    card = with_eval_results(
        card_for("ties"),
        [
            {"task": "zoo_sort", "metric": "acc", "value": 0.5, "stderr": 0.01, "n": 100, "model": "m"},
            {"task": "zoo_arev", "metric": "exact_match", "value": 0.25, "stderr": None, "n": 80},
            {"task": "zoo_arev", "metric": "acc", "value": 0.75, "stderr": None, "n": 80},
        ],
    )
    readme = card_files(card)["README.md"]
    fm = front(readme)
    assert fm["model-index"] == [
        {
            "name": "x",
            "results": [
                {
                    "task": {"type": "text-generation", "name": "Text Generation"},
                    "dataset": {"name": "zoo_arev", "type": "zoo_arev"},
                    "metrics": [
                        {"type": "acc", "value": 0.75, "name": "acc", "verified": False},
                        {"type": "exact_match", "value": 0.25, "name": "exact_match", "verified": False},
                    ],
                    "source": {"name": EVAL_SOURCE},
                },
                {
                    "task": {"type": "text-generation", "name": "Text Generation"},
                    "dataset": {"name": "zoo_sort", "type": "zoo_sort"},
                    "metrics": [{"type": "acc", "value": 0.5, "name": "acc", "verified": False}],
                    "source": {"name": EVAL_SOURCE},
                },
            ],
        }
    ]
    assert "| zoo\\_sort | acc | 0.5000 | 0.0100 | 100 |" in readme


def _merged(tmp_path, family):
    from merge_dag.core.engine import merge

    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(family["base"]),
        "models": [{"model": str(family["e0"])}, {"model": str(family["e1"])}],
        "parameters": {"weight": 0.5},
        "name": "ta-card",
    }
    return merge(recipe, tmp_path / "out")


def test_a_merge_writes_the_front_matter_with_its_inputs_fingerprints(tmp_path, family, fp_cache):
    res = _merged(tmp_path, family)
    fm = front((res.out_dir / "README.md").read_text())
    assert fm["base_model"] == [str(family["base"]), str(family["e0"]), str(family["e1"])]
    assert fm["base_model_relation"] == "merge"
    assert fm["tags"] == ["merge", "mergekit-compatible", "merge_dag", "task_arithmetic"]
    assert {i["model"]: i["fingerprint"] for i in fm["merge_dag"]["inputs"]} == res.fingerprints
    assert all(fp.startswith("sha256:") for fp in res.fingerprints.values())
    assert fm["merge_dag"]["recipe"]["parameters"] == {"weight": 0.5}


def test_merge_dag_card_adds_the_lineage_evals_as_model_index(tmp_path, family, fp_cache):
    import json

    from merge_dag.cli import main
    from merge_dag.core.checkpoint import Checkpoint
    from merge_dag.core.fingerprint import checkpoint_fingerprint
    from merge_dag.lineage.batch import Batch
    from merge_dag.lineage.store import LineageStore

    res = _merged(tmp_path, family)
    db = tmp_path / "lineage.duckdb"
    common = dict(bytes=None, code_version="c", params={}, run_id="r")
    LineageStore(db).write(
        Batch()
        .artifact(artifact_id="merged-1", kind="merged", name="ta-card", key_hash="k1", path=res.out_dir, **common)
        .artifact(artifact_id="eval-1", kind="eval", name="merged_ta-card", key_hash="k2", path=None, **common)
        .edge(parent_id="merged-1", child_id="eval-1", role="model", fingerprint="k1")
        .metric(artifact_id="eval-1", task="zoo_sort", metric="acc", value=0.625, stderr=0.05, n=64)
    )
    before = checkpoint_fingerprint(Checkpoint(res.out_dir))
    assert main(["card", str(res.out_dir), "--db", str(db)]) == 0
    fm = front((res.out_dir / "README.md").read_text())
    [result] = fm["model-index"][0]["results"]
    assert fm["model-index"][0]["name"] == "ta-card"
    assert result["dataset"] == {"name": "zoo_sort", "type": "zoo_sort"}
    assert result["metrics"] == [{"type": "acc", "value": 0.625, "name": "acc", "verified": False}]
    card = json.loads((res.out_dir / "merge_dag.json").read_text())
    assert card["eval_results"] == [{"task": "zoo_sort", "metric": "acc", "value": 0.625, "stderr": 0.05, "n": 64}]
    assert fm["base_model_relation"] == "merge"  # the rest of the front matter is kept
    assert checkpoint_fingerprint(Checkpoint(res.out_dir)) == before  # tensors and config untouched
    assert sorted(p.name for p in res.out_dir.iterdir() if p.name.startswith(".")) == []


def test_merge_dag_card_on_a_folder_that_is_no_merge_is_one_line(tmp_path, capsys):
    from merge_dag.cli import main

    (tmp_path / "x").mkdir()
    assert main(["card", str(tmp_path / "x"), "--db", str(tmp_path / "none.duckdb")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no merged folder with a merge_dag.json" in err
