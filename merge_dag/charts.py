"""Pictures of guidance maps and evaluation results: small PNGs (matplotlib, Agg backend), saved into
an artifact's own folder by its build step and shown in the Dagster UI as markdown images.

    heatmaps(panels, path)     one or more labelled matrices (e.g. expert x layer per module kind)
    allocation_panels(...)     LEWIS density per expert x layer, one panel per module kind
    layer_panel(...)           one value per layer (sensitivity, alpha) as a 1-row heatmap
    shift_panel(...)           LEWIS importance shift per module kind x layer
    leaderboard_chart(...)     score per task and average: merges as bars, base and experts as lines
    search_chart(...)          a search's objective per trial and the best so far
    pareto_chart(...)          a multi-objective search's trials per pair of tasks, the Pareto front in red
    markdown_image(path)       ![alt](data:image/png;base64,...) for a metadata markdown value

Pure: no Dagster. Figures are rendered at a low dpi so the PNGs stay a few tens of kB.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

DPI = 80
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(.+?)(?:\.weight|\.bias)?$")


@dataclass
class Panel:
    title: str
    rows: list[str]
    cols: list[str]
    values: list[list[float]]  # rows x cols; NaN where there is no value


def module_kind(tensor_name: str) -> Optional[tuple[int, str]]:
    """(layer, module kind) of a per-layer tensor: 'model.layers.3.self_attn.q_proj.weight' ->
    (3, 'self_attn.q_proj'); None for tensors outside the layers (embeddings, final norm, lm_head)."""
    m = _LAYER_RE.search(tensor_name)
    return (int(m.group(1)), m.group(2)) if m else None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def heatmaps(
    panels: Sequence[Panel],
    path: str | Path,
    *,
    title: str = "",
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    cmap: str = "viridis",
    label: str = "",
    annotate: bool = True,
    ncols: int = 4,
    xlabel: str = "layer",
) -> Path:
    """Draw `panels` (one labelled matrix each) side by side on a shared colour scale; write a PNG."""
    plt = _pyplot()
    vals = [v for p in panels for row in p.values for v in row if v == v]
    lo = min(vals, default=0.0) if vmin is None else vmin
    hi = max(vals, default=1.0) if vmax is None else vmax
    if hi <= lo:
        hi = lo + 1e-9
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    width = max(len(p.cols) for p in panels)
    height = max(len(p.rows) for p in panels)
    label_w = max((len(r) for p in panels for r in p.rows), default=4) * 0.07
    fig_w = ncols * (label_w + 0.45 * width + 0.4) + 1.0
    fig_h = nrows * (0.32 * height + 0.9) + (0.4 if title else 0.1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(fig_w, fig_h), squeeze=False)
    im = None
    for ax, p in zip(axes.flat, panels):
        im = ax.imshow(p.values, vmin=lo, vmax=hi, cmap=cmap, aspect="auto")
        ax.set_title(p.title, fontsize=8)
        ax.set_xticks(range(len(p.cols)), p.cols, fontsize=7)
        ax.set_yticks(range(len(p.rows)), p.rows, fontsize=7)
        ax.tick_params(length=0)
        ax.set_xlabel(xlabel, fontsize=7)
        if annotate and len(p.cols) * len(p.rows) <= 96:
            for i, row in enumerate(p.values):
                for j, v in enumerate(row):
                    if v == v:
                        dark = (v - lo) / (hi - lo) < 0.6
                        ax.text(
                            j, i, f"{v:.2g}", ha="center", va="center", fontsize=6, color="white" if dark else "black"
                        )
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if im is not None:
        bar = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, pad=0.02)
        bar.ax.tick_params(labelsize=7)
        if label:
            bar.set_label(label, fontsize=7)
    return _save(fig, path)


def _short(ref: str) -> str:
    return ref.rstrip("/").rsplit("/", 1)[-1]


def allocation_panels(densities: dict[str, dict[str, float]]) -> list[Panel]:
    """LEWIS densities {expert: {tensor: density}} -> one panel per module kind: expert x layer."""
    per: dict[str, dict[str, dict[int, float]]] = {}
    layers: set[int] = set()
    for ex, d in densities.items():
        for name, v in d.items():
            mk = module_kind(name)
            if mk is None:
                continue
            layers.add(mk[0])
            per.setdefault(mk[1], {}).setdefault(ex, {})[mk[0]] = v
    cols = sorted(layers)
    experts = list(densities)
    return [
        Panel(
            kind,
            [_short(e) for e in experts],
            [str(c) for c in cols],
            [[per[kind].get(e, {}).get(c, float("nan")) for c in cols] for e in experts],
        )
        for kind in sorted(per)
    ]


def layer_panel(title: str, rows: dict[str, dict[int, float]]) -> Panel:
    """{row label: {layer: value}} -> one panel: row x layer."""
    cols = sorted({k for r in rows.values() for k in r})
    return Panel(
        title,
        [_short(r) for r in rows],
        [str(c) for c in cols],
        [[r.get(c, float("nan")) for c in cols] for r in rows.values()],
    )


def shift_panel(title: str, shift: dict[str, float]) -> Panel:
    """LEWIS importance shift {tensor: value} -> module kind x layer."""
    per: dict[str, dict[int, float]] = {}
    for name, v in shift.items():
        mk = module_kind(name)
        if mk is not None:
            per.setdefault(mk[1], {})[mk[0]] = v
    cols = sorted({k for r in per.values() for k in r})
    kinds = sorted(per)
    return Panel(title, kinds, [str(c) for c in cols], [[per[k].get(c, float("nan")) for c in cols] for k in kinds])


def leaderboard_chart(
    tasks: list[str],
    merges: dict[str, list[float]],
    references: dict[str, list[float]],
    path: str | Path,
    *,
    ylabel: str = "exact_match",
    title: str = "",
) -> Path:
    """Score per task and on average (the last value of each list): merges as grouped bars (in the
    order given), base and experts as horizontal reference lines across each group."""
    plt = _pyplot()
    groups = list(tasks) + ["average"]
    n = max(1, len(merges))
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(min(2.0 + 1.3 * len(groups) + 0.12 * n * len(groups), 12), 3.4))
    cmap = plt.get_cmap("tab10")
    for k, (label, vals) in enumerate(merges.items()):
        xs = [g - 0.4 + width * (k + 0.5) for g in range(len(groups))]
        ax.bar(xs, vals, width=width * 0.92, label=label, color=cmap(k % 10))
    styles = ["-", "--", ":", "-."]
    for k, (label, vals) in enumerate(references.items()):
        for g, v in enumerate(vals):
            if v == v:
                ax.hlines(
                    v,
                    g - 0.45,
                    g + 0.45,
                    colors="black" if k == 0 else "dimgray",
                    linestyles=styles[k % len(styles)],
                    linewidth=1.6 if k == 0 else 1.0,
                    label=label if g == 0 else None,
                )
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.axvline(len(groups) - 1.5, color="lightgray", linewidth=0.8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_ylim(0, 1.0)
    ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Write the figure as a PNG at `path` (its folder made) and free it."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def markdown_image(path: str | Path, alt: str = "chart") -> str:
    """A markdown image with the PNG inline (a data URI): the Dagster UI shows it in the metadata."""
    from .core.markdown import md_text  # the alt text may hold a model's name

    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"![{md_text(alt)}](data:image/png;base64,{data})"


def search_chart(
    numbers: list[int],
    values: list[float],
    best: list[float],
    path: str | Path,
    *,
    title: str = "",
    pruned: Optional[list[bool]] = None,
    rows: Optional[int] = None,
) -> Path:
    """Objective per trial (dots) and the best fully evaluated so far (a step line), for a search's
    metadata. `pruned`: trials evaluated only on the small subset (successive halving, `rows`
    examples per task) are hollow dots."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.0))
    pruned = pruned or [False] * len(numbers)
    full = [(n, v) for n, v, p in zip(numbers, values, pruned) if not p]
    small = [(n, v) for n, v, p in zip(numbers, values, pruned) if p]
    if full:
        ax.plot([n for n, _ in full], [v for _, v in full], "o", markersize=4, label="trial (full evaluation)")
    if small:
        label = f"pruned (first {rows} rows)" if rows else "pruned"
        ax.plot([n for n, _ in small], [v for _, v in small], "o", markersize=4, mfc="none", label=label)
    ax.step(numbers, best, where="post", color="black", linewidth=1.2, label="best so far")
    ax.set_xlabel("trial", fontsize=8)
    ax.set_ylabel("objective", fontsize=8)
    ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def pareto_chart(
    tasks: list[str],
    points: list[list[float]],
    front: list[int],
    labels: list[str],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """Trials' per-task scores, one panel per pair of tasks (at most 3 panels): every trial a dot
    labelled with its number, the Pareto front across all tasks (`front`: indices) in red (joined
    in order of the first task when there are only two tasks)."""
    plt = _pyplot()
    pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))][:3] or [(0, 0)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.6 * len(pairs) + 0.4, 3.4), squeeze=False)
    on = set(front)
    for ax, (i, j) in zip(axes.flat, pairs):
        xs, ys = [p[i] for p in points], [p[j] for p in points]
        rest = [k for k in range(len(points)) if k not in on]
        ax.plot([xs[k] for k in rest], [ys[k] for k in rest], "o", color="gray", markersize=4, label="trial")
        f = sorted(front, key=lambda k: (xs[k], -ys[k]))
        style = "o-" if len(tasks) == 2 else "o"  # with more tasks a pair's projection of the front is no curve
        ax.plot([xs[k] for k in f], [ys[k] for k in f], style, color="red", markersize=5, label="Pareto front")
        for k, lab in enumerate(labels):
            ax.annotate(lab, (xs[k], ys[k]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(tasks[i], fontsize=8)
        ax.set_ylabel(tasks[j], fontsize=8)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
