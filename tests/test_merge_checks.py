"""The merged model's checks (merge_dag.dagster.assets) on outputs whose layout differs from the base's
on purpose, and on untrained-looking embedding rows (issue 14, item 4)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_vocab import make_model, ta

from merge_dag.core.checkpoint import Checkpoint
from merge_dag.core.engine import merge
from merge_dag.dagster.assets.checks import embedding_problems, untrained_rows
from merge_dag.dagster.assets.merges import layout_problems

pytestmark = pytest.mark.usefixtures("fp_cache")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    return {
        "tied": False,
        "base": make_model(root / "base", False, 0),
        "chat": make_model(root / "chat", False, 1, ["<|im_start|>", "<|im_end|>"]),
        "e": make_model(root / "e", False, 2),
    }


def test_a_union_output_passes_the_layout_and_embedding_checks(zoo, tmp_path):
    out = tmp_path / "out"
    merge(ta(zoo, ["chat", "e"], tokenizer_source="union"), out)
    assert Checkpoint(out).info("model.embed_tokens.weight").shape[0] == 34
    assert layout_problems(Checkpoint(out), Checkpoint(zoo["base"])) == []
    assert embedding_problems(out, zoo["base"]) == ([], 2)


def test_padding_rows_pass_the_checks_and_are_not_read_as_untrained(zoo, tmp_path):
    out = tmp_path / "out"
    merge(ta(zoo, ["chat", "e"], tokenizer={"source": "union", "pad_to_multiple_of": 64}), out)
    assert Checkpoint(out).info("model.embed_tokens.weight").shape[0] == 64  # 34 tokens + 30 zero rows
    assert layout_problems(Checkpoint(out), Checkpoint(zoo["base"])) == []
    assert embedding_problems(out, zoo["base"]) == ([], 2)
    # a zero row among the tokenizer's ids is still found
    state = load_file(out / "model-00001-of-00001.safetensors")
    state["model.embed_tokens.weight"][33] = 0
    save_file(state, out / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    assert embedding_problems(out, zoo["base"])[0] == ["model.embed_tokens.weight: 1 all-zero row(s), e.g. [33]"]


def test_layout_problems_name_what_the_card_does_not_explain(zoo, tmp_path):
    out = tmp_path / "out"
    merge(ta(zoo, ["e"]), out)
    assert layout_problems(Checkpoint(out), Checkpoint(zoo["base"])) == []
    norm = "model.layers.1.input_layernorm.weight"
    state = load_file(out / "model-00001-of-00001.safetensors")
    del state[norm]
    state["model.embed_tokens.weight"] = torch.zeros(33, 16)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "model.safetensors.index.json").unlink()
    for f in bad.glob("model-*.safetensors"):
        f.unlink()
    save_file(state, bad / "model.safetensors")
    assert layout_problems(Checkpoint(bad), Checkpoint(zoo["base"])) == [
        f"tensor names differ from base: missing [{norm!r}], extra []",
        "model.embed_tokens.weight: shape [33, 16] != base [32, 16]",
    ]
    # missing_tensors: skip records what it left out, so the check expects it
    short = tmp_path / "short"
    shutil.copytree(zoo["e"], short)
    s = load_file(short / "model.safetensors")
    del s[norm]
    save_file(s, short / "model.safetensors", metadata={"format": "pt"})
    recipe = ta(zoo, ["e"], missing_tensors="skip")
    recipe["models"][0]["model"] = str(short)
    merge(recipe, tmp_path / "skipped")
    assert layout_problems(Checkpoint(tmp_path / "skipped"), Checkpoint(zoo["base"])) == []


def test_untrained_looking_rows_are_flagged_unless_the_base_has_them(zoo, tmp_path):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(10, 8, generator=g)
    t[3] = t[7]  # a copied row
    t[5] = 1e-6 * t[5]  # near zero
    t[9] = 0  # zero: reported as such, not as near-zero
    near, dup = untrained_rows(t)
    assert near.nonzero().flatten().tolist() == [5]
    assert dup.nonzero().flatten().tolist() == [3, 7]

    out = tmp_path / "out"
    merge(ta(zoo, ["e"]), out)
    state = load_file(out / "model-00001-of-00001.safetensors")
    emb = state["model.embed_tokens.weight"]
    emb[30] = emb[4]
    emb[31] = 1e-7
    save_file(state, out / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    problems, checked = embedding_problems(out, zoo["base"])
    assert checked == 2
    assert problems == [
        "model.embed_tokens.weight: 1 near-zero row(s) (norm below 0.001 x the median row's), e.g. [31]",
        "model.embed_tokens.weight: 2 row(s) identical to another row, e.g. [4, 30]",
    ]
    # the same rows in the reference are not the merge's doing
    assert embedding_problems(out, out) == ([], 2)
