"""Fisher merging (Matena & Raffel 2022, arXiv 2111.09832): each parameter averaged with weights w_i F_i,
F_i the diagonal Fisher information of expert i on its own calibration set.

The statistic (`fisher_diagonal`): a calibration row n is one sequence; its targets T_n are the next-token
positions the batch selects (every real token after the first, or with `tokens: answer` the answer tokens:
`Batch.select`, as the Sens loss). Per row, one forward and one backward pass of the row alone (no padding)
give the score of its targets
    g_n = d/dtheta sum_{t in T_n} log p_theta(y_t | x_<t)
and the diagonal Fisher is the per-target-token mean of its square (elementwise, float32):
    F = sum_n g_n^2 / sum_n |T_n|
Two estimators of y (recipe option `estimator`):
    sampled    (default; the paper's Fisher, E over y ~ p_theta) y_t drawn from the model's own next-token
               distribution at every target position independently (torch.Generator seeded with 0 on the
               configured device). The score has mean zero at each position and the draws are independent,
               so the cross terms of (sum_t g_t)^2 vanish in expectation: E[g_n^2] = sum_{t in T_n} E[g_t^2],
               and F is an unbiased Monte Carlo estimate of the mean per-token Fisher (one draw per token).
    empirical  y_t the calibration text's own next token (the "empirical Fisher" of the data's labels).
Every parameter of the model is scored (decoder layers, embeddings, norms, lm_head); a parameter tied to
another (tied embeddings) is one parameter with the sum of both uses' gradients, stored once under its
first state-dict name (the others in `tied`). Memory: the model, the Fisher (one float32 copy of the
parameters) and one parameter's gradient at a time (each gradient is squared into F by a post-accumulate
hook and dropped at once). Saved as `fisher.safetensors` (float32, one tensor per parameter) +
`fisher.json` (estimator, seed, rows, target tokens, tied names, settings).

The merge (`fisher_checkpoint`, a `linear` recipe with `guidance.fisher`), per element of each tensor,
w_i the linear weight of expert i for that tensor (w_i >= 0; the scale of w cancels):
    no base_model:  F~_i = max(F_i, epsilon)                        (the paper's Fisher floor)
                    theta = sum_i w_i F~_i theta_i / sum_i w_i F~_i
                    an element no expert's Fisher reaches (all F_i <= epsilon) is the w-weighted mean,
                    i.e. the plain linear merge; one expert gives back its theta
    base_model:     theta = (epsilon theta_0 + sum_i w_i F_i theta_i) / (epsilon + sum_i w_i F_i)
                    the base joins as a model with Fisher epsilon everywhere (it gets no Fisher pass), the
                    experts' Fishers are not floored: an element no expert's Fisher reaches stays the
                    base's, elsewhere the base's share is epsilon / (epsilon + sum_i w_i F_i)
A checkpoint tensor none of the statistics has (not a parameter of the model, e.g. a saved buffer) has no
Fisher mass: the weighted mean, or the base's. All sums in float32 on the configured device; floating tensors
are written in `out_dtype` (the recipe's `out_dtype`, else `dtype`), else in the first expert's dtypes (the
base's when there is one), whose config and tokenizer files the output copies.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..core import params as pmap
from ..core.checkpoint import (
    COPIED_FILES,
    TOKENIZER_FILES,
    Checkpoint,
    CheckpointWriter,
    OutTensor,
    atomic_replace_dir,
    parse_dtype,
    parse_size,
)
from .calibration import Batch
from .errors import GuidanceError

FISHER_FILE = "fisher.safetensors"
META_FILE = "fisher.json"
ESTIMATORS = ("sampled", "empirical")
DEFAULT_EPSILON = 1e-6
SEED = 0
FORMAT = 1


@dataclass
class FisherStats:
    """A diagonal Fisher: in memory (`tensors`) or read lazily, one tensor at a time, from a saved folder."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # empty when read from `folder`
    meta: dict = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)  # alias state-dict name -> the name it is stored under
    source: str = "<memory>"
    folder: Optional[Path] = None
    _names: Optional[set] = None
    _shapes: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """The stored names (one per parameter)."""
        return sorted(self._names) if self._names is not None else list(self.tensors)

    def has(self, name: str) -> bool:
        return self.tied.get(name, name) in (self._names if self._names is not None else self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        key = self.tied.get(name, name)
        return tuple(self._shapes[key]) if self._names is not None else tuple(self.tensors[key].shape)

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """F of tensor `name` (a tied alias resolves to the stored name), float32 on `device`."""
        key = self.tied.get(name, name)
        if not self.has(name):
            raise GuidanceError(f"Fisher statistics {self.source}: no entry for tensor {name!r}")
        if self._names is None:
            return self.tensors[key].to(device, torch.float32)
        try:
            with safe_open(str(self.folder / FISHER_FILE), framework="pt", device="cpu") as f:
                return f.get_tensor(key).to(device, torch.float32)
        except Exception as e:  # safetensors raises its own error types
            raise GuidanceError(f"{self.folder / FISHER_FILE}: cannot read tensor {key!r}: {e}") from e

    def save(self, folder: str | os.PathLike) -> Path:
        """fisher.safetensors + fisher.json into `folder` (atomically: a temporary folder renamed)."""
        folder = Path(folder).absolute()
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            save_file(
                {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.tensors.items()},
                str(tmp / FISHER_FILE),
                metadata={"format": "pt"},
            )
            meta = {"format": FORMAT, **self.meta, "tied": dict(sorted(self.tied.items()))}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return atomic_replace_dir(tmp, folder)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "FisherStats":
        """The statistics saved in `folder` (the header and meta only; tensors are read by `get`)."""
        folder = Path(folder)
        tpath, mpath = folder / FISHER_FILE, folder / META_FILE
        for p in (tpath, mpath):
            if not p.is_file():
                raise GuidanceError(f"{p}: Fisher statistics file is missing")
        try:
            meta = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise GuidanceError(f"{mpath}: invalid JSON ({e})") from e
        if not isinstance(meta, dict) or not isinstance(meta.get("tied", {}), dict):
            raise GuidanceError(f"{mpath}: expected a JSON object with a 'tied' object")
        try:
            with safe_open(str(tpath), framework="pt", device="cpu") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise GuidanceError(f"{tpath}: cannot read Fisher statistics: {e}") from e
        tied = dict(meta.get("tied", {}))
        for alias, key in tied.items():
            if key not in shapes:
                raise GuidanceError(f"{mpath}: tied maps {alias!r} to {key!r}, which has no stored Fisher")
        return cls({}, meta, tied, str(folder), folder, set(shapes), shapes)


def _score_targets(
    logits: torch.Tensor, ids: torch.Tensor, select: torch.Tensor, estimator: str, gen: Optional[torch.Generator]
) -> tuple[torch.Tensor, int]:
    """(sum over the row's target positions of log p(y_t), number of targets). logits (L, V), ids/select (L,)."""
    pos = select[1:]  # position t predicts token t + 1; a target is a selected next token
    n = int(pos.sum())
    if n == 0:
        return logits.sum() * 0, 0
    logp = F.log_softmax(logits[:-1][pos].float(), dim=-1)
    if estimator == "empirical":
        y = ids[1:][pos]
    else:
        y = torch.multinomial(logp.detach().exp(), 1, generator=gen).squeeze(1)
    return logp.gather(1, y[:, None]).sum(), n


def fisher_diagonal(
    model,
    batches: Iterable[Batch],
    device: str | torch.device = "cpu",
    estimator: str = "sampled",
    seed: int = SEED,
    meta: Optional[dict] = None,
) -> FisherStats:
    """The diagonal Fisher of `model` (moved to `device`) on `batches` (module docstring), one row at a time.
    `.grad` fields and `requires_grad` flags are left as they were."""
    if estimator not in ESTIMATORS:
        raise GuidanceError(f"Fisher estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    device = torch.device(device)
    model.to(device)
    named = list(model.named_parameters(remove_duplicate=False))
    if not named:
        raise GuidanceError(f"{type(model).__name__}: no parameters to score")
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    params: dict[str, torch.nn.Parameter] = {}
    for n, p in named:
        if id(p) in first:
            tied[n] = first[id(p)]
        else:
            first[id(p)] = n
            params[n] = p
    acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in params.items()}
    saved = [(p, p.requires_grad, p.grad) for p in params.values()]
    gen = torch.Generator(device=device).manual_seed(seed) if estimator == "sampled" else None

    def hook_for(name: str):
        def hook(p):
            g = p.grad.float()
            acc[name].addcmul_(g, g)
            p.grad = None

        return hook

    handles = []
    rows = tokens = 0
    try:
        for p in params.values():
            p.grad = None
            p.requires_grad_(True)
        handles = [p.register_post_accumulate_grad_hook(hook_for(n)) for n, p in params.items()]
        with torch.enable_grad():
            for b in batches:
                b = b.to(device)
                for r in range(b.input_ids.shape[0]):
                    real = b.attention_mask[r].bool()
                    ids = b.input_ids[r][real]
                    logits = model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], use_cache=False)
                    score, n = _score_targets(logits.logits[0], ids, b.select[r][real], estimator, gen)
                    if n == 0:
                        continue
                    score.backward()
                    rows += 1
                    tokens += n
    finally:
        for h in handles:
            h.remove()
        for p, req, grad in saved:
            p.requires_grad_(req)
            p.grad = grad
    if tokens == 0:
        raise GuidanceError(
            "Fisher: the calibration rows have no target tokens (every text is a single token, or no "
            "answer token follows another token)"
        )
    for a in acc.values():
        a.div_(tokens)
    info = {"estimator": estimator, "seed": seed if estimator == "sampled" else None, "rows": rows, "tokens": tokens}
    return FisherStats(acc, {**info, **(meta or {})}, tied)


