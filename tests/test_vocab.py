"""Vocabularies (issue 14, item 4): experts with added tokens or padded vocabularies merge by token.

Tiny Llama models with tiny word-level tokenizers, all made here (the tokenizers library; nothing is
downloaded): a base with 32 tokens, an expert that added `<|im_start|>` and `<|im_end|>` (34 rows),
one that added `<|im_end|>` and `<tool>` (34 rows, `<|im_end|>` at another id), and one whose
embedding is padded to 40 rows past its 32-token tokenizer. The merged rows are checked against
mergekit's documented per-token rule (an input that lacks a token contributes the base's row where
the base has it, else the one model's that has it, else the mean of the models that have it), and
the output's tokenizer, config vocab_size and embedding rows agree and reload with transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merge_dag.core.checkpoint import Checkpoint
from merge_dag.core.engine import merge
from merge_dag.core.errors import MergeInputError

pytestmark = pytest.mark.usefixtures("fp_cache")

WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(29)]  # 32 tokens


def make_tokenizer(added: list[str] = ()):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if added:
        fast.add_tokens(list(added), special_tokens=True)
    return fast


def make_model(folder: Path, tied: bool, seed: int, added: list[str] = (), rows: int | None = None) -> Path:
    """Base weights (seed 0) + 0.02 N(0,1) deltas (seed `seed`, none for seed 0); `added` tokens get
    fresh random rows; `rows` pads the embedding past the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if seed:
            for _, p in model.named_parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        tok = make_tokenizer(added)
        size = rows or len(tok)
        if size != 32:
            model.resize_token_embeddings(size, mean_resizing=False)
            for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
                emb.weight[32:] = torch.randn(emb.weight[32:].shape, generator=g)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def zoo(request, tmp_path_factory):
    tied = request.param
    root = tmp_path_factory.mktemp("vocab")
    return {
        "tied": tied,
        "base": make_model(root / "base", tied, 0),
        "chat": make_model(root / "chat", tied, 1, ["<|im_start|>", "<|im_end|>"]),
        "tool": make_model(root / "tool", tied, 2, ["<|im_end|>", "<tool>"]),
        "padded": make_model(root / "padded", tied, 3, rows=40),
    }


def rows(folder: Path, name: str = "model.embed_tokens.weight") -> torch.Tensor:
    return Checkpoint(folder).get(name).to(torch.float32)


def ids(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def ta(zoo, models: list[str], **extra) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo[m]), "parameters": {"weight": w}} for m, w in zip(models, (0.7, 0.5))],
        "parameters": {"lambda": 0.9},
        "dtype": "float32",
        **extra,
    }


