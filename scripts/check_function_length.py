"""Function-length budget (house style, ARCHITECTURE.md): no function under pagedllm/ is longer
than 60 lines, counted from its ``def`` line to its last line (docstring, comments and blank
lines included, decorators not; a nested function counts inside its parent and on its own).
Triton kernels (``@triton.jit``) are exempt: a kernel is one unit of GPU code.

ALLOWED lists the functions over budget that are not split yet, with their current length;
the goal is an empty list. A listed function that grows, or one that is no longer over budget
and still listed, fails too, so the list only shrinks.

Usage: python scripts/check_function_length.py [paths...]   (default: pagedllm)
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

BUDGET = 60
ROOT = Path(__file__).resolve().parents[1]
# "path::Qualified.name": its length today (lines); remove the entry when it is split.
ALLOWED: dict[str, int] = {}


def _is_triton_kernel(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """``@triton.jit`` / ``@jit`` (also called, ``@triton.jit(...)``)."""
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "jit":
            return True
    return False


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function, methods and nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{node.name}"
            yield name, node
            yield from _functions(node, f"{name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def measure(paths: list[Path]) -> dict[str, int]:
    """Every non-kernel function over budget: "path::name" -> length in lines."""
    over: dict[str, int] = {}
    for path in paths:
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            tree = ast.parse(file.read_text(), str(file))
            rel = file.resolve().relative_to(ROOT).as_posix()
            for name, node in _functions(tree):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > BUDGET and not _is_triton_kernel(node):
                    over[f"{rel}::{name}"] = length
    return over


def problems(over: dict[str, int], checked_all: bool) -> list[str]:
    """What fails the budget: new long functions, allowlisted ones that grew, stale entries."""
    out = [f"{key}: {n} lines > {BUDGET} (split it; see ARCHITECTURE.md)"
           for key, n in sorted(over.items()) if key not in ALLOWED]
    out += [f"{key}: {n} lines, allowlisted at {ALLOWED[key]}: it grew"
            for key, n in sorted(over.items()) if key in ALLOWED and n > ALLOWED[key]]
    if checked_all:
        out += [f"{key}: allowlisted but no longer over budget; remove it from ALLOWED"
                for key in sorted(ALLOWED) if key not in over]
    return out


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or [ROOT / "pagedllm"]
    found = problems(measure(paths), checked_all=not argv)
    for line in found:
        print(line)
    if not found:
        print(f"function length: every function is within {BUDGET} lines "
              f"({len(ALLOWED)} allowlisted)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
