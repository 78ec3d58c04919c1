"""The module-level import graph of merge_dag, and its cycles.

    python tools/import_graph.py            # cycles (strongly connected components) of both graphs
    python tools/import_graph.py --edges    # also every edge "a -> b" (module level, then lazy)

Two graphs: the module-level one (imports run when a module loads, also inside `if`/`try` at module
level) and the full one, which adds the imports inside functions (lazy imports). A cycle in the
first fails at import time in some order; a cycle only in the second is one that a lazy import
hides, still two modules that cannot be understood (or moved) one without the other. Imports under
`if TYPE_CHECKING:` count in neither. An `import a.b.c` or `from a.b import c` counts as an edge to the
module `a.b.c` if it exists, else to `a.b`. Parent packages' `__init__` modules run first too, but
are not counted as edges (they would make every subpackage depend on its parent). Exit status 1
when there is a cycle, so a test or CI can use it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "merge_dag"


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _module_level(body: list[ast.stmt]):
    """Statements run at import time: the body, and the branches of module-level if/try/with."""
    for node in body:
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                yield from _module_level(node.orelse)
                continue
            yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for b in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _module_level(b)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)
        else:
            yield node


def _everywhere(body: list[ast.stmt]):
    """Every statement, functions and classes included, except under `if TYPE_CHECKING:`."""
    for node in _module_level(body):
        yield node
        for child in ast.walk(node):
            if child is not node and isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child


def imports(name: str, path: Path, known: dict[str, Path], lazy: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    for node in (_everywhere if lazy else _module_level)(tree.body):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == PACKAGE:
                    add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != PACKAGE:
                continue
            for a in node.names:
                full = f"{mod}.{a.name}"
                add(full if full in known else mod)
    return out


def graph(root: Path = ROOT, lazy: bool = False) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known, lazy) for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(out)


def report(g: dict[str, set[str]], title: str, edges: bool) -> list[list[str]]:
    if edges:
        for a in sorted(g):
            for b in sorted(g[a]):
                print(f"{a} -> {b}")
    found = cycles(g)
    print(
        f"{title}: {len(g)} modules, {sum(len(v) for v in g.values())} imports inside {PACKAGE}, {len(found)} cycle(s)"
    )
    for comp in found:
        inner = [f"{a} -> {b}" for a in comp for b in sorted(g[a]) if b in comp]
        print(f"  cycle of {len(comp)}: " + ", ".join(comp))
        for e in inner:
            print(f"      {e}")
    return found


# layering: (importer package, imported package) pairs that must not occur, lazily or not
FORBIDDEN = [(pure, f"{PACKAGE}.dagster") for pure in ("core", "guidance", "evaluation", "zoo", "lineage")] + [
    ("evaluation", f"{PACKAGE}.zoo"),  # the general evaluation does not reach up into the expert zoo
]


def layer_violations(g: dict[str, set[str]]) -> list[str]:
    out = []
    for a in sorted(g):
        for low, high in FORBIDDEN:
            if a == f"{PACKAGE}.{low}" or a.startswith(f"{PACKAGE}.{low}."):
                out += [f"{a} -> {b}" for b in sorted(g[a]) if b == high or b.startswith(high + ".")]
    return out


def main(argv: list[str]) -> int:
    edges = "--edges" in argv
    hard = report(graph(), "module level", edges)
    full = graph(lazy=True)
    soft = report(full, "with lazy imports", edges)
    bad = layer_violations(full)
    print(f"layering: {len(bad)} forbidden import(s)" + "".join(f"\n      {e}" for e in bad))
    return 1 if hard or soft or bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