# ---------------------------------------------------------------------------------------------- the merge


def fisher_tensor(
    thetas: Sequence[torch.Tensor],
    fishers: Sequence[Optional[torch.Tensor]],
    weights: Sequence[float],
    epsilon: float = DEFAULT_EPSILON,
    base: Optional[torch.Tensor] = None,
    name: str = "tensor",
) -> torch.Tensor:
    """The Fisher-weighted average of one tensor (module docstring), float32 on the inputs' device.
    fishers[i] None: expert i has no Fisher for this tensor (all of them None: no Fisher mass)."""
    if not thetas or not (len(thetas) == len(fishers) == len(weights)):
        raise GuidanceError(f"tensor {name!r}: {len(thetas)} tensors, {len(fishers)} Fishers, {len(weights)} weights")
    if epsilon <= 0:
        raise GuidanceError(f"Fisher epsilon must be > 0, got {epsilon}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise GuidanceError(
            f"tensor {name!r}: Fisher merging needs weights >= 0 with a positive sum, got {list(weights)}"
        )
    shape = thetas[0].shape
    for k, (t, f) in enumerate(zip(thetas, fishers)):
        if t.shape != shape or (f is not None and f.shape != shape):
            raise GuidanceError(
                f"tensor {name!r}: input {k} has shape {list(t.shape)} and Fisher "
                f"{None if f is None else list(f.shape)}; expected {list(shape)}"
            )
    if base is not None and base.shape != shape:
        raise GuidanceError(f"tensor {name!r}: base has shape {list(base.shape)}, the experts {list(shape)}")
    num = torch.zeros(shape, dtype=torch.float32, device=thetas[0].device)
    den = torch.zeros_like(num)
    for t, f, w in zip(thetas, fishers, weights):
        if base is None:
            f = torch.full_like(num, epsilon) if f is None else f.float().clamp_min(epsilon)
        elif f is None:
            continue
        wf = f.float() * w
        num.addcmul_(wf, t.float())
        den.add_(wf)
    if base is not None:
        num.add_(base.float(), alpha=epsilon)
        den.add_(epsilon)
    return num.div_(den)


