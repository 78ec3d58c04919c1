"""`merge-dag import`: a GGUF file (written here with the gguf package) into a safetensors folder that
loads in transformers to the same logits as transformers' own loading of the GGUF."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from merge_dag.cli import main  # noqa: E402
from merge_dag.core.gguf_import import GGUFImportError, import_gguf, lineage_ops  # noqa: E402

from _gguf import CHAT_TEMPLATE, write_tiny_gguf  # noqa: E402

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hello the world"}]


def _logits_gguf(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return m(ids).logits


def _ids(tok) -> torch.Tensor:
    return tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


@pytest.mark.parametrize("quant,tie", [("F32", True), ("Q8_0", False)])
def test_import_matches_transformers_gguf_loading(tmp_path, quant, tie):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = write_tiny_gguf(tmp_path / f"tiny-{quant}.gguf", quant=quant, tie=tie)
    out = tmp_path / "imported"
    res = import_gguf(g, out)
    assert not res.reused and res.architecture == "llama"
    assert res.sha256 == hashlib.sha256(g.read_bytes()).hexdigest()
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "merge_dag.json",
    } <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".imported.")]  # no temporaries left

    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is tie
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (2, 64, 2)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert ("lm_head.weight" in keys) is (not tie)  # a tied head is not stored twice
    assert dtypes == {"F32"} and len(keys) == res.tensor_count

    card = json.loads((out / "merge_dag.json").read_text())
    assert card["kind"] == "gguf_import" and card["source"]["sha256"] == res.sha256
    assert card["source"]["path"] == str(g.absolute()) and card["model_fingerprint"] == res.model_fingerprint

    tok_g = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == CHAT_TEMPLATE
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    ids = _ids(tok)
    assert ids.tolist() == _ids(tok_g).tolist()
    assert tok.convert_ids_to_tokens(ids[0, :1].tolist()) == ["<|im_start|>"]  # special tokens stay whole

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        mine = model(ids).logits
    assert torch.equal(mine, _logits_gguf(g, ids))


def test_reimport_is_a_noop_and_earlier_output_is_replaced(tmp_path):
    g1 = write_tiny_gguf(tmp_path / "a.gguf", seed=0)
    g2 = write_tiny_gguf(tmp_path / "b.gguf", seed=1)
    out = tmp_path / "m"
    first = import_gguf(g1, out)
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    again = import_gguf(g1, out)
    assert again.reused and again.model_fingerprint == first.model_fingerprint
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    other = import_gguf(g2, out)  # our own earlier output: replaced by the new import
    assert not other.reused and other.model_fingerprint != first.model_fingerprint
    assert json.loads((out / "merge_dag.json").read_text())["source"]["sha256"] == other.sha256


def test_refuses_a_foreign_nonempty_folder(tmp_path):
    g = write_tiny_gguf(tmp_path / "a.gguf")
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(GGUFImportError) as e:
        import_gguf(g, out)
    assert str(e.value) == (
        f"{out}: folder exists, is not empty and is not an earlier 'merge-dag import' output; "
        "refusing to overwrite it (choose another folder or empty it)"
    )
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_cli_not_a_gguf_file(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf at all")
    assert main(["import", str(bad), str(tmp_path / "out")]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {bad.absolute()}: not a GGUF file (starts with b'PK\\x03\\x04', expected b'GGUF')\n"
    )
    assert not (tmp_path / "out").exists()
    missing = tmp_path / "nope.gguf"
    assert main(["import", str(missing), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {missing.absolute()}: no such file\n"


def test_cli_architecture_transformers_cannot_dequantize(tmp_path, capsys):
    import transformers

    g = write_tiny_gguf(tmp_path / "odd.gguf", arch="nonesuch")
    assert main(["import", str(g), str(tmp_path / "out"), "--no-lineage"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: {g.absolute()}: architecture 'nonesuch' cannot be dequantized by transformers "
        f"{transformers.__version__} (supported: "
    )
    assert "llama" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_records_the_gguf_as_a_source_in_lineage(tmp_path, capsys):
    from merge_dag.lineage.audit import audit
    from merge_dag.lineage.store import LineageStore

    g = write_tiny_gguf(tmp_path / "tiny.gguf")
    sha = hashlib.sha256(g.read_bytes()).hexdigest()
    db = tmp_path / "lineage.duckdb"
    out = tmp_path / "models" / "tiny"
    assert main(["import", str(g), str(out), "--db", str(db)]) == 0
    assert f"sha256 {sha[:16]}" in capsys.readouterr().out

    store = LineageStore(db)
    gguf_rows = store.artifacts("gguf")
    assert [(r["artifact_id"], r["key_hash"], r["path"]) for r in gguf_rows] == [
        (f"gguf-{sha[:16]}", f"sha256:{sha}", str(g.absolute()))
    ]
    card = json.loads((out / "merge_dag.json").read_text())
    model = store.artifact(card["artifact_id"])
    assert (
        model["kind"] == "model"
        and model["key_hash"] == card["model_fingerprint"]
        and model["path"] == str(out.absolute())
    )
    tree = store.provenance(card["artifact_id"])
    assert [(i["role"], i["fingerprint"], i["node"]["kind"]) for i in tree["inputs"]] == [
        ("imported_from", f"sha256:{sha}", "gguf")
    ]
    text = audit(store, str(out))
    assert f"imported_from gguf/tiny.gguf  sha256:{sha}" in text

    # the Dagster model source records the same records from the folder's card (same ids: idempotent)
    ops = lineage_ops(out, name="tiny")
    assert [op for op, _ in ops] == [
        "record_artifact",
        "record_event",
        "record_artifact",
        "record_event",
        "record_edge",
    ]
    assert ops[4][1] == dict(
        parent_id=f"gguf-{sha[:16]}", child_id=card["artifact_id"], role="imported_from", fingerprint=f"sha256:{sha}"
    )
    assert (
        lineage_ops(out, name="tiny", model=False) == ops[:2] + ops[4:]
    )  # the Dagster source records the model itself
    assert lineage_ops(tmp_path) == []  # a folder without an import card: nothing


def test_dagster_model_source_of_an_imported_folder_records_its_gguf(tmp_path):
    """A project whose base and expert are `merge-dag import` folders: the merge's audit ends in the GGUF hashes."""
    import dagster as dg

    from merge_dag.dagster.definitions import ALL_JOB, build_definitions
    from merge_dag.dagster.resources import MergeDagResource
    from merge_dag.lineage.audit import audit
    from merge_dag.lineage.store import LineageStore

    root = tmp_path / "project"
    shas = {}
    for name, seed in (("base", 0), ("expert", 1)):
        g = write_tiny_gguf(tmp_path / f"{name}.gguf", seed=seed)
        shas[name] = hashlib.sha256(g.read_bytes()).hexdigest()
        import_gguf(g, root / "data" / "models" / "tiny" / name)
    (root / "data" / "recipes").mkdir(parents=True)
    (root / "data" / "recipes" / "ta.yaml").write_text(
        "name: ta\nmerge_method: task_arithmetic\nbase_model: data/models/tiny/base\n"
        "models:\n  - model: data/models/tiny/expert\nparameters: {weight: 1.0, lambda: 0.5}\n"
    )
    db = root / "data" / "lineage.duckdb"
    defs = build_definitions(root, resource=MergeDagResource(root=str(root), db_path=str(db)))
    with dg.instance_for_test() as inst:
        assert defs.resolve_job_def(ALL_JOB).execute_in_process(instance=inst).success
    store = LineageStore(db)
    assert {r["key_hash"] for r in store.artifacts("gguf")} == {f"sha256:{s}" for s in shas.values()}
    text = audit(store, "ta")
    for name, sha in shas.items():
        assert f"imported_from gguf/{name}.gguf  sha256:{sha}" in text, text
