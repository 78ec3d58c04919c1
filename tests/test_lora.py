"""LoRA adapters as experts, checked against peft itself: a tiny Llama (and a tiny GPT-2 for
fan_in_fan_out) made here, real peft adapters saved with save_pretrained, and merge_and_unload's
weights as the reference. No mocks, no hub."""

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_dag.core.checkpoint import Checkpoint
from merge_dag.core.engine import merge
from merge_dag.core.errors import CheckpointError, MergeDagError, RecipeError
from merge_dag.core.fingerprint import checkpoint_fingerprint
from merge_dag.core.lora import LoraCheckpoint, open_model
from merge_dag.core.recipe import parse_recipe
from merge_dag.core.task_vector import compute_task_vector

from _models import load_all

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("fp_cache")


def tiny_llama(tied: bool = False, seed: int = 0, hidden: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def save_base(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    # a merge needs tokenizer files from its tokenizer_source (the base by default)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return folder


def make_adapter(base_folder: Path, out: Path, seed: int, model_cls=None, **lora_kwargs) -> Path:
    """A real peft LoRA adapter on the model in `base_folder`, with every LoRA factor (and every
    modules_to_save copy) set to nonzero random values, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = (model_cls or AutoModelForCausalLM).from_pretrained(base_folder, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(out, safe_serialization=True)
    assert (out / "adapter_model.safetensors").is_file()
    return out


def peft_merged(base_folder: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """peft's own answer: load base + adapter, merge_and_unload, the state dict."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """base (untied tiny Llama) and three adapters covering the config variants."""
    root = tmp_path_factory.mktemp("lora")
    base = save_base(tiny_llama(), root / "base")
    ads = {
        # all linears + the embedding, lm_head saved whole, per-module rank and alpha patterns
        "a1": make_adapter(
            base,
            root / "adapters" / "a1",
            1,
            r=4,
            lora_alpha=8,
            target_modules=LINEARS + ["embed_tokens"],
            modules_to_save=["lm_head"],
            rank_pattern={"q_proj": 2},
            alpha_pattern={"down_proj": 3},
        ),
        # rsLoRA: scale alpha / sqrt(r)
        "a2": make_adapter(
            base, root / "adapters" / "a2", 2, r=4, lora_alpha=8, target_modules=LINEARS, use_rslora=True
        ),
        # attention only, layer 1 only
        "a3": make_adapter(
            base,
            root / "adapters" / "a3",
            3,
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            layers_to_transform=[1],
        ),
    }
    ref = {k: peft_merged(base, v) for k, v in ads.items()}
    return {"root": root, "base": base, **ads, "ref": ref}


def _dense(zoo, key: str, folder: Path) -> Path:
    """The adapter merged by peft, written as a full float32 checkpoint (a reference only)."""
    if not folder.exists():
        names = Checkpoint(zoo["base"]).tensor_names
        folder.mkdir(parents=True)
        save_file({n: zoo["ref"][key][n].contiguous() for n in names}, str(folder / "model.safetensors"))
        for f in ("config.json", "tokenizer_config.json"):
            shutil.copy(zoo["base"] / f, folder / f)
    return folder


# ---------------------------------------------------------------------------------------------
# the delta equals peft's merge
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["a1", "a2", "a3"])
def test_adapter_reads_as_peft_merge_and_unload(zoo, key):
    base = Checkpoint(zoo["base"])
    ck = open_model(zoo[key], name=key, base=zoo["base"])
    assert isinstance(ck, LoraCheckpoint) and ck.tensor_names == base.tensor_names
    ref = zoo["ref"][key]
    changed = 0
    for name in base.tensor_names:
        got = ck.get(name, dtype=torch.float32)
        torch.testing.assert_close(got, ref[name].float(), atol=1e-6, rtol=0, msg=name)
        d = ck.delta(name)
        changed += d is not None and bool(d.abs().max() > 0)
        if d is None:
            assert torch.equal(got, base.get(name, dtype=torch.float32))
    assert changed == len(ck.touched) > 0


def test_reads_into_a_reused_buffer_give_the_same_tensors(zoo):
    """The engine reads each step into reused byte buffers (Checkpoint.get(out=...)): an adapter
    expert takes them too, for adapted, saved-whole (modules_to_save) and untouched tensors alike."""
    ck = open_model(zoo["a1"], name="a1", base=zoo["base"])
    buf = torch.full((max(i.nbytes for i in ck.tensors.values()) + 7,), 255, dtype=torch.uint8)
    kinds = {"adapted": ck.touched[0], "saved whole": "lm_head.weight", "untouched": "model.norm.weight"}
    assert "lm_head.weight" in ck.replaced and "model.norm.weight" not in ck.touched
    for what, name in kinds.items():
        assert torch.equal(ck.get(name, out=buf), ck.get(name)), what


def test_variants_are_what_the_config_says(zoo):
    a1 = open_model(zoo["a1"], base=zoo["base"])
    q = a1.factors["model.layers.0.self_attn.q_proj.weight"]
    down = a1.factors["model.layers.0.mlp.down_proj.weight"]
    k = a1.factors["model.layers.0.self_attn.k_proj.weight"]
    assert (q.scale, down.scale, k.scale) == (8 / 2, 3 / 4, 8 / 4)  # rank_pattern, alpha_pattern
    assert a1.factors["model.embed_tokens.weight"].embedding
    assert "lm_head.weight" in a1.replaced  # modules_to_save
    a2 = open_model(zoo["a2"], base=zoo["base"])
    assert a2.factors["model.layers.1.mlp.up_proj.weight"].scale == pytest.approx(8 / 2)  # 8 / sqrt(4)
    a3 = open_model(zoo["a3"], base=zoo["base"])
    assert sorted(a3.touched) == ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"]


def test_fan_in_fan_out_on_gpt2_conv1d(tmp_path):
    """GPT-2 stores Conv1D weights as [in, out]; peft's fan_in_fan_out adapter transposes B A."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)).eval()
    base = save_base(model, tmp_path / "gpt2")
    ad = make_adapter(
        base, tmp_path / "gpt2-lora", 5, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
    )
    assert json.loads((ad / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ref = peft_merged(base, ad)
    ck = open_model(ad, base=base)
    assert ck.factors["transformer.h.0.attn.c_attn.weight"].transpose
    for name in ck.tensor_names:
        torch.testing.assert_close(ck.get(name, dtype=torch.float32), ref[name], atol=1e-6, rtol=0, msg=name)
    # the tied output head stays tied: no lm_head.weight is stored or produced
    assert "lm_head.weight" not in ck.tensors


def test_task_vector_of_an_adapter_is_its_delta(zoo, tmp_path):
    r = compute_task_vector(Checkpoint(zoo["base"]), open_model(zoo["a1"], base=zoo["base"]), tmp_path / "tv")
    tv = load_all(tmp_path / "tv")
    base = load_all(zoo["base"])
    for name, d in tv.items():
        torch.testing.assert_close(base[name] + d, zoo["ref"]["a1"][name], atol=1e-6, rtol=0, msg=name)
    assert r.l2_norm > 0


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------


def write_recipe(tmp_path: Path, body: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def test_task_arithmetic_of_two_adapters_equals_the_math(zoo, tmp_path):
    b, a1, a2 = zoo["base"], zoo["a1"], zoo["a2"]
    rec = write_recipe(
        tmp_path,
        f"""
        merge_method: task_arithmetic
        base_model: {b}
        models:
          - model: {b}+{a1}               # mergekit's form
            parameters: {{weight: 0.5}}
          - lora: {a2}                     # explicit form, on top of base_model
            parameters: {{weight: 1.0}}
        parameters: {{lambda: 0.8}}
        out_dtype: float32
    """,
    )
    res = merge(rec, tmp_path / "out")
    out = load_all(tmp_path / "out")
    base = load_all(b)
    ref = zoo["ref"]
    assert set(out) == set(base)
    for n in base:
        want = base[n] + 0.8 * (0.5 * (ref["a1"][n] - base[n]) + 1.0 * (ref["a2"][n] - base[n]))
        torch.testing.assert_close(out[n], want, atol=2e-6, rtol=0, msg=n)
    card = json.loads((tmp_path / "out" / "merge_dag.json").read_text())
    experts = [i for i in card["inputs"] if i["role"] == "model"]
    assert [Path(i["adapter"]) for i in experts] == [a1.resolve(), a2.resolve()]
    assert all(Path(i["base_path"]) == b.resolve() for i in experts)
    assert all(i["base_fingerprint"] == checkpoint_fingerprint(b) for i in experts)
    assert res.fingerprints[f"{b}+{a1}"] == checkpoint_fingerprint(open_model(a1, base=b))


def test_the_recipe_forms_are_one_expert(zoo, tmp_path):
    b, a1 = zoo["base"], zoo["a1"]
    forms = {
        "plus": f"- model: {b}+{a1}",
        "explicit": f"- {{model: {b}, lora: {a1}}}",
        "on_base": f"- {{lora: {a1}}}",
        "adapter_folder": f"- model: {a1}",
        "glob": f"- glob: {a1.parent}/a1*",
    }
    fps = {}
    for name, entry in forms.items():
        rec = parse_recipe(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(b),
                "out_dtype": "float32",
                "parameters": {"weight": 1.0},
                "models": [__import__("yaml").safe_load(entry)[0]],
            }
        )
        assert [m.model for m in rec.models] == [f"{b}+{a1}"], name
        fps[name] = merge(rec, tmp_path / name).output_fingerprint
    assert len(set(fps.values())) == 1


def test_glob_matches_adapter_folders_on_the_recipe_base(zoo):
    rec = parse_recipe(
        {
            "merge_method": "ties",
            "base_model": str(zoo["base"]),
            "parameters": {"weight": 1.0, "density": 0.5},
            "models": [{"glob": f"{zoo['a1'].parent}/*"}],
        }
    )
    assert [m.model for m in rec.models] == [f"{zoo['base']}+{zoo[k]}" for k in ("a1", "a2", "a3")]


METHODS = {
    "task_arithmetic": {"weight": 0.7},
    "ties": {"weight": 1.0, "density": 0.5},
    "dare_ties": {"weight": 1.0, "density": 0.6},
    "dare_linear": {"weight": 0.5, "density": 0.6},
    "breadcrumbs": {"weight": 1.0, "density": 0.8, "gamma": 0.05},
    "breadcrumbs_ties": {"weight": 1.0, "density": 0.8, "gamma": 0.05},
    "della": {"weight": 1.0, "density": 0.6, "epsilon": 0.1},
    "della_linear": {"weight": 1.0, "density": 0.6, "epsilon": 0.1},
    "model_stock": {},
    "linear": {"weight": 0.5},
}


@pytest.mark.parametrize("method", list(METHODS) + ["slerp", "passthrough"])
def test_every_method_merges_adapters_as_their_dense_experts(zoo, tmp_path, method):
    """The same merge with adapter experts and with peft's dense merges of them gives the same tensors."""
    b = zoo["base"]
    dense = {k: _dense(zoo, k, zoo["root"] / "dense" / k) for k in ("a1", "a2")}

    def recipe(experts: dict[str, str]) -> dict:
        base = {"merge_method": method, "base_model": str(b), "out_dtype": "float32", "seed": 3}
        if method == "slerp":
            return {**base, "models": [{"model": experts["a1"]}], "parameters": {"t": 0.4}}
        if method == "passthrough":
            return {"merge_method": method, "out_dtype": "float32", "models": [{"model": experts["a2"]}]}
        if method == "linear":
            base.pop("base_model")
        return {**base, "parameters": dict(METHODS[method]), "models": [{"model": v} for v in experts.values()]}

    as_lora = recipe({k: f"{b}+{zoo[k]}" for k in ("a1", "a2")})
    as_dense = recipe({k: str(v) for k, v in dense.items()})
    merge(as_lora, tmp_path / "lora")
    merge(as_dense, tmp_path / "dense")
    got, want = load_all(tmp_path / "lora"), load_all(tmp_path / "dense")
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=0, msg=n)