def _weight_of(value: Any, name: str, num_layers: int, ref: str) -> float:
    w = pmap.evaluate(value, name, pmap.layer_position(name, num_layers))
    if w is None or isinstance(w, bool) or not isinstance(w, (int, float)):
        raise GuidanceError(f"tensor {name!r}: no numeric weight for model {ref!r} (got {w!r})")
    return float(w)


def recipe_out_dtype(recipe) -> Optional[torch.dtype]:
    """The dtype a recipe asks its floating tensors to be written in (`out_dtype`, else `dtype`), or None."""
    name = recipe.out_dtype or recipe.dtype
    return parse_dtype(name) if name else None


def recipe_weights(recipe, refs: Sequence[str]) -> list[Any]:
    """Each expert's `weight` parameter value as the recipe gives it (its models entry, else the top-level
    `parameters`; default 1), in the order of `refs`."""
    out = []
    for ref in refs:
        entry = next((m for m in recipe.models or [] if m.model == ref), None)
        own = entry.parameters if entry is not None else {}
        out.append(own.get("weight", recipe.parameters.get("weight", 1.0)))
    return out


def fisher_checkpoint(
    experts: Sequence[str | os.PathLike | Checkpoint],
    fishers: Sequence[FisherStats],
    out_dir: str | os.PathLike,
    weights: Optional[Sequence[Any]] = None,
    base: Optional[str | os.PathLike | Checkpoint] = None,
    epsilon: float = DEFAULT_EPSILON,
    device: str | torch.device = "cpu",
    shard_size: str | int = "2GB",
    out_dtype: Optional[torch.dtype] = None,
    log: Callable[[str], None] = lambda _m: None,
) -> Path:
    """Merge `experts` (fishers[i]: expert i's diagonal Fisher) into `out_dir`, streaming one tensor of
    each input (and its Fishers) at a time. weights[i]: expert i's `weight` parameter value (a number, a
    gradient over layers or a filter list, as in recipes; default 1 each)."""
    cks = [e if isinstance(e, Checkpoint) else Checkpoint(e) for e in experts]
    base_ck = None if base is None else base if isinstance(base, Checkpoint) else Checkpoint(base)
    if not cks or len(cks) != len(fishers):
        raise GuidanceError(f"Fisher merging needs one Fisher per expert: {len(cks)} experts, {len(fishers)} Fishers")
    weights = [1.0] * len(cks) if weights is None else list(weights)
    if len(weights) != len(cks):
        raise GuidanceError(f"Fisher merging: {len(cks)} experts but {len(weights)} weights")
    if epsilon <= 0:
        raise GuidanceError(f"Fisher epsilon must be > 0, got {epsilon}")
    ref = base_ck if base_ck is not None else cks[0]
    for ck in cks + ([base_ck] if base_ck is not None else []):
        if set(ck.tensors) != set(ref.tensors):
            diff = sorted(set(ck.tensors) ^ set(ref.tensors))[0]
            raise GuidanceError(f"models {ref.name!r} and {ck.name!r} differ in tensor {diff!r}")
    for ck, fs in zip(cks, fishers):
        for n in fs.names:
            if n not in ref.tensors:
                raise GuidanceError(
                    f"Fisher statistics {fs.source}: tensor {n!r} is not in model {ref.name!r} "
                    "(statistics of another architecture?)"
                )
            if fs.shape(n) != tuple(ref.info(n).shape):
                raise GuidanceError(
                    f"Fisher statistics {fs.source}: tensor {n!r} has shape {list(fs.shape(n))}, "
                    f"model {ck.name!r} {list(ref.info(n).shape)}"
                )
    num_layers = int(ref.config().get("num_hidden_layers") or 1)
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    plan = [
        OutTensor(n, i.shape, out_dtype if out_dtype is not None and i.dtype in floats else i.dtype)
        for n, i in ref.tensors.items()
    ]
    meta = {"guidance": "fisher", "epsilon": str(epsilon)}
    t0 = time.perf_counter()
    with CheckpointWriter(out_dir, plan, parse_size(shard_size), metadata=meta) as w:
        for t in plan:
            have = [fs.has(t.name) for fs in fishers]
            if any(have) and not all(have):
                missing = fishers[have.index(False)].source
                raise GuidanceError(f"Fisher statistics {missing}: no entry for tensor {t.name!r}, which others have")
            thetas = [ck.get(t.name, device=device, dtype=torch.float32) for ck in cks]
            fs = [fs.get(t.name, device) if h else None for fs, h in zip(fishers, have)]
            ws = [_weight_of(v, t.name, num_layers, ck.name) for v, ck in zip(weights, cks)]
            b = base_ck.get(t.name, device=device, dtype=torch.float32) if base_ck is not None else None
            w.write(t.name, fisher_tensor(thetas, fs, ws, epsilon, b, t.name).to(t.dtype))
        w.copy_files(ref.folder, COPIED_FILES + TOKENIZER_FILES)
        out = w.commit()
    log(f"Fisher merge of {len(cks)} experts: {time.perf_counter() - t0:.1f} s")
    return out
