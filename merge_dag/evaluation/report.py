"""The results table people read: one primary metric per task, an average with its binomial standard
error, the base first, merges sorted by their average, merges below the base marked, and each
guided merge next to its plain twin.

Inputs are evaluation results as the leaderboard keeps them: ``[{"model": label, "metrics":
[[task, metric, value, stderr, n], ...]}, ...]``. For a rate p over n documents::

    SE(p) = sqrt(p (1 - p) / n)        SE(avg over K tasks) = sqrt(sum_k SE(p_k)^2) / K
    SE(a - b) = sqrt(SE(a)^2 + SE(b)^2)          (tasks and models treated as independent)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

PRIMARY = "exact_match"

# (label, plain recipe, guided recipe): the demo's guided recipes and the plain twin each is read against
DEMO_PAIRS = [
    ("LEWIS densities vs uniform (TIES, same mean density)", "ties", "ties_lewis"),
    ("Sens-Merging coefficients vs uniform (task arithmetic, same lambda)", "task_arithmetic", "task_arithmetic_sens"),
    ("AIM relaxation vs none (task arithmetic)", "task_arithmetic", "task_arithmetic_aim"),
    ("RegMean vs plain average (linear)", "linear", "regmean"),
]


def _se(p: float, n: Optional[int]) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


@dataclass
class ScoreTable:
    """model label -> task -> (value, n) for one metric."""

    tasks: list[str]
    scores: dict[str, dict[str, tuple[float, Optional[int]]]] = field(default_factory=dict)
    metric: str = PRIMARY

    @classmethod
    def from_results(cls, results: list[dict], metric: str = PRIMARY) -> "ScoreTable":
        tasks: list[str] = []
        scores: dict[str, dict[str, tuple[float, Optional[int]]]] = {}
        for r in results:
            for task, m, value, _stderr, n in r.get("metrics", []):
                if m != metric or value is None:
                    continue
                if task not in tasks:
                    tasks.append(task)
                scores.setdefault(r["model"], {})[task] = (float(value), n)
        return cls(tasks=tasks, scores=scores, metric=metric)

    def complete(self, model: str) -> bool:
        return all(t in self.scores.get(model, {}) for t in self.tasks)

    def value(self, model: str, task: str) -> float:
        return self.scores[model][task][0]

    def se(self, model: str, task: str) -> float:
        return _se(*self.scores[model][task])

    def _tasks(self, model: str, tasks: Optional[list[str]]) -> list[str]:
        return [t for t in (tasks if tasks is not None else self.tasks) if t in self.scores[model]]

    def average(self, model: str, tasks: Optional[list[str]] = None) -> float:
        """Mean over `tasks` (default: every task the model was evaluated on)."""
        ts = self._tasks(model, tasks)
        return sum(self.value(model, t) for t in ts) / len(ts)

    def se_average(self, model: str, tasks: Optional[list[str]] = None) -> float:
        ts = self._tasks(model, tasks)
        return math.sqrt(sum(self.se(model, t) ** 2 for t in ts)) / len(ts)

    def common_tasks(self, a: str, b: str) -> list[str]:
        """The tasks both `a` and `b` were evaluated on, in table order."""
        return [t for t in self.tasks if t in self.scores[a] and t in self.scores[b]]

    def diff(self, a: str, b: str) -> tuple[float, float]:
        """(average(a) - average(b), its standard error), over the tasks both were evaluated on."""
        common = self.common_tasks(a, b)
        return (
            self.average(a, common) - self.average(b, common),
            math.hypot(self.se_average(a, common), self.se_average(b, common)),
        )


def _short(task: str) -> str:
    return task.removeprefix("zoo_")


def row_order(table: ScoreTable, base: Optional[str] = None) -> tuple[Optional[str], list[str], list[str]]:
    """(base, reference rows: the base then the other source models, merges by average best first).
    `base` defaults to the first source model (a label not starting with 'merged/')."""
    models = [m for m in table.scores if table.scores[m]]
    sources = [m for m in models if not m.startswith("merged/")]
    if base is None or base not in sources:
        base = sources[0] if sources else None
    merges = sorted((m for m in models if m.startswith("merged/")), key=table.average, reverse=True)
    return base, ([base] if base else []) + [m for m in sources if m != base], merges


def _label(m: str, base: Optional[str], sources: list[str]) -> str:
    label = m.split("/", 1)[1] if "/" in m else m
    if m == base:
        return label + " (base)"
    return label + " (expert)" if m in sources else label


def leaderboard_markdown(table: ScoreTable, base: Optional[str] = None) -> str:
    """The leaderboard as the Dagster UI shows it: per task value ± SE (the best merge per task in
    bold), avg ± SE, Δ avg vs base ± SE (▼ where a merge is below the base); reference rows (base,
    experts) first and in italics, then merges by average. Every number rounded to 3 places."""
    from ..core.markdown import md_text  # names come from the user's recipes and task files

    base, refs, merges = row_order(table, base)
    cols = [md_text(_short(t)) for t in table.tasks]
    best = {t: max((table.value(m, t) for m in merges if t in table.scores[m]), default=None) for t in table.tasks}
    best_avg = max((table.average(m) for m in merges), default=None)
    lines = [f"| model | {' | '.join(cols)} | **avg** ± SE | Δ avg vs base |", "|---|" + "---:|" * (len(cols) + 2)]
    below = 0
    for m in refs + merges:
        ref = m in refs
        cells = []
        for t in table.tasks:
            if t not in table.scores[m]:
                cells.append("—")
                continue
            v = f"{table.value(m, t):.3f} ± {table.se(m, t):.3f}"
            cells.append(f"**{v}**" if not ref and table.value(m, t) == best[t] else v)
        avg = f"{table.average(m):.3f} ± {table.se_average(m):.3f}" + ("" if table.complete(m) else "*")
        if not ref and table.average(m) == best_avg:
            avg = f"**{avg}**"
        delta = ""
        if base and m != base:
            d, se = table.diff(m, base)
            delta = f"{d:+.3f} ± {se:.3f}"
            if not ref and d < 0:
                below += 1
                delta += " ▼"
        label = md_text(_label(m, base, refs))
        lines.append(f"| {f'*{label}*' if ref else label} | {' | '.join(cells)} | {avg} | {delta} |")
    notes = [
        f"{table.metric} per task ± one binomial standard error, on {_n_text(table)}. Reference rows in "
        "italics; merges sorted by average; **bold**: the best merge per task and on average."
    ]
    if below:
        notes.append(f"▼ {below} merge(s) below the base on average.")
    if any(not table.complete(m) for m in refs + merges):
        notes.append("* evaluated on some of the tasks only.")
    return "\n".join(lines + [""] + [" ".join(notes)])


def leaderboard_rows(table: ScoreTable, base: Optional[str] = None) -> tuple[list[str], list[dict[str, str]]]:
    """The leaderboard as rows of text cells (columns: model, one per task, avg ± SE, Δ avg vs base):
    reference rows first (base, experts), then merges by average; ★ marks the best merge per task and
    on average, ▼ a merge below the base on average. Numbers rounded to 3 places."""
    base, refs, merges = row_order(table, base)
    best = {t: max((table.value(m, t) for m in merges if t in table.scores[m]), default=None) for t in table.tasks}
    best_avg = max((table.average(m) for m in merges), default=None)
    cols = ["model"] + [_short(t) for t in table.tasks] + ["avg ± SE", "Δ avg vs base"]
    rows = []
    for m in refs + merges:
        merge = m not in refs
        row = {"model": _label(m, base, refs)}
        for t in table.tasks:
            v = "—" if t not in table.scores[m] else f"{table.value(m, t):.3f} ± {table.se(m, t):.3f}"
            row[_short(t)] = v + (" ★" if merge and t in table.scores[m] and table.value(m, t) == best[t] else "")
        row["avg ± SE"] = (
            f"{table.average(m):.3f} ± {table.se_average(m):.3f}"
            + ("" if table.complete(m) else "*")
            + (" ★" if merge and table.average(m) == best_avg else "")
        )
        d = table.diff(m, base) if base and m != base else None
        row["Δ avg vs base"] = "" if d is None else f"{d[0]:+.3f} ± {d[1]:.3f}" + (" ▼" if merge and d[0] < 0 else "")
        rows.append(row)
    return cols, rows


def format_results(
    table: ScoreTable, base: Optional[str] = None, pairs: list[tuple[str, str, str]] = DEMO_PAIRS
) -> str:
    """Markdown: the base row, the other source models (experts), then merges by average, best first;
    a Δ column against the base with a mark where a merge is below it; then guided − plain rows."""
    models = [m for m in table.scores if table.scores[m]]
    base, refs, merges = row_order(table, base)
    sources = refs
    order = refs + merges
    cols = [_short(t) for t in table.tasks]
    lines = [f"| model | {' | '.join(cols)} | avg ± SE | Δ avg vs base |", "|---|" + "---:|" * (len(cols) + 2)]
    below = partial = 0
    for m in order:
        label = m.split("/", 1)[1] if "/" in m else m
        if m == base:
            label += " (base)"
        elif m in sources:
            label += " (expert)"
        cells = [f"{table.value(m, t):.3f}" if t in table.scores[m] else "—" for t in table.tasks]
        star = "" if table.complete(m) else "*"
        partial += bool(star)
        delta = ""
        if base and m != base:
            d, se = table.diff(m, base)
            delta = f"{d:+.3f} ± {se:.3f}"
            if m.startswith("merged/") and d < 0:
                below += 1
                delta += " ▼ below base"
        lines.append(
            f"| {label} | {' | '.join(cells)} | {table.average(m):.3f} ± {table.se_average(m):.3f}{star} | {delta} |"
        )
    shown = [(t, p, g) for t, p, g in pairs if f"merged/{p}" in models and f"merged/{g}" in models]
    if shown:
        lines += ["", "| guided − plain | " + " | ".join(cols) + " | avg ± SE |", "|---|" + "---:|" * (len(cols) + 1)]
        for _title, plain, guided in shown:
            a, b = f"merged/{guided}", f"merged/{plain}"
            per = [
                f"{table.value(a, t) - table.value(b, t):+.3f}"
                if t in table.scores[a] and t in table.scores[b]
                else "—"
                for t in table.tasks
            ]
            d, se = table.diff(a, b)
            lines.append(f"| {guided} − {plain} | {' | '.join(per)} | {d:+.3f} ± {se:.3f} |")
    notes = [
        f"{table.metric} per task on {_n_text(table)}; avg ± one binomial standard error; "
        "differences smaller than about two standard errors are noise."
    ]
    if partial:
        notes.append(
            "* evaluated on some of the tasks only: its average is over those, its Δ over the tasks "
            "it shares with the other row."
        )
    if below:
        notes.append(f"▼ {below} merge(s) score below the base on average.")
    return "\n".join(lines + [""] + notes)


def _n_text(table: ScoreTable) -> str:
    ns = {n for per in table.scores.values() for _, n in per.values() if n}
    if not ns:
        return "an unknown number of documents"
    return f"{min(ns)} documents" if len(ns) == 1 else f"{min(ns)}–{max(ns)} documents"
