"""Sens-Merging: per-layer, per-expert coefficients from sensitivity and logit alignment.

There is no official code; this is the reconstruction in docs/methods.md with every open choice fixed:

Sensitivity (expert i on its own task's calibration batches b = 1..B, layer l):
    L_b      = mean next-token cross-entropy over the batch's selected targets (every real token; the
               answer tokens only with answer-only calibration; targets at padding ignored)
    S_i^l    = (1/B) sum_b sum_{theta in layer l} |theta * dL_b/dtheta|     (float32, gradients of the
               parameters of model.model.layers[l] only)
    alpha_i^l = S_i^l / ||S_i||_2        (norm over the layers; all-zero S gives alpha = 0)

Alignment: g_ij = mean over the real tokens t of task j's texts (with answer-only calibration: the
positions t whose next token is an answer token) of
    KL( softmax(z_j(t)) || softmax(z_i(t)) )
the divergence of expert i's next-token distribution from expert j's (the specialist) on task j;
g_jj = 0, g >= 0, smaller = better aligned.

Cross-task factor (direction: better alignment -> larger tau, so it is never penalised):
    a_i   = mean_{j != i} exp(-g_ij)          in (0, 1]; 1 when i agrees with every specialist
    tau_i = a_i / mean_k a_k                  (mean tau = 1; one expert or all equal -> tau = 1)

Coefficients (temperature T > 0):
    sigma_i^l = exp(alpha_i^l tau_i / T) / sum_k exp(alpha_k^l tau_k / T)
so sigma sums to 1 over experts in every layer, and equal alpha*tau gives sigma = 1/K.
Normalisation of the sensitivities (recipe option `normalize`; "l2" is the faithful default above):
    "l2"     alpha_i^l = S_i^l / ||S_i||_2                              (shrinks like 1/sqrt(L) with depth L)
    "rms"    alpha_i^l = S_i^l / sqrt(mean_l (S_i^l)^2) = sqrt(L) * l2  (mean square 1 at any depth, so a
                                                                         temperature means the same for any L)
    "layer"  alpha_i^l = r_i^l / mean_k r_k^l,  r the "rms" alpha        (each layer's alpha averages 1 over
                                                                         the experts: the depth profile all
                                                                         experts share cancels, and what is
                                                                         left is each expert's sensitivity
                                                                         relative to the others at that layer)
All-zero S gives alpha = 0 ("layer": a layer where every r is 0 gives alpha = 1 for each expert).

The merge is theta^l = theta_0^l + K sum_i sigma_i^l delta_i^l: `tensor_weights` returns the per-tensor
weights w_i = K sigma_i^l for task arithmetic (lambda 1), so uniform sigma is plain task arithmetic.
Tensors outside the decoder layers (embeddings, final norm, lm_head) take sigma = 1/K, i.e. w = 1.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..core.params import layer_index
from .calibration import Batch
from .errors import GuidanceError
from .model import decoder_layers


def lm_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets that are selected tokens (`Batch.select`: every
    real token, or the answer tokens) (float32)."""
    labels = batch.labels()[:, 1:]
    n = int((labels != -100).sum())
    if n == 0:
        raise GuidanceError(
            "calibration batch has no next-token targets (every text is a single token, or no answer token "
            "follows another token)"
        )
    return (
        F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        / n
    )


def sensitivity(model, batches: Iterable[Batch], device: str | torch.device = "cpu") -> dict[int, float]:
    """{layer index: S^l} for `model` (moved to `device`) on `batches`. `.grad` fields are left as found.

    Memory: one model, the batch's activations and one parameter's gradient at a time, not a second
    model of gradients: each decoder-layer parameter's |theta * dL/dtheta| is summed by a hook the
    moment its gradient is accumulated, and the gradient is dropped there (parameters outside the
    decoder layers get no gradient). The per-parameter sums are added up per layer in parameter
    order, the same arithmetic as taking every gradient at once."""
    device = torch.device(device)
    model.to(device)
    _, layers = decoder_layers(model)
    params = [list(layer.parameters()) for layer in layers]
    flat = [p for ps in params for p in ps]
    slot = {id(p): k for k, p in enumerate(flat)}
    everything = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in everything]
    contrib: list[Optional[torch.Tensor]] = [None] * len(flat)

    def take(p: torch.Tensor) -> None:
        contrib[slot[id(p)]] = (p.detach().float() * p.grad.float()).abs().sum()
        p.grad = None

    totals = torch.zeros(len(layers), dtype=torch.float64)
    n = 0
    hooks = []
    try:
        for p in everything:
            p.requires_grad_(False)
            p.grad = None
        for p in flat:
            p.requires_grad_(True)
            hooks.append(p.register_post_accumulate_grad_hook(take))
        with torch.enable_grad():
            for b in batches:
                b = b.to(device)
                contrib[:] = [None] * len(flat)
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
                loss = lm_loss(logits, b)
                del logits
                loss.backward()
                k = 0
                for li, ps in enumerate(params):
                    s = torch.zeros((), dtype=torch.float32, device=device)
                    for _ in ps:
                        if contrib[k] is None:
                            raise GuidanceError(f"sensitivity: parameter {k} of layer {li} is not on the loss's path")
                        s += contrib[k]
                        k += 1
                    totals[li] += float(s)
                n += 1
    finally:
        for h in hooks:
            h.remove()
        for p, (r, g) in zip(everything, saved):
            p.requires_grad_(r)
            p.grad = g
    if n == 0:
        raise GuidanceError("no calibration batches")
    return {li: float(v) / n for li, v in enumerate(totals)}


