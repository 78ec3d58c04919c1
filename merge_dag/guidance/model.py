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
    Checkpoint(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError) as e:
        raise GuidanceError(f"{folder}: cannot load as a causal language model: {e}") from e
    return model.to(device).eval()


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