# ---------------------------------------------------------------------------------------------
# fingerprints
# ---------------------------------------------------------------------------------------------


def test_fingerprint_covers_base_adapter_weights_and_config(zoo, tmp_path):
    ad = tmp_path / "ad"
    shutil.copytree(zoo["a2"], ad)
    b = zoo["base"]
    fp0 = checkpoint_fingerprint(open_model(ad, base=b))
    assert checkpoint_fingerprint(open_model(ad, base=b)) == fp0  # stable
    (ad / "README.md").write_text("notes")  # not part of the adapter
    assert checkpoint_fingerprint(open_model(ad, base=b)) == fp0
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 16}))
    fp_cfg = checkpoint_fingerprint(open_model(ad, base=b))
    assert fp_cfg != fp0
    w = load_file(str(ad / "adapter_model.safetensors"))
    k = sorted(w)[0]
    w[k] = w[k] * 2
    save_file(w, str(ad / "adapter_model.safetensors"))
    fp_w = checkpoint_fingerprint(open_model(ad, base=b))
    assert fp_w not in (fp0, fp_cfg)
    other_base = save_base(tiny_llama(seed=9), tmp_path / "base2")
    assert checkpoint_fingerprint(open_model(ad, base=other_base)) not in (fp0, fp_cfg, fp_w)
    assert checkpoint_fingerprint(b) not in (fp0, fp_cfg, fp_w)


