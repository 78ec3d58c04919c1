"""An artifact's provenance: the tree of what it was built from, back to the sources, with the
metrics of the evals run on each node (what `merge-dag audit` and the merged page show). Pure: no Dagster."""

from __future__ import annotations

from datetime import datetime

from ..core.errors import MergeDagError
from .engine import LineageDB, artifact_row, rows

SOURCE_KINDS = ("model", "calibration", "recipe", "tasks", "adapter", "gguf")
MAX_TREE_DEPTH = 64


def provenance(db: LineageDB, artifact_id: str) -> dict:
    """The artifact as a tree: its row (params decoded), 'metrics' (its own and those of the evals
    run on it, latest eval per task/metric) and 'inputs': [{'role', 'fingerprint', 'node'}] walking
    edges back to the sources (kinds model / calibration / recipe / tasks; a model imported with
    `merge-dag import` has its GGUF, kind gguf, as a parent). A parent never recorded
    is a node with 'missing': True; a parent already on the path is a node with 'cycle': True."""
    nodes, parents, metrics = db.read(lambda con: _load(con, artifact_id), ({}, {}, {}))
    if artifact_id not in nodes:
        raise MergeDagError(f"no artifact {artifact_id!r} in {db.path}")
    return _Tree(nodes, parents, metrics).build(artifact_id, (artifact_id,))[0]


def _load(con, artifact_id: str) -> tuple[dict, dict, dict]:
    """In one read: the artifact and its ancestors (id -> row), the edges into each (child id ->
    edges, in recording order), and the metrics of each (id -> [metric], sorted by task/metric)."""
    nodes: dict[str, dict] = {}
    parents: dict[str, list[dict]] = {}
    frontier, seen = [artifact_id], {artifact_id}
    while frontier:
        for r in rows(con.execute("SELECT * FROM artifacts WHERE list_contains(?, artifact_id)", [frontier])):
            nodes[r["artifact_id"]] = artifact_row(r)
        # sources have no parents, except a model imported from a GGUF (edge gguf -> model)
        walk = [
            i for i in frontier if i in nodes and (nodes[i]["kind"] not in SOURCE_KINDS or nodes[i]["kind"] == "model")
        ]
        nxt = []
        if walk:
            for e in rows(
                con.execute(
                    "SELECT parent_id, child_id, role, fingerprint FROM edges "
                    "WHERE list_contains(?, child_id) ORDER BY seq",
                    [walk],
                )
            ):
                parents.setdefault(e["child_id"], []).append(e)
                if e["parent_id"] not in seen:
                    seen.add(e["parent_id"])
                    nxt.append(e["parent_id"])
        frontier = nxt
    return nodes, parents, _metrics(con, list(nodes))


def _metrics(con, ids: list[str]) -> dict[str, list[dict]]:
    own = rows(
        con.execute(
            """SELECT m.*, m.artifact_id AS of_id, m.artifact_id AS eval_id, NULL AS eval_seen
                              FROM metrics m WHERE list_contains(?, m.artifact_id)""",
            [ids],
        )
    )
    down = rows(
        con.execute(
            """SELECT m.*, e.parent_id AS of_id, e.child_id AS eval_id, a.last_seen_at AS eval_seen
                               FROM edges e JOIN artifacts a ON a.artifact_id = e.child_id AND a.kind = 'eval'
                               JOIN metrics m ON m.artifact_id = e.child_id
                               WHERE list_contains(?, e.parent_id)""",
            [ids],
        )
    )
    metrics: dict[str, dict] = {}
    for m in own + sorted(down, key=lambda m: m["eval_seen"] or datetime.min):
        # own metrics first, then evals oldest to newest: the latest eval of a task/metric wins
        metrics.setdefault(m["of_id"], {})[(m["task"], m["metric"])] = {
            k: m[k] for k in ("task", "metric", "value", "stderr", "n", "model", "eval_id", "created_at")
        }
    return {k: [v[t] for t in sorted(v)] for k, v in metrics.items()}


class _Tree:
    """Builds the nested tree from _load's tables; a subtree reached twice is built once."""

    def __init__(self, nodes: dict, parents: dict, metrics: dict):
        self.nodes, self.parents, self.metrics = nodes, parents, metrics
        self.memo: dict[str, dict] = {}

    def build(self, aid: str, stack: tuple[str, ...]) -> tuple[dict, bool]:
        """(tree, whether it cut a cycle: such a subtree depends on the path and is not memoized)"""
        if aid in self.memo:
            return self.memo[aid], False
        nodes = self.nodes
        node = dict(nodes[aid], metrics=self.metrics.get(aid, []), inputs=[], source=nodes[aid]["kind"] in SOURCE_KINDS)
        cut = False
        for e in self.parents.get(aid, []):
            pid = e["parent_id"]
            if pid in stack or len(stack) >= MAX_TREE_DEPTH:
                child, cut = {"artifact_id": pid, "cycle": True, "inputs": [], "metrics": []}, True
                if pid in nodes:
                    child.update(kind=nodes[pid]["kind"], name=nodes[pid]["name"])
            elif pid not in nodes:
                child = {"artifact_id": pid, "missing": True, "inputs": [], "metrics": []}
            else:
                child, c = self.build(pid, stack + (pid,))
                cut = cut or c
            node["inputs"].append({"role": e["role"], "fingerprint": e["fingerprint"], "node": child})
        if not cut:
            self.memo[aid] = node
        return node, cut
