"""Load a checkpoint folder as a causal language model for a statistics pass (offline, safetensors only)."""

from __future__ import annotations

import os

import torch

from ..core.checkpoint import Checkpoint
from .errors import GuidanceError


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The model in `folder`, in eval mode on `device`. The folder is opened with the core reader first,
    so a pickled, truncated or corrupt checkpoint is refused with the core's message."""
    from transformers import AutoModelForCausalLM

    Checkpoint(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                                     use_safetensors=True)
    except (OSError, ValueError) as e:
        raise GuidanceError(f"{folder}: cannot load as a causal language model: {e}") from e
    return model.to(device).eval()


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """(state-dict prefix, module list) of the decoder layers, e.g. ("model.layers", ...)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise GuidanceError(f"{type(model).__name__}: no decoder layers at model.model.layers "
                            "(only Llama-style causal LMs are supported)")
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
