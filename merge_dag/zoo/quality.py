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

Each criterion is a difference of exact-match rates d compared with a threshold t. Its margin is
counted in binomial standard errors (:class:`Criterion`)::

    z = (d - t) / SE(d),   SE(a - b) = sqrt(v(a) + v(b)),   v(p) = p~(1 - p~) / n,  p~ = (n p + 1) / (n + 2)

(p~ keeps a rate of 0 or 1 from claiming zero noise); for an average over K skills
v = sum_k v(p_k) / K^2. A criterion *holds* when d >= t and *holds robustly* when z >= 3: only then
would another machine or library version, training the same seeds to slightly different weights,
be expected to see it hold too. Fewer than :data:`MIN_VERDICT_N` prompts per skill make no verdict
(one SE of a single skill's difference is then above 0.07, a third of the expert-gain threshold).
Which criteria hold robustly depends on the machine and library versions (measured on two version
sets in ``bench/zoo_quality.py``), so the tests do not assert them: they live in the benchmark.
"""

from __future__ import annotations

import math
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
MIN_VERDICT_N = 100  # prompts per skill below which the criteria give no verdict
ROBUST_Z = 3.0  # a criterion holds robustly with a margin of at least this many SE


def rate_variance(p: float, n: int) -> float:
    """Binomial variance of an exact-match rate p over n prompts, with p~ = (np + 1)/(n + 2)."""
    pt = (p * n + 1) / (n + 2)
    return pt * (1 - pt) / n


@dataclass(frozen=True)
class Criterion:
    """One quality criterion: ``value`` (a difference of rates) must reach ``threshold``."""

    text: str  # what is claimed, e.g. "expert arev beats the base on arev by >= 0.2"
    value: float
    threshold: float
    se: float

    @property
    def z(self) -> float:
        """The margin (value - threshold) in standard errors."""
        gap = self.value - self.threshold
        return gap / self.se if self.se > 0 else math.copysign(math.inf, gap)

    @property
    def holds(self) -> bool:
        return self.value >= self.threshold

    @property
    def status(self) -> str:
        if self.z >= ROBUST_Z:
            return "holds"
        if self.holds:
            return "holds within noise"
        return "fails" if self.z <= -ROBUST_Z else "fails within noise"

    def line(self) -> str:
        return (
            f"{self.status:<19s} {self.text}: {self.value:+.3f} vs {self.threshold:g} "
            f"(margin {self.z:+.1f} SE, SE {self.se:.3f})"
        )


@dataclass
class QualityReport:
    skills: list[str]
    exact_match: dict[str, dict[str, float]]  # row -> skill -> exact match (greedy)
    logprob: dict[str, dict[str, float]]  # row -> skill -> mean answer log-probability
    rows: list[str]  # table order: base, expert_<skill>..., merges
    tuned_lambda: float
    lambdas: list[float]
    n: int  # eval documents per skill
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def average(self, row: str) -> float:
        return sum(self.exact_match[row][s] for s in self.skills) / len(self.skills)

    def se_average(self, row: str) -> float:
        """Binomial standard error of :meth:`average` (skills independent)."""
        k = len(self.skills)
        return math.sqrt(sum(rate_variance(self.exact_match[row][s], self.n) for s in self.skills)) / k

    def criteria(self) -> list[Criterion]:
        """The three criteria, each with its margin in standard errors (see the module docstring)."""
        out = []
        em, n = self.exact_match, self.n

        def diff(a: float, b: float) -> float:
            return math.sqrt(rate_variance(a, n) + rate_variance(b, n))

        for s in self.skills:
            e, b = em[f"expert_{s}"][s], em["base"][s]
            out.append(
                Criterion(
                    f"expert {s} beats the base on {s} by >= {MIN_EXPERT_GAIN:g}", e - b, MIN_EXPERT_GAIN, diff(e, b)
                )
            )
        for s in self.skills:
            e, u = em[f"expert_{s}"][s], em["ta_uniform"][s]
            out.append(
                Criterion(
                    f"the uniform merge loses >= {MIN_INTERFERENCE:g} of expert {s} on {s}",
                    e - u,
                    MIN_INTERFERENCE,
                    diff(e, u),
                )
            )
        best = max((r for r in ("ta_tuned", "ties") if r in em), key=self.average)
        se = math.sqrt(self.se_average(best) ** 2 + self.se_average("base") ** 2)
        out.append(
            Criterion(
                f"the best standard merge ({row_label(best, self.tuned_lambda, len(self.skills))}) "
                f"beats the base average by >= {MIN_MERGE_GAIN:g}",
                self.average(best) - self.average("base"),
                MIN_MERGE_GAIN,
                se,
            )
        )
        return out

    @property
    def meaningful(self) -> bool:
        """Whether enough prompts per skill were evaluated for the criteria to mean anything."""
        return self.n >= MIN_VERDICT_N

    def failures(self) -> list[str]:
        """The quality criteria that do not hold (empty when the zoo is fit for comparing merges)."""
        return [c.line() for c in self.criteria() if not c.holds]

    def verdict(self) -> str:
        """One line: whether the criteria hold, hold robustly (>= 3 SE) or fail, or no verdict."""
        if not self.meaningful:
            return (
                f"no verdict: {self.n} prompts per skill are too few for the quality criteria "
                f"(they need at least {MIN_VERDICT_N}); the table above is only a smoke test"
            )
        cs = self.criteria()
        failing = [c for c in cs if not c.holds]
        weak = [c for c in cs if c.holds and c.z < ROBUST_Z]
        if failing:
            return f"quality criteria NOT met: {len(failing)} of {len(cs)} fail"
        if weak:
            return (
                f"quality criteria met, {len(weak)} of {len(cs)} within noise (margin under "
                f"{ROBUST_Z:g} SE): another machine may not see them hold"
            )
        return f"quality criteria met, all {len(cs)} with a margin of at least {ROBUST_Z:g} SE"

    def criteria_text(self) -> str:
        return "\n".join("  " + c.line() for c in self.criteria())

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
            lines.append(
                f"| {label} | " + " | ".join(cells) + f" | {self.average(row):.3f} ± {self.se_average(row):.3f} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QualityReport":
        return cls(**data)


REPORT_FILE = "quality.json"


def environment() -> dict[str, str]:
    """The library versions and machine a report was measured with (training and evaluation
    numerics depend on both)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {_cpu_name()}, {__import__('os').cpu_count()} cores",
    }
    for pkg in ("torch", "transformers", "lm_eval", "tokenizers", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover
            out[pkg] = "-"
    return out


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    import platform

    return platform.processor() or "unknown CPU"


def save_report(report: QualityReport, zoo_root: Path) -> Path:
    """Write ``report`` as <zoo>/quality.json (atomically), for `merge-dag demo` to show."""
    import json
    import os

    path = Path(zoo_root) / REPORT_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def load_report(zoo_root: Path, settings_key: str) -> Optional[QualityReport]:
    """The saved report of the zoo at ``zoo_root`` if it belongs to these zoo settings and this
    environment (library versions, machine), else None."""
    import json

    path = Path(zoo_root) / REPORT_FILE
    try:
        data = json.loads(path.read_text())
        report = QualityReport.from_dict(data)
    except (OSError, ValueError, TypeError):
        return None
    extra = report.extra or {}
    if extra.get("settings_key") != settings_key or extra.get("environment") != environment():
        return None
    return report


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


def task_arithmetic(
    base: dict[str, torch.Tensor],
    experts: list[dict[str, torch.Tensor]],
    lam: float,
    weights: Optional[list[float]] = None,
) -> dict[str, torch.Tensor]:
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


def ties(
    base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]], lam: float, density: float = TIES_DENSITY
) -> dict[str, torch.Tensor]:
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
        task = TensorTask(
            name,
            b.float().clone(),
            [e[name].float().clone() for e in experts],
            [{"weight": 1.0, "density": density} for _ in experts],
            params,
        )
        out[name] = method.merge(task).to(b.dtype)
    return out


