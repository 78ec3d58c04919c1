"""A tiny GGUF file written with the ``gguf`` package's GGUFWriter: a 2-layer llama with a byte-level
BPE tokenizer (special tokens, a few merges, a chat template), F32 or Q8_0 tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "Ġ t", "Ġt he"]


def _byte_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [bytes_to_unicode()[b] for b in range(256)]


def tiny_vocab() -> list[str]:
    merged = ["he", "ll", "Ġt", "Ġthe"]
    return SPECIALS + _byte_alphabet() + merged


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    quant: str = "F32",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 96,
    tie: bool = True,
    seed: int = 0,
) -> Path:
    """Write the file and return its path. ``quant`` 'F32' or 'Q8_0' (2-D weights quantized, norms F32)."""
    import gguf

    rng = np.random.default_rng(seed)
    vocab = tiny_vocab()
    n_vocab = len(vocab)
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test-llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if quant == "F32" else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(vocab)
    w.add_token_types([3] * len(SPECIALS) + [1] * (n_vocab - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.2).astype(np.float32)

    def add(name: str, arr: np.ndarray) -> None:
        if quant == "Q8_0" and arr.ndim == 2:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)

    add("token_embd.weight", mat(n_vocab, hidden))
    for i in range(layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        add(p + "attn_q.weight", mat(heads * head_dim, hidden))
        add(p + "attn_k.weight", mat(kv_heads * head_dim, hidden))
        add(p + "attn_v.weight", mat(kv_heads * head_dim, hidden))
        add(p + "attn_output.weight", mat(hidden, heads * head_dim))
        add(p + "ffn_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        add(p + "ffn_gate.weight", mat(intermediate, hidden))
        add(p + "ffn_up.weight", mat(intermediate, hidden))
        add(p + "ffn_down.weight", mat(hidden, intermediate))
    add("output_norm.weight", np.ones(hidden, dtype=np.float32))
    if not tie:
        add("output.weight", mat(n_vocab, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
