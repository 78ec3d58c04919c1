"""Tiny real Hugging Face checkpoints for engine tests (Llama architecture, random weights)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def tiny_config(layers: int = 2, hidden: int = 32, vocab: int = 64) -> dict:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    d = cfg.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    return d


def save_hf_llama(folder, state=None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny transformers Llama (tiny_config) saved as a HF folder with the zoo's tokenizer: its own
    random init (seed) or `state`; returns the saved state dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from merge_dag.zoo.tokenizer import save_tokenizer

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**tiny_config(layers=2, hidden=32, vocab=64)))
    if state is not None:
        model.load_state_dict(state)
    model.save_pretrained(str(folder))
    save_tokenizer(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def base_state(layers: int = 2, hidden: int = 32, vocab: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**tiny_config(layers, hidden, vocab)))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturb(state: dict[str, torch.Tensor], seed: int, sigma: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + sigma * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()}


def write_model(
    path: Path,
    state: dict[str, torch.Tensor],
    config: dict,
    dtype=torch.bfloat16,
    shards: int = 1,
    tokenizer: bool = True,
) -> Path:
    """Write a HF folder: `shards` safetensors files (+ index when > 1), config, generation config."""
    path.mkdir(parents=True, exist_ok=True)
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        fn = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n].to(dtype).contiguous() for n in part}, str(path / fn), metadata={"format": "pt"})
        weight_map.update({n: fn for n in part})
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = dict(config)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    if tokenizer:
        (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "marker": path.name}))
    return path


def make_family(
    root: Path,
    n_experts: int = 3,
    layers: int = 2,
    hidden: int = 32,
    vocab: int = 64,
    dtype=torch.bfloat16,
    shards: int = 1,
) -> dict[str, Path]:
    """base + n experts (base + noise), returned as {name: folder}."""
    cfg = tiny_config(layers, hidden, vocab)
    base = base_state(layers, hidden, vocab)
    out = {"base": write_model(root / "base", base, cfg, dtype, shards)}
    for i in range(n_experts):
        out[f"e{i}"] = write_model(root / f"e{i}", perturb(base, 100 + i), cfg, dtype, shards)
    return out


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
