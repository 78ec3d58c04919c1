"""Real models come out right: a tiny Llama with tied embeddings and a chat-template tokenizer (both
made here) merged with a dense expert and a LoRA expert. The output stays tied (no stray
lm_head.weight, config unchanged), reloads through transformers to the logits of the same merge
done in memory, and carries tokenizer_source's tokenizer, chat template, special tokens and
generation config."""

import json
from pathlib import Path

import pytest
import torch
from test_lora import LINEARS, make_adapter, peft_merged, tiny_llama

from merge_dag.core.checkpoint import Checkpoint
from merge_dag.core.engine import merge

from _models import load_all

TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}:{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant:{% endif %}"
)


pytestmark = pytest.mark.usefixtures("fp_cache")


def save_with_tokenizer(model, folder: Path, template: str, gen: dict) -> Path:
    from transformers import GenerationConfig

    from merge_dag.zoo.tokenizer import build_tokenizer

    model.save_pretrained(folder, safe_serialization=True)
    tok = build_tokenizer()
    tok.chat_template = template
    tok.save_pretrained(str(folder))
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "additional_special_tokens": [f"<{folder.name}>"],
            }
        )
    )
    GenerationConfig(**gen).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    base_model = tiny_llama(tied=True, seed=0)
    base = save_with_tokenizer(base_model, root / "base", TEMPLATE, {"bos_token_id": 2, "eos_token_id": 1})
    expert_model = tiny_llama(tied=True, seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for p in expert_model.parameters():  # the tie holds: embed_tokens and lm_head are one parameter
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    chat = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    e1 = save_with_tokenizer(
        expert_model, root / "e1", chat, {"bos_token_id": 2, "eos_token_id": 1, "max_new_tokens": 7, "do_sample": False}
    )
    ad = make_adapter(base, root / "ad", 8, r=4, lora_alpha=8, target_modules=LINEARS + ["embed_tokens"])
    return {"root": root, "base": base, "e1": e1, "ad": ad}


def test_inputs_are_tied_as_transformers_saves_them(tied):
    for k in ("base", "e1"):
        ck = Checkpoint(tied[k])
        assert "lm_head.weight" not in ck.tensors and "model.embed_tokens.weight" in ck.tensors
        assert json.loads((tied[k] / "config.json").read_text())["tie_word_embeddings"] is True


def test_tied_merge_stays_tied_and_reloads_to_the_in_memory_logits(tied, tmp_path):
    from transformers import AutoModelForCausalLM

    b, e1, ad = tied["base"], tied["e1"], tied["ad"]
    out = tmp_path / "merged"
    merge(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(b),
            "out_dtype": "float32",
            "tokenizer_source": str(e1),
            "parameters": {"lambda": 0.8},
            "models": [
                {"model": str(e1), "parameters": {"weight": 0.6}},
                {"lora": str(ad), "parameters": {"weight": 1.0}},
            ],
        },
        out,
    )
    got = load_all(out)
    assert set(got) == set(Checkpoint(b).tensors)  # no stray lm_head.weight
    base_cfg = json.loads((b / "config.json").read_text())
    out_cfg = json.loads((out / "config.json").read_text())
    dtype_keys = {"dtype", "torch_dtype"}
    assert {k: v for k, v in out_cfg.items() if k not in dtype_keys} == {
        k: v for k, v in base_cfg.items() if k not in dtype_keys
    }  # config unchanged

    # the same merge in memory: base + 0.8 (0.6 (e1 - base) + 1.0 (peft's merged adapter - base))
    base_sd = load_all(b)
    e1_sd = load_all(e1)
    ad_sd = peft_merged(b, ad)
    model = tiny_llama(tied=True, seed=0)
    with torch.no_grad():
        for n, t in base_sd.items():
            model.get_parameter(n).copy_(t + 0.8 * (0.6 * (e1_sd[n] - t) + (ad_sd[n] - t)))
    ids = torch.tensor([[2, 5, 9, 17, 30, 41, 7, 1]])
    with torch.no_grad():
        want = model(ids).logits
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()  # still tied
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, want, atol=1e-5, rtol=0)


def test_tokenizer_source_brings_its_template_special_tokens_and_generation_config(tied, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    b, e1 = tied["base"], tied["e1"]
    out = tmp_path / "merged"
    merge(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(b),
            "tokenizer_source": str(e1),
            "parameters": {"weight": 0.5},
            "models": [{"model": str(e1)}, {"lora": str(tied["ad"])}],
        },
        out,
    )
    carried = [
        f.name
        for f in e1.iterdir()
        if f.name
        in (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
            "generation_config.json",
        )
    ]
    assert "generation_config.json" in carried and "special_tokens_map.json" in carried
    assert "chat_template.jinja" in carried or "chat_template" in json.loads((e1 / "tokenizer_config.json").read_text())
    for name in carried:
        assert (out / name).read_bytes() == (e1 / name).read_bytes(), name
    assert GenerationConfig.from_pretrained(out).max_new_tokens == 7
    msgs = [{"role": "user", "content": "ab"}]
    assert AutoTokenizer.from_pretrained(str(out)).apply_chat_template(msgs, tokenize=False) == "[user] ab\n"
    # without tokenizer_source, the base's files come out
    out2 = tmp_path / "merged_base_tok"
    merge(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(b),
            "parameters": {"weight": 0.5},
            "models": [{"model": str(e1)}],
        },
        out2,
    )
    assert (out2 / "generation_config.json").read_bytes() == (b / "generation_config.json").read_bytes()
    text = AutoTokenizer.from_pretrained(str(out2)).apply_chat_template(msgs, tokenize=False)
    assert text == "<bos>user:ab<eos>"


def test_lm_head_saved_by_an_adapter_on_a_tied_base_is_refused(tied, tmp_path):
    """An adapter that saved a whole lm_head cannot apply to a base that stores none (tied)."""
    from safetensors.torch import load_file, save_file

    from merge_dag.core.errors import AdapterError
    from merge_dag.core.lora import open_model

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((tied["ad"] / "adapter_config.json").read_text())
    w = load_file(str(tied["ad"] / "adapter_model.safetensors"))
    w["base_model.model.lm_head.weight"] = torch.zeros(64, 16)
    save_file(w, str(bad / "adapter_model.safetensors"))
    with pytest.raises(
        AdapterError,
        match=r"tensor 'base_model.model.lm_head.weight' replaces 'lm_head.weight', "
        r"which base .* does not have",
    ):
        open_model(bad, base=tied["base"])
