"""The zoo's quality check: base, every expert and task-arithmetic merges on every skill.

Merges here are plain task arithmetic on in-memory state dicts (independent of the merge engine)::

    theta = theta_base + lam * sum_i (theta_i - theta_base)        (every expert weight 1)

- ``uniform``: lam = 1, the plain sum of all task vectors;
- ``tuned``: the best lam of :data:`LAMBDAS` by the average exact match over the skills (ties:
  the average answer log-probability). lam = 1/K is plain weight averaging. The lam is chosen on
  the same held-out eval sets it is reported on (an oracle choice, as in most merging papers'
  "tuned" baselines), so read it as the best a tuned task arithmetic can do.

The criteria (:meth:`QualityReport.failures`):

1. every expert beats the base on its own skill by at least :data:`MIN_EXPERT_GAIN` exact match;
2. the uniform merge loses at least :data:`MIN_INTERFERENCE` of each expert's exact match on that
   expert's skill (interference: better methods have room to show gains);
3. the best standard merge (the tuned task arithmetic, or TIES at density 0.5 with the better of
   two λ) beats the base on the average over the skills by at least :data:`MIN_MERGE_GAIN`
   (merging is worth doing at all).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

LAMBDAS: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
MIN_EXPERT_GAIN = 0.2
MIN_INTERFERENCE = 0.10
MIN_MERGE_GAIN = 0.03


@dataclass
class QualityReport:
    skills: list[str]
    exact_match: dict[str, dict[str, float]]     # row -> skill -> exact match (greedy)
    logprob: dict[str, dict[str, float]]         # row -> skill -> mean answer log-probability
    rows: list[str]                              # table order: base, expert_<skill>..., merges
    tuned_lambda: float
    lambdas: list[float]
    n: int                                        # eval documents per skill
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def average(self, row: str) -> float:
        return sum(self.exact_match[row][s] for s in self.skills) / len(self.skills)

    def failures(self) -> list[str]:
        """The quality criteria that do not hold (empty when the zoo is fit for comparing merges)."""
        out = []
        base, uni, tuned = self.exact_match["base"], self.exact_match["ta_uniform"], self.exact_match["ta_tuned"]
        for s in self.skills:
            e = self.exact_match[f"expert_{s}"][s]
            if e - base[s] < MIN_EXPERT_GAIN:
                out.append(f"expert {s} beats the base on {s} by {e - base[s]:+.3f} < {MIN_EXPERT_GAIN}")
            if e - uni[s] < MIN_INTERFERENCE:
                out.append(f"uniform merge loses only {e - uni[s]:+.3f} of expert {s} on {s} < {MIN_INTERFERENCE}")
        best = max((r for r in ("ta_tuned", "ties") if r in self.exact_match), key=self.average)
        gain = self.average(best) - self.average("base")
        if gain < MIN_MERGE_GAIN:
            out.append(f"the best standard merge ({row_label(best, self.tuned_lambda, len(self.skills))}) beats "
                       f"the base average by {gain:+.3f} < {MIN_MERGE_GAIN}")
        return out

    def markdown(self, logprob: bool = False) -> str:
        """The table: rows x skills, exact match (and answer log-probability if ``logprob``)."""
        head = "| model | " + " | ".join(self.skills) + " | avg |"
        sep = "|---|" + "---:|" * (len(self.skills) + 1)
        lines = [head, sep]
        for row in self.rows:
            cells = []
            for s in self.skills:
                c = f"{self.exact_match[row][s]:.2f}"
                if logprob:
                    c += f" ({self.logprob[row][s]:.2f})"
                cells.append(c)
            label = row_label(row, self.tuned_lambda, len(self.skills))
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {self.average(row):.3f} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def row_label(row: str, tuned_lambda: float, k: int) -> str:
    if row == "ta_uniform":
        return f"task arithmetic, uniform (λ=1, sum of {k})"
    if row == "ta_tuned":
        return f"task arithmetic, tuned (λ={tuned_lambda:g})"
    if row == "ties":
        return f"TIES (density {TIES_DENSITY:g}, best λ)"
    if row.startswith("ties_"):
        return f"TIES λ={row[5:]}"
    if row.startswith("ta_"):
        return f"task arithmetic λ={row[3:]}"
    if row.startswith("expert_"):
        return f"expert {row[7:]}"
    return row


def task_arithmetic(base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]], lam: float,
                    weights: Optional[list[float]] = None) -> dict[str, torch.Tensor]:
    """theta_base + lam * sum_i w_i (theta_i - theta_base), in float32, per tensor."""
    weights = weights or [1.0] * len(experts)
    if len(weights) != len(experts):
        raise ValueError(f"task_arithmetic: {len(weights)} weights for {len(experts)} experts")
    out = {}
    for name, b in base.items():
        b32 = b.float()
        delta = torch.zeros_like(b32)
        for w, e in zip(weights, experts):
            if name not in e:
                raise KeyError(f"task_arithmetic: tensor {name!r} missing from an expert")
            delta += w * (e[name].float() - b32)
        out[name] = (b32 + lam * delta).to(b.dtype)
    return out


TIES_DENSITY = 0.5
TIES_LAMBDAS: tuple[float, ...] = (0.5, 1.0)


def ties(base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]], lam: float,
         density: float = TIES_DENSITY) -> dict[str, torch.Tensor]:
    """TIES (merge_dag's own `ties` method, weight 1 per expert) on in-memory state dicts."""
    from ..core.methods.base import TensorTask
    from ..core.methods.ties import Ties

    method = Ties()
    params = {"lambda": lam, "normalize": True, "rescale": False, "int8_mask": False}
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b
            continue
        task = TensorTask(name, b.float().clone(), [e[name].float().clone() for e in experts],
                          [{"weight": 1.0, "density": density} for _ in experts], params)
        out[name] = method.merge(task).to(b.dtype)
    return out


def _scores(model, skills, tokenizer, device, limit, batch_size) -> tuple[dict, dict, int]:
    from ..evaluation import evaluate
    from ..evaluation.tasks import gen_task_name, ll_task_name

    tasks = [gen_task_name(s) for s in skills] + [ll_task_name(s) for s in skills]
    recs = evaluate(model, tasks, device=device, limit=limit, batch_size=batch_size, tokenizer=tokenizer)
    em, lp, n = {}, {}, 0
    for r in recs:
        for s in skills:
            if r.task == gen_task_name(s) and r.metric == "exact_match":
                em[s] = r.value
                n = r.n or n
            elif r.task == ll_task_name(s) and r.metric == "logprob":
                lp[s] = r.value
    missing = [s for s in skills if s not in em or s not in lp]
    if missing:
        raise RuntimeError(f"evaluation returned no exact_match/logprob for skills {missing}")
    return em, lp, n


def check_quality(zoo, device: str = "cpu", limit: Optional[int] = None, batch_size: int = 64,
                  lambdas: tuple[float, ...] = LAMBDAS, progress: bool = True,
                  ties_lambdas: tuple[float, ...] = TIES_LAMBDAS) -> QualityReport:
    """Evaluate base, experts and task-arithmetic merges of ``zoo`` (a manifest or its folder)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from .build import ZooManifest

    man = zoo if isinstance(zoo, ZooManifest) else ZooManifest.load(Path(zoo))
    skills = list(man.skills)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(man.base))
    model = LlamaForCausalLM.from_pretrained(str(man.base), dtype="float32").eval()
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    expert_sds = []
    for s in skills:
        m = LlamaForCausalLM.from_pretrained(str(man.expert(s)), dtype="float32")
        expert_sds.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        del m

    em: dict[str, dict[str, float]] = {}
    lp: dict[str, dict[str, float]] = {}
    n = 0

    def run(row: str, sd: dict) -> None:
        nonlocal n
        model.load_state_dict(sd)
        em[row], lp[row], n = _scores(model, skills, tok, device, limit, batch_size)
        if progress:
            avg = sum(em[row].values()) / len(skills)
            print(f"  eval {row_label(row, 0, len(skills)):<40s} " +
                  " ".join(f"{s}={em[row][s]:.2f}" for s in skills) + f"  avg={avg:.3f}",
                  file=sys.stderr, flush=True)

    run("base", base_sd)
    for s, sd in zip(skills, expert_sds):
        run(f"expert_{s}", sd)
    for lam in sorted(set(lambdas) | {1.0}):
        run(f"ta_{lam:g}", task_arithmetic(base_sd, expert_sds, lam))
    for lam in ties_lambdas:
        run(f"ties_{lam:g}", ties(base_sd, expert_sds, lam))
    grid = sorted(set(lambdas) | {1.0})
    best = max(grid, key=lambda lam: (sum(em[f"ta_{lam:g}"].values()), sum(lp[f"ta_{lam:g}"].values())))
    em["ta_uniform"], lp["ta_uniform"] = em["ta_1"], lp["ta_1"]
    em["ta_tuned"], lp["ta_tuned"] = em[f"ta_{best:g}"], lp[f"ta_{best:g}"]
    rows = ["base", *[f"expert_{s}" for s in skills], "ta_uniform", "ta_tuned"]
    if ties_lambdas:
        best_ties = max(ties_lambdas, key=lambda lam: (sum(em[f"ties_{lam:g}"].values()),
                                                      sum(lp[f"ties_{lam:g}"].values())))
        em["ties"], lp["ties"] = em[f"ties_{best_ties:g}"], lp[f"ties_{best_ties:g}"]
        rows.append("ties")
        extra_ties = {"ties_lambda": best_ties, "ties_density": TIES_DENSITY}
    else:
        extra_ties = {}
    return QualityReport(skills=skills, exact_match=em, logprob=lp, rows=rows, tuned_lambda=best,
                         lambdas=grid, n=n, seconds=round(time.perf_counter() - t0, 2),
                         extra={"zoo": man.root, "settings_key": man.settings_key, **extra_ties})