# ---------------------------------------------------------------------------------------------
# bad adapters: one clear line, before any output
# ---------------------------------------------------------------------------------------------


def _broken(zoo, tmp_path, edit_tensors=None, edit_config=None) -> Path:
    ad = tmp_path / "bad"
    shutil.copytree(zoo["a2"], ad)
    if edit_tensors:
        w = load_file(str(ad / "adapter_model.safetensors"))
        save_file(edit_tensors(w), str(ad / "adapter_model.safetensors"))
    if edit_config:
        cfg = json.loads((ad / "adapter_config.json").read_text())
        (ad / "adapter_config.json").write_text(json.dumps(edit_config(cfg)))
    return ad


def _rename(w, old, new):
    return {k.replace(old, new): v for k, v in w.items()}


def _merge_fails(zoo, tmp_path, ad: Path, base: Path | None = None) -> str:
    rec = {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo["base"]),
        "parameters": {"weight": 1.0},
        "models": [{"model": str(base or zoo["base"]), "lora": str(ad)}],
    }
    with pytest.raises(MergeDagError) as e:
        merge(rec, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_unknown_module_is_named(zoo, tmp_path):
    ad = _broken(zoo, tmp_path, lambda w: _rename(w, "layers.1.mlp.up_proj", "layers.1.mlp.upp_proj"))
    msg = _merge_fails(zoo, tmp_path, ad)
    assert msg == (
        f"adapter '{zoo['base']}+{ad}': tensor 'base_model.model.model.layers.1.mlp.upp_proj.lora_A.weight' "
        f"adapts module 'model.layers.1.mlp.upp_proj', which base '{zoo['base']}' does not have "
        "(no tensor 'model.layers.1.mlp.upp_proj.weight')"
    )


def test_wrong_rank_is_named(zoo, tmp_path):
    ad = _broken(zoo, tmp_path, edit_config=lambda c: {**c, "r": 8})
    msg = _merge_fails(zoo, tmp_path, ad)
    assert msg == (
        f"adapter '{zoo['base']}+{ad}': tensor 'base_model.model.model.layers.0.mlp.down_proj.lora_A.weight' "
        "has shape [4, 32], expected [8, 32] for rank 8 on base tensor "
        "'model.layers.0.mlp.down_proj.weight' [16, 32]"
    )


def test_wrong_features_are_named(zoo, tmp_path):
    wide = save_base(tiny_llama(hidden=32), tmp_path / "wide")
    msg = _merge_fails(zoo, tmp_path, zoo["a2"], base=wide)
    assert msg.startswith(
        f"adapter '{wide}+{zoo['a2']}': tensor 'base_model.model.model.layers.0.mlp.down_proj.lora_A.weight' "
        "has shape [4, 32], expected [4, 64]"
    )


def test_missing_base_and_missing_files_are_named(zoo, tmp_path):
    msg = _merge_fails(zoo, tmp_path, zoo["a2"], base=tmp_path / "nowhere")
    assert msg == f"model '{tmp_path / 'nowhere'}': path does not exist: {tmp_path / 'nowhere'}"
    ad = _broken(zoo, tmp_path)
    (ad / "adapter_model.safetensors").unlink()
    assert "adapter_model.safetensors is missing" in _merge_fails(zoo, tmp_path, ad)
    with pytest.raises(RecipeError, match=r"models\[0\]\.lora: an adapter needs a base"):
        parse_recipe(
            {
                "merge_method": "linear",
                "models": [{"lora": str(zoo["a1"])}, {"lora": str(zoo["a2"])}],
                "parameters": {"weight": 0.5},
            }
        )
    with pytest.raises(CheckpointError, match="is a PEFT LoRA adapter folder, not a full checkpoint"):
        Checkpoint(zoo["a1"])


def test_dora_is_refused(zoo, tmp_path):
    ad = _broken(zoo, tmp_path, edit_config=lambda c: {**c, "use_dora": True})
    assert _merge_fails(zoo, tmp_path, ad) == (
        f"{ad / 'adapter_config.json'}: use_dora: DoRA (use_dora) adapters are "
        "not supported (not a low-rank delta of the base's own tensors)"
    )


def test_cli_dry_run_and_bad_adapter(zoo, tmp_path, capsys):
    from merge_dag.cli import main as cli

    rec = write_recipe(
        tmp_path,
        f"""
        merge_method: ties
        base_model: {zoo["base"]}
        models:
          - lora: {zoo["a1"]}
          - model: {zoo["base"]}+{zoo["a3"]}
        parameters: {{weight: 1.0, density: 0.5}}
    """,
    )
    assert cli(["merge", str(rec), str(tmp_path / "o"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"model {zoo['base']}+{zoo['a1']}" in text and f"model {zoo['base']}+{zoo['a3']}" in text
    assert not (tmp_path / "o").exists()
    ad = _broken(zoo, tmp_path, edit_config=lambda c: {**c, "r": 2})
    rec.write_text(rec.read_text().replace(str(zoo["a3"]), str(ad)))
    assert cli(["merge", str(rec), str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: adapter '{zoo['base']}+{ad}': tensor ") and "expected [2, " in err
    assert "Traceback" not in err and err.count("\n") == 1 and not (tmp_path / "o").exists()