NORMALIZE = ("l2", "rms", "layer")


def alpha(sens: dict[int, float], normalize: str = "l2") -> dict[int, float]:
    """alpha^l = S^l / ||S||_2 over the layers ("rms": times sqrt(L); "layer" needs every expert: alphas)."""
    if normalize not in ("l2", "rms"):
        raise GuidanceError(f"per-expert Sens normalisation must be l2 or rms, got {normalize!r}")
    norm = math.sqrt(sum(v * v for v in sens.values()))
    if normalize == "rms":
        norm /= math.sqrt(max(1, len(sens)))
    return {layer: (v / norm if norm > 0 else 0.0) for layer, v in sens.items()}


def alphas(sens: dict[str, dict[int, float]], normalize: str = "l2") -> dict[str, dict[int, float]]:
    """{expert: {layer: alpha}} under `normalize` (module docstring)."""
    if normalize not in NORMALIZE:
        raise GuidanceError(f"Sens-Merging normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
    if normalize != "layer":
        return {n: alpha(s, normalize) for n, s in sens.items()}
    r = {n: alpha(s, "rms") for n, s in sens.items()}
    out: dict[str, dict[int, float]] = {n: {} for n in sens}
    for layer in next(iter(r.values()), {}):
        mean = sum(r[n][layer] for n in r) / len(r)
        for n in r:
            out[n][layer] = r[n][layer] / mean if mean > 0 else 1.0
    return out


def kl_positions(batch: Batch) -> torch.Tensor:
    """(B, T) bool: the positions the alignment KL averages over: every real token, or (answer-only
    calibration) the positions whose next token is an answer token, those the Sens loss scores."""
    if batch.answer_mask is None:
        return batch.attention_mask.bool()
    pos = torch.zeros_like(batch.answer_mask, dtype=torch.bool)
    pos[:, :-1] = batch.answer_mask[:, 1:].bool() & batch.attention_mask[:, :-1].bool()
    return pos


def logit_kl(reference, model, batches: Iterable[Batch], device: str | torch.device = "cpu") -> float:
    """Mean over `kl_positions` of KL(softmax(reference logits) || softmax(model logits))."""
    device = torch.device(device)
    reference.to(device)
    model.to(device)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            b = b.to(device)
            mask = kl_positions(b)
            lp = F.log_softmax(
                reference(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits.float()[mask],
                dim=-1,
            )
            lq = F.log_softmax(
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits.float()[mask],
                dim=-1,
            )
            total += float((lp.exp() * (lp - lq)).sum())
            count += int(mask.sum())
    if count == 0:
        raise GuidanceError("no calibration tokens")
    return total / count


def alignment(
    models: dict[str, torch.nn.Module], tasks: dict[str, list[Batch]], device: str | torch.device = "cpu"
) -> dict[str, dict[str, float]]:
    """g[i][j] = logit_kl(models[j], models[i], tasks[j]); tasks[j] are expert j's own task texts."""
    if set(models) != set(tasks):
        raise GuidanceError(f"alignment needs one task set per expert: experts {sorted(models)}, tasks {sorted(tasks)}")
    return {
        i: {j: (0.0 if i == j else logit_kl(models[j], models[i], tasks[j], device)) for j in models} for i in models
    }


def alignment_streamed(
    load: Callable[[str], torch.nn.Module],
    tasks: dict[str, list[Batch]],
    scratch: str | os.PathLike,
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, float]]:
    """The same g as `alignment`, holding one model at a time: `load(name)` returns expert `name`'s
    model (each is loaded twice and dropped before the next).

    Pass 1 loads each specialist j and writes its float32 log-probabilities at the `kl_positions` of
    its own task, one safetensors file per batch, under `scratch`; pass 2 loads each expert i and sums
    KL(p_j || q_i) over every other task j against the stored log-probabilities, batch by batch, in the
    same order and arithmetic as `logit_kl`, so the numbers are identical. Memory: one model plus one
    batch's logits; disk: (KL positions of every task) x vocabulary x 4 bytes, removed at the end."""
    names = list(tasks)
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)

    def logits(model, b: Batch) -> torch.Tensor:
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits.float()

    try:
        with torch.no_grad():
            for j_no, j in enumerate(names):
                model = load(j).to(device)
                for b_no, b in enumerate(tasks[j]):
                    b = b.to(device)
                    lp = F.log_softmax(logits(model, b)[kl_positions(b)], dim=-1)
                    save_file({"lp": lp.cpu().contiguous()}, str(scratch / f"{j_no}_{b_no}.safetensors"))
                del model
            g: dict[str, dict[str, float]] = {i: {} for i in names}
            for i in names:
                model = load(i).to(device) if len(names) > 1 else None
                for j_no, j in enumerate(names):
                    if i == j:
                        g[i][j] = 0.0
                        continue
                    total, count = 0.0, 0
                    for b_no, b in enumerate(tasks[j]):
                        b = b.to(device)
                        mask = kl_positions(b)
                        lp = load_file(str(scratch / f"{j_no}_{b_no}.safetensors"))["lp"].to(device)
                        lq = F.log_softmax(logits(model, b)[mask], dim=-1)
                        total += float((lp.exp() * (lp - lq)).sum())
                        count += int(mask.sum())
                    if count == 0:
                        raise GuidanceError(f"alignment: task of expert {j!r} has no calibration tokens")
                    g[i][j] = total / count
                del model
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {i: {j: g[i][j] for j in names} for i in names}


