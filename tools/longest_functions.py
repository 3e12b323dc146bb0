"""The longest functions (lines, decorators to last line) under operator/, images/ and inferstack/.

    python -m tools.longest_functions [--top N] [--ref GIT_REF]

With --ref, measures the files as that commit has them (for before/after comparisons).
"""

from __future__ import annotations

import argparse
import ast
import subprocess
from pathlib import Path

ROOTS = ("operator", "images", "inferstack")


def _sources(ref: str | None) -> dict[str, str]:
    if ref is None:
        return {str(p): p.read_text() for root in ROOTS for p in sorted(Path(root).rglob("*.py"))}
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", ref, *ROOTS], capture_output=True, text=True,
                           check=True).stdout.split()
    return {n: subprocess.run(["git", "show", f"{ref}:{n}"], capture_output=True, text=True, check=True).stdout
            for n in names if n.endswith(".py")}


def lengths(sources: dict[str, str]) -> list[tuple[int, str]]:
    """(lines, "path:line name") of every function and method."""
    found = []
    for path, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                found.append((node.end_lineno - start + 1, f"{path}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--ref")
    args = parser.parse_args()
    for n, where in lengths(_sources(args.ref))[: args.top]:
        print(f"{n:4d}  {where}")


if __name__ == "__main__":
    main()