def _scores(model, skills, tokenizer, device, limit, batch_size) -> tuple[dict, dict, int]:
    from ..evaluation import evaluate
    from .lmeval import gen_task_name, ll_task_name

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


def check_quality(
    zoo,
    device: str = "cpu",
    limit: Optional[int] = None,
    batch_size: int = 64,
    lambdas: tuple[float, ...] = LAMBDAS,
    progress: bool = True,
    ties_lambdas: tuple[float, ...] = TIES_LAMBDAS,
) -> QualityReport:
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
            print(
                f"  eval {row_label(row, 0, len(skills)):<40s} "
                + " ".join(f"{s}={em[row][s]:.2f}" for s in skills)
                + f"  avg={avg:.3f}",
                file=sys.stderr,
                flush=True,
            )

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
        best_ties = max(
            ties_lambdas, key=lambda lam: (sum(em[f"ties_{lam:g}"].values()), sum(lp[f"ties_{lam:g}"].values()))
        )
        em["ties"], lp["ties"] = em[f"ties_{best_ties:g}"], lp[f"ties_{best_ties:g}"]
        rows.append("ties")
        extra_ties = {"ties_lambda": best_ties, "ties_density": TIES_DENSITY}
    else:
        extra_ties = {}
    return QualityReport(
        skills=skills,
        exact_match=em,
        logprob=lp,
        rows=rows,
        tuned_lambda=best,
        lambdas=grid,
        n=n,
        seconds=round(time.perf_counter() - t0, 2),
        extra={
            "zoo": man.root,
            "settings_key": man.settings_key,
            "limit": limit,
            "environment": environment(),
            **extra_ties,
        },
    )