def tau(g: dict[str, dict[str, float]]) -> dict[str, float]:
    """tau_i = a_i / mean_k a_k with a_i = mean_{j != i} exp(-g_ij): better alignment, larger tau."""
    names = list(g)
    if len(names) == 1:
        return {names[0]: 1.0}
    a = {}
    for i in names:
        others = [j for j in names if j != i]
        try:
            a[i] = sum(math.exp(-g[i][j]) for j in others) / len(others)
        except KeyError as e:
            raise GuidanceError(f"alignment matrix: no entry g[{i!r}][{e.args[0]!r}]") from None
    mean = sum(a.values()) / len(a)
    return {i: a[i] / mean for i in names}


def coefficients(
    sens: dict[str, dict[int, float]], taus: dict[str, float], temperature: float = 2.0, normalize: str = "l2"
) -> dict[str, dict[int, float]]:
    """sigma_i^l = softmax over experts i of alpha_i^l * tau_i / T (alpha under `normalize`)."""
    if temperature <= 0:
        raise GuidanceError(f"Sens-Merging temperature must be > 0, got {temperature}")
    names = list(sens)
    if set(names) != set(taus):
        raise GuidanceError(f"sensitivities for {sorted(names)} but tau for {sorted(taus)}")
    layers = sorted(sens[names[0]])
    for n in names:
        if sorted(sens[n]) != layers:
            raise GuidanceError(
                f"expert {n!r}: sensitivities cover layers {sorted(sens[n])}, expert {names[0]!r} covers {layers}"
            )
    al = alphas(sens, normalize)
    out: dict[str, dict[int, float]] = {n: {} for n in names}
    for layer in layers:
        z = torch.tensor([al[n][layer] * taus[n] / temperature for n in names], dtype=torch.float64)
        sig = torch.softmax(z, dim=0)
        for n, s in zip(names, sig.tolist()):
            out[n][layer] = s
    return out


def tensor_weights(coeffs: dict[str, dict[int, float]], tensor_names: Iterable[str]) -> dict[str, dict[str, float]]:
    """{expert: {tensor: K * sigma^l}} (task-arithmetic weights); tensors outside layers get 1."""
    k = len(coeffs)
    out: dict[str, dict[str, float]] = {n: {} for n in coeffs}
    for t in tensor_names:
        li = layer_index(t)
        for n, c in coeffs.items():
            if li is None:
                out[n][t] = 1.0
            elif li not in c:
                raise GuidanceError(f"tensor {t!r}: no Sens-Merging coefficient for layer {li} of expert {n!r}")
            else:
                out[n][t] = k * c[li]
    return out