def check_agrees(out: Path, tied: bool) -> int:
    """Tokenizer length == config vocab_size == embedding rows (== lm_head rows); reloads; tied stays tied."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    cfg = json.loads((out / "config.json").read_text())
    ck = Checkpoint(out)
    n = ck.info("model.embed_tokens.weight").shape[0]
    assert len(tok) == cfg["vocab_size"] == n
    assert ("lm_head.weight" in ck.tensors) == (not tied)
    if not tied:
        assert ck.info("lm_head.weight").shape[0] == n
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == n
    if tied:
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    return n


def test_union_maps_rows_by_token_with_the_documented_defaults(zoo, tmp_path):
    out = tmp_path / "out"
    res = merge(ta(zoo, ["chat", "tool"], tokenizer_source="union"), out)
    vb, vc, vt, vo = ids(zoo["base"]), ids(zoo["chat"]), ids(zoo["tool"]), ids(out)
    assert check_agrees(out, zoo["tied"]) == 35
    # the base's ids are kept; the new tokens follow in input order
    assert all(vo[w] == vb[w] for w in WORDS)
    assert [vo["<|im_start|>"], vo["<|im_end|>"], vo["<tool>"]] == [32, 33, 34]
    assert res.card["vocabulary"]["union_added_tokens"] == ["<|im_start|>", "<|im_end|>", "<tool>"]
    readme = (out / "README.md").read_text()
    assert "## Vocabulary\n\n35 tokens; embedding rows mapped by token in <code>" in readme
    assert "added 3 token(s): <code>&lt;\\|im\\_start\\|&gt;</code>" in readme
    names = ["model.embed_tokens.weight"] + ([] if zoo["tied"] else ["lm_head.weight"])
    for name in names:
        B, C, T, M = (rows(f, name) for f in (zoo["base"], zoo["chat"], zoo["tool"], out))

        def ta_row(b, c, t):
            return b + 0.9 * (0.7 * (c - b) + 0.5 * (t - b))

        for w in WORDS:  # every input has it
            torch.testing.assert_close(M[vo[w]], ta_row(B[vb[w]], C[vc[w]], T[vt[w]]), rtol=0, atol=1e-6)
        # only chat has it: base and tool contribute chat's row, so the merge gives chat's row
        c = C[vc["<|im_start|>"]]
        torch.testing.assert_close(M[vo["<|im_start|>"]], ta_row(c, c, c), rtol=0, atol=1e-6)
        # only tool has it
        t = T[vt["<tool>"]]
        torch.testing.assert_close(M[vo["<tool>"]], t, rtol=0, atol=1e-6)
        # chat and tool have it (at different ids), the base not: the base contributes their mean
        c, t = C[vc["<|im_end|>"]], T[vt["<|im_end|>"]]
        torch.testing.assert_close(M[vo["<|im_end|>"]], ta_row((c + t) / 2, c, t), rtol=0, atol=1e-6)
    # the union tokenizer encodes the added tokens to their ids
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.encode("w3 <|im_start|> w4 <tool>", add_special_tokens=False) == [vo["w3"], 32, vo["w4"], 34]


def test_tokenizer_source_base_keeps_the_base_vocabulary(zoo, tmp_path):
    out = tmp_path / "out"
    merge(ta(zoo, ["chat", "tool"]), out)  # default tokenizer_source: base
    assert check_agrees(out, zoo["tied"]) == 32
    B, C, T, M = rows(zoo["base"]), rows(zoo["chat"]), rows(zoo["tool"]), rows(out)
    torch.testing.assert_close(M, B + 0.9 * (0.7 * (C[:32] - B) + 0.5 * (T[:32] - B)), rtol=0, atol=1e-6)
    assert (out / "tokenizer.json").read_bytes() == (zoo["base"] / "tokenizer.json").read_bytes()


def test_a_padded_vocabulary_merges_by_token(zoo, tmp_path):
    out = tmp_path / "out"
    res = merge(ta(zoo, ["padded", "chat"]), out)
    assert check_agrees(out, zoo["tied"]) == 32
    B, P, C, M = rows(zoo["base"]), rows(zoo["padded"]), rows(zoo["chat"]), rows(out)
    torch.testing.assert_close(M, B + 0.9 * (0.7 * (P[:32] - B) + 0.5 * (C[:32] - B)), rtol=0, atol=1e-6)
    assert res.card["vocabulary"]["size"] == 32
    # a padded input's padding rows are never read: a union over base + padded is the base's 32 tokens
    out2 = tmp_path / "out2"
    merge(ta(zoo, ["padded"], tokenizer_source="union"), out2)
    assert check_agrees(out2, zoo["tied"]) == 32


def test_differing_vocabularies_need_every_inputs_tokenizer(zoo, tmp_path):
    import shutil

    e = tmp_path / "e"
    shutil.copytree(zoo["padded"], e)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (e / f).unlink()
    recipe = ta(zoo, ["chat"]) | {
        "models": [
            {"model": str(e), "parameters": {"weight": 1.0}},
            {"model": str(zoo["chat"]), "parameters": {"weight": 1.0}},
        ]
    }
    with pytest.raises(MergeInputError, match=r"model '.*/e': its tokenizer \(in .*\) does not load"):
        merge(recipe, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_the_dry_run_plan_names_the_vocabulary(zoo):
    from merge_dag.core.plan import plan_merge
    from merge_dag.core.recipe import parse_recipe

    plan = plan_merge(parse_recipe(ta(zoo, ["chat", "tool"], tokenizer_source="union")))
    mapped = "model.embed_tokens.weight" if zoo["tied"] else "lm_head.weight, model.embed_tokens.weight"
    assert f"vocabulary: 35 tokens (union added 3); rows mapped by token in {mapped}" in plan.describe()
    assert plan.config["vocab_size"] == 35
    same = plan_merge(parse_recipe(ta(zoo, ["padded"]) | {"tokenizer_source": str(zoo["padded"])}))
    assert same.vocab is not None and same.vocab.size == 40  # the source's rows, its padding included


def test_equal_rows_but_ids_meaning_other_tokens_are_mapped(zoo, tmp_path):
    """chat and tool both have 34 rows, but id 32 is <|im_start|> in one and <|im_end|> in the other."""
    out = tmp_path / "out"
    merge(ta(zoo, ["tool"]) | {"base_model": str(zoo["chat"])}, out)  # the base (chat) vocabulary
    assert check_agrees(out, zoo["tied"]) == 34
    vc, vt = ids(zoo["chat"]), ids(zoo["tool"])
    C, T, M = rows(zoo["chat"]), rows(zoo["tool"]), rows(out)
    end = vc["<|im_end|>"]
    torch.testing.assert_close(M[end], C[end] + 0.9 * 0.7 * (T[vt["<|im_end|>"]] - C[end]), rtol=0, atol=1e-6)
    start = vc["<|im_start|>"]  # tool lacks it: it contributes the base's row, a zero task vector
    torch.testing.assert_close(M[start], C[start], rtol=0, atol=1e-6)


def test_identical_tokenizers_load_nothing(zoo, tmp_path, monkeypatch):
    import merge_dag.core.vocab as vocab

    e = make_model(tmp_path / "e", zoo["tied"], 5)  # the base's tokenizer, 32 rows
    monkeypatch.setattr(vocab, "load_tokenizer", lambda *a: pytest.fail("a tokenizer was loaded"))
    recipe = ta(zoo, ["chat"])
    recipe["models"] = [{"model": str(e), "parameters": {"weight": 1.0}}]
    res = merge(recipe, tmp_path / "out")
    assert "vocabulary" not in res.card


def test_cached_task_vectors_give_the_same_merge(zoo, tmp_path):
    """The Dagster layer reads experts as base + cached task vector: a task vector covers the tensors
    the expert shares with the base (embedding rows over another vocabulary are left out), and the
    merge reads the expert itself for the rest, so the output is the same bytes."""
    from merge_dag.core.merge import execute
    from merge_dag.core.plan import plan_merge
    from merge_dag.core.recipe import parse_recipe
    from merge_dag.core.task_vector import compute_task_vector

    tvs = {}
    for m in ("chat", "tool"):
        r = compute_task_vector(zoo["base"], zoo[m], tmp_path / f"tv-{m}")
        assert sorted(r.left_out) == ([] if zoo["tied"] else ["lm_head.weight"]) + ["model.embed_tokens.weight"]
        tvs[str(zoo[m])] = tmp_path / f"tv-{m}"
    recipe = ta(zoo, ["chat", "tool"], tokenizer_source="union")
    direct = merge(recipe, tmp_path / "direct")
    via = execute(plan_merge(parse_recipe(recipe), task_vectors=tvs), tmp_path / "via", progress=False)
    assert via.output_fingerprint == direct.output_fingerprint


def test_tokenizer_source_outside_the_merge_with_differing_vocabularies_is_refused(zoo, tmp_path):
    recipe = ta(zoo, ["chat"], tokenizer_source=str(zoo["tool"]))
    with pytest.raises(MergeInputError, match=r"tokenizer_source: '.*tool' is not one of the merged models"):
        merge(recipe, tmp_path / "out")
    # a merged model's vocabulary is the output's: chat's 34 tokens, tokenizer files copied from chat
    out = tmp_path / "chat-vocab"
    merge(ta(zoo, ["chat"], tokenizer_source=str(zoo["chat"])), out)
    assert check_agrees(out, zoo["tied"]) == 34
    assert (out / "tokenizer.json").read_bytes() == (zoo["chat"] / "tokenizer.json").read_bytes()


def test_pad_to_multiple_of_adds_zero_rows_past_the_union_tokenizer(zoo, tmp_path):
    """mergekit's `tokenizer: {source: union, pad_to_multiple_of: N}`: the union's 35 tokens, then zero
    rows up to 48; config, embedding and lm_head have 48 rows, the tokenizer 35 ids; tied stays tied."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain, out = tmp_path / "plain", tmp_path / "out"
    merge(ta(zoo, ["chat", "tool"], tokenizer_source="union"), plain)
    res = merge(ta(zoo, ["chat", "tool"], tokenizer={"source": "union", "pad_to_multiple_of": 16}), out)
    assert len(AutoTokenizer.from_pretrained(str(out))) == 35
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 48
    assert res.card["vocabulary"]["padding_rows"] == 13
    assert "35 tokens and 13 zero padding rows (`tokenizer.pad_to_multiple_of`)" in (out / "README.md").read_text()
    names = ["model.embed_tokens.weight"] + ([] if zoo["tied"] else ["lm_head.weight"])
    for name in names:
        M, P = rows(out, name), rows(plain, name)
        assert M.shape == (48, 16)
        assert torch.equal(M[:35], P)
        assert torch.equal(M[35:], torch.zeros(13, 16))
    assert set(Checkpoint(out).tensors) == set(Checkpoint(plain).tensors)  # tied: no lm_head written
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_output_embeddings().weight.shape[0] == 48
    if zoo["tied"]:
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_pad_to_multiple_of_one_vocabulary_pads_by_id_and_a_multiple_already_is_unchanged(zoo, tmp_path):
    from merge_dag.core.plan import plan_merge
    from merge_dag.core.recipe import parse_recipe

    e = make_model(tmp_path / "e", zoo["tied"], 5)  # the base's tokenizer, 32 rows
    recipe = ta(zoo, ["chat"])
    recipe["models"] = [{"model": str(e), "parameters": {"weight": 1.0}}]
    plain = merge(recipe, tmp_path / "plain")
    padded = merge(recipe | {"tokenizer": {"pad_to_multiple_of": 24}}, tmp_path / "padded")
    B, E, M = rows(zoo["base"]), rows(e), rows(tmp_path / "padded")
    assert M.shape == (48, 16)
    torch.testing.assert_close(M[:32], B + 0.9 * (E - B), rtol=0, atol=1e-6)
    assert torch.equal(M[32:], torch.zeros(16, 16))
    assert padded.card["vocabulary"]["padding_rows"] == 16
    assert (tmp_path / "padded" / "tokenizer.json").read_bytes() == (zoo["base"] / "tokenizer.json").read_bytes()
    # 32 rows are a multiple of 16 already: nothing to map, the same output as without the option
    assert plan_merge(parse_recipe(recipe | {"tokenizer": {"pad_to_multiple_of": 16}})).vocab is None
    same = merge(recipe | {"tokenizer": {"pad_to_multiple_of": 16}}, tmp_path / "same")
    assert same.output_fingerprint == plain.output_fingerprint


def test_the_tokenizer_block_is_tokenizer_source_and_rejects_what_it_does_not_know(zoo, tmp_path):
    from merge_dag.core.errors import RecipeError
    from merge_dag.core.recipe import parse_recipe

    r = parse_recipe(ta(zoo, ["chat"], tokenizer={"source": "union"}))
    assert r.tokenizer_source == "union" and r.pad_vocab_to is None
    with pytest.raises(RecipeError, match=r"`tokenizer_source` or `tokenizer.source`, not both"):
        parse_recipe(ta(zoo, ["chat"], tokenizer={"source": "union"}, tokenizer_source="base"))
    with pytest.raises(RecipeError, match=r"tokenizer\.tokens"):
        parse_recipe(ta(zoo, ["chat"], tokenizer={"source": "union", "tokens": {"<x>": {"source": "base"}}}))
    with pytest.raises(RecipeError, match=r"tokenizer\.pad_to_multiple_of"):
        parse_recipe(ta(zoo, ["chat"], tokenizer={"pad_to_multiple_of": 0}))
