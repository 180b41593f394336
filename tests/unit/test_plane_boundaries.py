"""Guards of the planes (ARCHITECTURE.md): the control plane (``pagedllm/core``) never imports
torch, and nothing below the engine (core, worker, models, layers, attention) imports the
engine or the entry points. Oracles: a fresh interpreter's ``sys.modules``, and the import
statements of every module (AST), so a violation names its file and line."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "pagedllm"
LOWER_PLANES = ["core", "worker", "models", "layers", "attention"]
UPPER = ("pagedllm.engine", "pagedllm.entrypoints")


def test_importing_the_control_plane_loads_no_torch():
    code = ("import sys, pkgutil, importlib, pagedllm.core as c\n"
            "for m in pkgutil.iter_modules(c.__path__):\n"
            "    importlib.import_module('pagedllm.core.' + m.name)\n"
            "bad = sorted(n for n in sys.modules if n == 'torch' or n.startswith('torch.'))\n"
            "print(len(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PKG.parent, check=True)
    assert out.stdout.strip() == "0", "pagedllm.core imported torch"


def _imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


@pytest.mark.parametrize("plane", LOWER_PLANES)
def test_lower_planes_do_not_import_the_engine_or_entrypoints(plane):
    bad = [f"{path.relative_to(PKG.parent)}:{line} imports {name}"
           for path in sorted((PKG / plane).rglob("*.py"))
           for line, name in _imports(path) if name.startswith(UPPER)]
    assert not bad, "\n".join(bad)
