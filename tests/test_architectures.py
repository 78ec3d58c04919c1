"""Any architecture, nothing dropped (issue 14, item 5).

Tiny random models of eight transformers architectures (Llama, Qwen2, Qwen3, Mistral, Gemma2, Phi3,
and the MoEs Mixtral and Qwen2-MoE) are built here with save_pretrained(safe_serialization=True): a
base and two experts (base + small random deltas, fixed seeds), float32. Each is merged with one
method of every family (linear, task_arithmetic, ties, slerp, model_stock, tsv_merge) through
merge_dag.core.engine.merge, and the output reloads with transformers' AutoModelForCausalLM with
exactly the base's tensor names; the task_arithmetic output equals
base + lambda * sum_i w_i (e_i - base) tensor by tensor, the linear one sum_i w_i m_i / sum_i w_i,
and tied embeddings stay tied (no lm_head.weight written, the reloaded model's lm_head is its
embedding). Inputs whose tensor sets disagree are refused with one MissingTensorError naming the
tensor and the models, unless `missing_tensors` says how to merge them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_dag.core.checkpoint import Checkpoint
from merge_dag.core.engine import merge
from merge_dag.core.errors import MissingTensorError, RecipeError
from merge_dag.core.markdown import md_text
from merge_dag.core.plan import plan_merge
from merge_dag.core.recipe import parse_recipe

pytestmark = pytest.mark.usefixtures("fp_cache")

COMMON = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _config(arch: str):
    import transformers as tf

    return {
        "llama": lambda: tf.LlamaConfig(**COMMON, tie_word_embeddings=False),
        "qwen2": lambda: tf.Qwen2Config(**COMMON, tie_word_embeddings=True),
        "qwen3": lambda: tf.Qwen3Config(**COMMON, head_dim=8, tie_word_embeddings=True),
        "mistral": lambda: tf.MistralConfig(**COMMON, tie_word_embeddings=False),
        "gemma2": lambda: tf.Gemma2Config(**COMMON, head_dim=8),  # tied by default
        "phi3": lambda: tf.Phi3Config(**COMMON),  # fused qkv_proj and gate_up_proj
        "mixtral": lambda: tf.MixtralConfig(**COMMON, num_local_experts=2, num_experts_per_tok=1),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(  # routed experts + a gated shared expert
            **COMMON, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=8, shared_expert_intermediate_size=16
        ),
    }[arch]()


ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3", "mixtral", "qwen2_moe")


def build_family(arch: str, root: Path, n_experts: int = 2) -> dict[str, Path]:
    """base + n_experts experts of `arch` under root/arch: expert k = base + 0.02 * N(0, 1) (seed k)."""
    from transformers import AutoModelForCausalLM

    out = {}
    for k in range(n_experts + 1):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(arch))
        if k:
            g = torch.Generator().manual_seed(1000 + k)
            with torch.no_grad():
                for _, p in model.named_parameters():  # a tied embedding is one parameter: stays tied
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
        name = "base" if k == 0 else f"e{k}"
        model.save_pretrained(root / arch / name, safe_serialization=True)
        out[name] = root / arch / name
    return out


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("archs")
    return {arch: build_family(arch, root) for arch in ARCHS}


def recipe(method: str, fam: dict[str, Path], **extra) -> dict:
    base, e1, e2 = str(fam["base"]), str(fam["e1"]), str(fam["e2"])
    r = {
        "linear": {
            "models": [{"model": e1, "parameters": {"weight": 0.6}}, {"model": e2, "parameters": {"weight": 0.4}}]
        },
        "task_arithmetic": {
            "base_model": base,
            "models": [{"model": e1, "parameters": {"weight": 0.7}}, {"model": e2, "parameters": {"weight": 0.5}}],
            "parameters": {"lambda": 0.9},
        },
        "ties": {
            "base_model": base,
            "models": [{"model": e1}, {"model": e2}],
            "parameters": {"weight": 1.0, "density": 0.5},
        },
        "slerp": {"base_model": base, "models": [{"model": e1}], "parameters": {"t": 0.3}},
        "model_stock": {"base_model": base, "models": [{"model": e1}, {"model": e2}]},
        "tsv_merge": {"base_model": base, "models": [{"model": e1}, {"model": e2}]},
    }[method]
    return {"merge_method": method, "tokenizer_source": "none", "dtype": "float32", **r, **extra}


METHODS = ("linear", "task_arithmetic", "ties", "slerp", "model_stock", "tsv_merge")


def reload(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(folder)
    return {n: ck.get(n) for n in ck.tensor_names}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_family_merges_every_architecture(arch, families, tmp_path):
    fam = families[arch]
    base = tensors(fam["base"])
    e1, e2 = tensors(fam["e1"]), tensors(fam["e2"])
    cfg = json.loads((fam["base"] / "config.json").read_text())
    tied = bool(cfg.get("tie_word_embeddings"))
    assert ("lm_head.weight" in base) == (not tied)
    for method in METHODS:
        out = tmp_path / method
        merge(recipe(method, fam), out)
        got = tensors(out)
        assert list(got) == list(base), f"{arch}/{method}: tensor names differ from the base's"
        for n, t in got.items():
            assert t.shape == base[n].shape and t.dtype == torch.float32
            assert torch.isfinite(t).all(), f"{arch}/{method}: {n}"
        if method == "task_arithmetic":
            for n in base:
                want = base[n] + 0.9 * (0.7 * (e1[n] - base[n]) + 0.5 * (e2[n] - base[n]))
                torch.testing.assert_close(got[n], want, rtol=0, atol=2e-7, msg=f"{arch}: {n}")
        if method == "linear":
            for n in base:
                torch.testing.assert_close(got[n], 0.6 * e1[n] + 0.4 * e2[n], rtol=0, atol=2e-7, msg=f"{arch}: {n}")
        model = reload(out)
        state = model.state_dict()
        emb = model.get_input_embeddings().weight
        torch.testing.assert_close(emb, got["model.embed_tokens.weight"], rtol=0, atol=0)
        if tied:
            assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr(), f"{arch}/{method}: untied"
        else:
            torch.testing.assert_close(state["lm_head.weight"], got["lm_head.weight"], rtol=0, atol=0)
        if method == "task_arithmetic":  # the reloaded model holds the merged tensors (layer 1's q_proj/qkv)
            sd = {k: v for k, v in state.items() if k in got}
            assert sd, f"{arch}: no reloaded tensor matches a written name"
            for k, v in sd.items():
                torch.testing.assert_close(v, got[k], rtol=0, atol=0, msg=f"{arch}: {k}")
        cfg_out = json.loads((out / "config.json").read_text())
        assert cfg_out["model_type"] == cfg["model_type"]
        assert bool(cfg_out.get("tie_word_embeddings")) == tied


def _drop(folder: Path, name: str, out: Path) -> Path:
    """A copy of `folder` whose weights lack tensor `name` (a model with one tensor fewer)."""
    import shutil

    shutil.copytree(folder, out)
    state = load_file(out / "model.safetensors")
    del state[name]
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _add(folder: Path, name: str, value: torch.Tensor, out: Path) -> Path:
    import shutil

    shutil.copytree(folder, out)
    state = load_file(out / "model.safetensors")
    state[name] = value
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


NORM = "model.layers.1.post_attention_layernorm.weight"


def test_a_tensor_missing_from_an_expert_is_one_clear_error(families, tmp_path):
    fam = dict(families["llama"])
    fam["e2"] = _drop(fam["e2"], NORM, tmp_path / "e2-short")
    with pytest.raises(MissingTensorError) as err:
        merge(recipe("task_arithmetic", fam), tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"tensor {NORM!r} is in {str(fam['base'])!r}, {str(fam['e1'])!r} but missing from {str(fam['e2'])!r}" in msg
    assert "missing_tensors: base" in msg and "skip" in msg
    assert not (tmp_path / "out").exists()


def test_a_tensor_only_one_expert_has_is_an_error(families, tmp_path):
    fam = dict(families["llama"])
    fam["e1"] = _add(fam["e1"], "model.extra_head.weight", torch.ones(4, 16), tmp_path / "e1-extra")
    with pytest.raises(MissingTensorError, match=r"tensor 'model.extra_head.weight' is in .*e1-extra' but missing"):
        merge(recipe("ties", fam), tmp_path / "out")
    # `base` cannot fill in a tensor the base lacks
    with pytest.raises(MissingTensorError, match="the base lacks it"):
        merge(recipe("ties", fam, missing_tensors="base"), tmp_path / "out")


def test_missing_tensors_base_reads_the_base_for_the_expert_that_lacks_it(families, tmp_path):
    fam = dict(families["llama"])
    fam["e2"] = _drop(fam["e2"], NORM, tmp_path / "e2-short")
    res = merge(recipe("task_arithmetic", fam, missing_tensors="base"), tmp_path / "out")
    base, e1, e2 = tensors(fam["base"]), tensors(fam["e1"]), tensors(fam["e2"])
    got = tensors(tmp_path / "out")
    assert list(got) == list(base)
    # e2's task vector is zero on NORM: only e1 moves it
    torch.testing.assert_close(got[NORM], base[NORM] + 0.9 * 0.7 * (e1[NORM] - base[NORM]), rtol=0, atol=2e-7)
    n = "model.layers.0.mlp.up_proj.weight"
    want = base[n] + 0.9 * (0.7 * (e1[n] - base[n]) + 0.5 * (e2[n] - base[n]))
    torch.testing.assert_close(got[n], want, rtol=0, atol=2e-7)
    assert res.card["base_stand_ins"] == {NORM: [str(fam["e2"])]}
    card = json.loads((tmp_path / "out" / "merge_dag.json").read_text())
    assert card["recipe"]["missing_tensors"] == "base"
    reload(tmp_path / "out")


def test_missing_tensors_skip_leaves_them_out_on_the_record(families, tmp_path):
    fam = dict(families["llama"])
    fam["e2"] = _drop(fam["e2"], NORM, tmp_path / "e2-short")
    res = merge(recipe("ties", fam, missing_tensors="skip"), tmp_path / "out")
    got = tensors(tmp_path / "out")
    assert NORM not in got and len(got) == len(tensors(fam["base"])) - 1
    assert res.card["skipped_tensors"] == [NORM]
    plan = plan_merge(parse_recipe(recipe("ties", fam, missing_tensors="skip")))
    assert "skipped:    1 tensor(s) some inputs lack (missing_tensors: skip)" in plan.describe()
    assert md_text(NORM) in (tmp_path / "out" / "README.md").read_text()


def test_missing_tensors_base_needs_a_base(families, tmp_path):
    fam = dict(families["llama"])
    fam["e2"] = _drop(fam["e2"], NORM, tmp_path / "e2-short")
    with pytest.raises(RecipeError, match="missing_tensors: `base` reads a missing tensor from the base model"):
        merge(recipe("linear", fam, missing_tensors="base"), tmp_path / "out")
    with pytest.raises(RecipeError, match="missing_tensors"):
        parse_recipe(recipe("linear", fam, missing_tensors="drop"))


def test_cached_task_vectors_give_the_same_merge_when_a_tensor_is_missing(families, tmp_path):
    from merge_dag.core.merge import execute
    from merge_dag.core.task_vector import compute_task_vector

    fam = dict(families["llama"])
    fam["e2"] = _drop(fam["e2"], NORM, tmp_path / "e2-short")
    r = compute_task_vector(fam["base"], fam["e2"], tmp_path / "tv2")
    assert r.left_out == [NORM]
    compute_task_vector(fam["base"], fam["e1"], tmp_path / "tv1")
    tvs = {str(fam["e1"]): tmp_path / "tv1", str(fam["e2"]): tmp_path / "tv2"}
    rec = recipe("task_arithmetic", fam, missing_tensors="base")
    direct = merge(rec, tmp_path / "direct")
    via = execute(plan_merge(parse_recipe(rec), task_vectors=tvs), tmp_path / "via", progress=False)
    assert via.output_fingerprint == direct.output_fingerprint
    with pytest.raises(MissingTensorError, match=NORM):  # without missing_tensors: still refused
        plan_merge(parse_recipe(recipe("task_arithmetic", fam)), task_vectors=tvs)
