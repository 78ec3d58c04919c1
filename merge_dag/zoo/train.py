"""Deterministic CPU training of the zoo's tiny Llama models.

Determinism: a fixed seed for weights and data order, ``torch.use_deterministic_algorithms``, a
fixed thread count (:data:`THREADS`) and no data-loader workers, so the same settings give
bit-identical weights on the same machine. The loss covers only the answer and its ``<eos>``.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .skills import training_stream
from .tokenizer import MAX_LENGTH, VOCAB_SIZE, build_tokenizer

THREADS = 2


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int

    def config(self, tok):
        from transformers import LlamaConfig

        cfg = LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=MAX_LENGTH,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        cfg.architectures = ["LlamaForCausalLM"]
        return cfg


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    lr: float
    batch_size: int
    warmup: int = 0
    schedule: str = "cosine"  # cosine (to min_lr_ratio * lr) or constant
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    long_fraction: Optional[float] = None  # None: input sizes like the eval sets; else see training_stream
    optimizer: str = "adamw"  # adamw, or sgd (momentum 0.9): updates proportional to the gradient


@contextlib.contextmanager
def deterministic(threads: int = THREADS):
    """Deterministic kernels and a fixed thread count, restored afterwards."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


def new_model(shape: ModelShape, seed: int):
    from transformers import LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(shape.config(tok))
    return model.float()


def encode_batch(tok, examples: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 except on the answer and <eos>)."""
    seqs, labels = [], []
    for prompt, answer in examples:
        p = tok.encode(prompt, add_special_tokens=False)
        a = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), tok.pad_token_id, dtype=torch.long)
    lab = torch.full((len(seqs), n), -100, dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(lb)] = torch.tensor(lb)
    return ids, lab


def _lr_at(spec: TrainSpec, step: int) -> float:
    if spec.warmup and step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    if spec.schedule == "constant":
        return spec.lr
    t = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train(
    model, skills: tuple[str, ...], spec: TrainSpec, seed: int, label: str = "train", progress: bool = True
) -> dict:
    """Train ``model`` in place on a stream of ``skills`` examples; returns a small log."""
    tok = build_tokenizer()
    stream: Iterator = training_stream(skills, seed, spec.long_fraction)
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if spec.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.98), eps=1e-8, foreach=False)
    elif spec.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=spec.lr, momentum=0.9, foreach=False)
    else:
        raise ValueError(f"TrainSpec.optimizer: unknown optimizer {spec.optimizer!r} (adamw or sgd)")
    model.train()
    t0 = time.perf_counter()
    ema = None
    losses = []
    every = max(1, spec.steps // 20)
    for step in range(spec.steps):
        batch = [next(stream)[1:] for _ in range(spec.batch_size)]
        ids, lab = encode_batch(tok, batch)
        for g in opt.param_groups:
            g["lr"] = _lr_at(spec, step)
        out = model(input_ids=ids, labels=lab)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip, foreach=False)
        opt.step()
        loss = out.loss.item()
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        if (step + 1) % every == 0 or step + 1 == spec.steps:
            losses.append(round(ema, 4))
            if progress:
                el = time.perf_counter() - t0
                eta = el / (step + 1) * (spec.steps - step - 1)
                print(
                    f"\r  {label}: step {step + 1}/{spec.steps} loss {ema:.3f} ({el:.0f}s, eta {eta:.0f}s)   ",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
    if progress:
        print(file=sys.stderr, flush=True)
    model.eval()
    return {"steps": spec.steps, "seconds": round(time.perf_counter() - t0, 2), "loss_curve": losses}
