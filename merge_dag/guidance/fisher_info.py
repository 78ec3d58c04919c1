"""The diagonal Fisher information of a model on a calibration set (for Fisher merging: fisher.py).

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
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open

from .calibration import Batch
from .errors import GuidanceError
from .stats_io import read_stats_meta, save_stats_folder

FISHER_FILE = "fisher.safetensors"
META_FILE = "fisher.json"
ESTIMATORS = ("sampled", "empirical")
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

    def mean(self) -> float:
        """The mean of F over every stored parameter element (tied parameters once), read one tensor at a time."""
        total, count = 0.0, 0
        for n in self.names:
            f = self.get(n)
            total += float(f.double().sum())
            count += f.numel()
        return total / count if count else 0.0

    def save(self, folder: str | os.PathLike) -> Path:
        """fisher.safetensors + fisher.json into `folder` (atomically: a temporary folder renamed)."""
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.tensors.items()}
        meta = {"format": FORMAT, **self.meta, "tied": dict(sorted(self.tied.items()))}
        return save_stats_folder(folder, tensors, (FISHER_FILE, META_FILE), meta)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "FisherStats":
        """The statistics saved in `folder` (the header and meta only; tensors are read by `get`)."""
        folder = Path(folder)
        tpath, mpath, meta = read_stats_meta(folder, (FISHER_FILE, META_FILE), "Fisher statistics")
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
