"""Turn guidance (LEWIS densities, Sens-Merging weights) into an ordinary recipe the engine merges.

The guided recipe is the user's recipe with each expert's `density` and/or `weight` replaced by a
parameter map of the usual shape ([{filter: <full tensor name>, value}, ..., fallback]), so the
engine, the methods and the model card need nothing new:

- density: the LEWIS density for every scored linear; every other tensor (embeddings, norms,
  lm_head) keeps the recipe's own density (the fallback entry is the recipe's value).
- weight: the recipe's weight for that tensor times the Sens-Merging weight K * sigma_i^l of its
  layer; tensors outside the decoder layers keep the recipe's weight.
Filters are full tensor names, so "model.layers.1.x" never matches layer 11.
"""

from __future__ import annotations

from typing import Any, Optional

from ..core import params as pmap
from ..core.recipe import Recipe
from .errors import GuidanceError


def _fallback(original: Any) -> list[dict]:
    """The tail of a map that leaves unlisted tensors as the recipe had them."""
    if original is None:
        return []
    if isinstance(original, dict):
        return [original]
    if isinstance(original, list) and original and all(isinstance(v, dict) for v in original):
        return list(original)
    return [{"value": original}]


def _original(recipe: Recipe, model_params: dict, name: str) -> Any:
    return model_params.get(name, recipe.parameters.get(name))


def guided_recipe(
    recipe: Recipe,
    densities: Optional[dict[str, dict[str, float]]] = None,
    weights: Optional[dict[str, dict[str, float]]] = None,
    num_layers: Optional[int] = None,
) -> Recipe:
    """A copy of `recipe` without `guidance`, whose experts' density/weight are the given maps.

    densities, weights: {model reference as in the recipe: {tensor name: value}}; weights multiply
    the recipe's own weight for that tensor (evaluated at the tensor's layer position, so gradients
    and filters in the recipe still count; `num_layers` is needed for gradients)."""
    out = recipe.model_copy(deep=True)
    out.guidance = None
    out.source_path, out.root = recipe.source_path, recipe.root
    refs = {m.model for m in out.models or []}
    for kind, table in (("density", densities), ("weight", weights)):
        for ref in table or {}:
            if ref not in refs:
                raise GuidanceError(f"{recipe.where}: guidance {kind} map for {ref!r}, which the recipe does not merge")
    for m in out.models or []:
        if densities and m.model in densities:
            original = _original(recipe, m.parameters, "density")
            m.parameters["density"] = [{"filter": t, "value": float(v)} for t, v in densities[m.model].items()] + (
                _fallback(original) or [{"value": 1.0}]
            )
        if weights and m.model in weights:
            original = _original(recipe, m.parameters, "weight")
            entries = []
            for t, w in weights[m.model].items():
                if pmap.layer_index(t) is None:  # outside the layers Sens-Merging leaves the weight alone
                    continue
                base = 1.0 if original is None else pmap.evaluate(original, t, pmap.layer_position(t, num_layers or 1))
                if base is None:
                    base = 1.0
                entries.append({"filter": t, "value": float(base) * float(w)})
            m.parameters["weight"] = entries + (_fallback(original) or [{"value": 1.0}])
    return out
