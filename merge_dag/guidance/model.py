"""Load a checkpoint folder as a causal language model for a statistics pass (offline, safetensors only)."""

from __future__ import annotations

import torch

from ..core.checkpoint import Checkpoint
from .errors import GuidanceError


def load_model(folder, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The model in `folder`, in eval mode on `device`. The folder is opened with the core reader first,
    so a pickled, truncated or corrupt checkpoint is refused with the core's message.

    `folder` may also be an opened checkpoint; a LoRA expert (merge_dag.core.lora.LoraCheckpoint) is
    built in memory as its base with base + delta written into every tensor the adapter touches (a
    model in memory for a statistics pass or an eval; nothing is written to disk)."""
    from transformers import AutoModelForCausalLM

    from ..core.lora import LoraCheckpoint

    if isinstance(folder, LoraCheckpoint):
        model = load_model(folder.base.folder, device=device, dtype=dtype)
        params = dict(model.named_parameters(remove_duplicate=False))
        params.update(dict(model.named_buffers(remove_duplicate=False)))
        with torch.no_grad():
            for name in folder.touched:
                if name not in params:
                    raise GuidanceError(
                        f"adapter {folder.name!r}: tensor {name!r} is not a parameter of {type(model).__name__}"
                    )
                params[name].copy_(folder.get(name, device=device, dtype=dtype))
        return model
    if isinstance(folder, Checkpoint):
        folder = folder.path
    ck = Checkpoint(folder)
    try:
        model = _load_streamed(ck, device, dtype)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=dtype, local_files_only=True, use_safetensors=True
            )
    except (OSError, ValueError) as e:
        raise GuidanceError(f"{folder}: cannot load as a causal language model: {e}") from e
    return model.to(device).eval()


def _load_streamed(ck: Checkpoint, device, dtype: torch.dtype):
    """The model built with its parameters on the meta device, then each parameter read from the
    checkpoint straight into its own buffer in `dtype` on `device`, one tensor at a time: memory is the
    model in the working dtype and nothing else (transformers' from_pretrained holds about 2.3 models
    at its peak when it converts a bfloat16 checkpoint to float32). None when a parameter is not in
    the checkpoint under its own name (renamed keys, tied weights stored once): then the caller uses
    from_pretrained."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(ck.path), local_files_only=True)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary) computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # tied parameters (tie_word_embeddings) become one Parameter, as after loading
    names = set(ck.tensor_names)
    groups: dict[int, list[str]] = {}  # tied parameters (e.g. lm_head = embed_tokens) share one group
    params = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
        params[id(p)] = p
    stored = {}
    for key, group in groups.items():
        stored[key] = next((n for n in group if n in names), None)
        if stored[key] is None:
            return None
    with torch.no_grad():
        for key, group in groups.items():
            new = torch.nn.Parameter(
                ck.get(stored[key], device=device, dtype=dtype), requires_grad=params[key].requires_grad
            )
            for name in group:  # one tensor for every tied name, as the model ties them
                mod_name, _, attr = name.rpartition(".")
                model.get_submodule(mod_name)._parameters[attr] = new
        for name, b in model.named_buffers():
            if b.is_meta:  # a persistent buffer: from the checkpoint when there
                if name not in names:
                    return None
                mod_name, _, attr = name.rpartition(".")
                model.get_submodule(mod_name)._buffers[attr] = ck.get(name, device=device, dtype=b.dtype)
    return model


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """(state-dict prefix, module list) of the decoder layers, e.g. ("model.layers", ...)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise GuidanceError(
            f"{type(model).__name__}: no decoder layers at model.model.layers "
            "(only Llama-style causal LMs are supported)"
        )
    for name, mod in model.named_modules():
        if mod is layers:
            return name, layers
    raise GuidanceError(f"{type(model).__name__}: model.model.layers is not a registered submodule")


def linear_modules(model) -> dict[str, tuple[int, torch.nn.Linear]]:
    """{weight tensor name: (layer index, module)} for every nn.Linear inside the decoder layers,
    named as in the state dict ("model.layers.0.self_attn.q_proj.weight")."""
    prefix, layers = decoder_layers(model)
    out = {}
    for i, layer in enumerate(layers):
        for sub, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                out[f"{prefix}.{i}.{sub}.weight"] = (i, mod)
    if not out:
        raise GuidanceError(f"{type(model).__name__}: no nn.Linear modules inside {prefix}")
    return out
