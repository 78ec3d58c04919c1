"""LoRA fine-tuning of the real zoo's experts (peft): r 8 on every linear projection of every layer.

The loss is the mean cross-entropy of the answer tokens and the end-of-turn token after the chat
prompt (the prompt's own tokens are masked with -100). AdamW with a linear warm-up and a cosine
decay; batches are drawn from :func:`merge_dag.zoo.real.tasks.training_stream`, so the same seed
gives the same batches, and with deterministic kernels and a fixed thread count the same adapter.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from .tasks import END, chat_prompt, training_stream

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSpec:
    steps: int = 50
    lr: float = 2e-3
    batch_size: int = 8
    warmup: int = 5
    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = field(default=LORA_TARGETS)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


def encode(tok, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 except on answer + end-of-turn)."""
    end_id = tok.convert_tokens_to_ids(END)
    seqs, labs = [], []
    for q, a in pairs:
        p = tok(chat_prompt(q), add_special_tokens=False)["input_ids"]
        y = tok(a, add_special_tokens=False)["input_ids"] + [end_id]
        seqs.append(p + y)
        labs.append([-100] * len(p) + y)
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else end_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    labels = torch.tensor([y + [-100] * (width - len(y)) for y in labs])
    return ids, mask, labels


def lora_model(base, spec: LoraSpec, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=0.0,
        target_modules=list(spec.targets),
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(base, cfg)


def train_lora(model, tok, task: str, spec: LoraSpec, seed: int, progress: bool = True) -> dict:
    """Train the (peft) ``model`` in place on ``task``; returns a log {losses, seconds}."""
    stream = training_stream(task, seed)
    dev = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        t = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(spec.steps):
        ids, mask, labels = encode(tok, [next(stream) for _ in range(spec.batch_size)])
        loss = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(round(float(loss), 4))
        if progress and (step % 10 == 0 or step == spec.steps - 1):
            print(
                f"    {task} step {step + 1}/{spec.steps} loss {losses[-1]:.3f} ({time.perf_counter() - t0:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
    model.eval()
    return {"losses": losses, "seconds": round(time.perf_counter() - t0, 1)}
