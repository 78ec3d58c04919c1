"""The largest modules and functions of merge_dag, for a quick look at where reading time goes.

python tools/sizes.py [N]     # the N (default 15) longest files and functions, in lines
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sizes(root: Path = ROOT) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    files, funcs = [], []
    for path in sorted((root / "merge_dag").rglob("*.py")):
        text = path.read_text()
        rel = str(path.relative_to(root))
        files.append((len(text.splitlines()), rel))
        for node in ast.walk(ast.parse(text, rel)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.lineno} {node.name}"))
    return sorted(files, reverse=True), sorted(funcs, reverse=True)


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 15
    files, funcs = sizes()
    print(
        f"{len(files)} files, {sum(k for k, _ in files)} lines; {len(funcs)} functions, "
        f"{sum(1 for k, _ in funcs if k >= 60)} of 60 lines or more"
    )
    print("\nlongest files:")
    for k, name in files[:n]:
        print(f"  {k:5d}  {name}")
    print("\nlongest functions:")
    for k, name in funcs[:n]:
        print(f"  {k:5d}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
