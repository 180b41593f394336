"""Guards of the planes (ARCHITECTURE.md): the control plane (``pagedllm/core``) never imports
torch, and nothing below the engine (core, worker, models, layers, attention) imports the
engine or the entry points. Oracles: a fresh interpreter's ``sys.modules``, and the import
statements of every module (AST, function-level imports included, relative imports resolved
to absolute names), so a violation names its file and line."""
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
            "for m in pkgutil.walk_packages(c.__path__, 'pagedllm.core.'):\n"
            "    importlib.import_module(m.name)\n"
            "bad = sorted(n for n in sys.modules if n == 'torch' or n.startswith('torch.'))\n"
            "print(len(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PKG.parent, check=True)
    assert out.stdout.strip() == "0", "pagedllm.core imported torch"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module of ``from <node.module> import ...`` (``..engine`` resolved)."""
    if node.level == 0:
        return node.module or ""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path):
    """(line, absolute module name) of every import; ``from pkg import sub`` also yields
    ``pkg.sub``, since ``sub`` may be a module (``from pagedllm import engine``)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(path, node)
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def _violations(paths, banned: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(PKG.parent)}:{line} imports {name}"
            for path in paths for line, name in _imports(path)
            if name in banned or name.startswith(tuple(b + "." for b in banned))]


@pytest.mark.parametrize("plane", LOWER_PLANES)
def test_lower_planes_do_not_import_the_engine_or_entrypoints(plane):
    bad = _violations(sorted((PKG / plane).rglob("*.py")), UPPER)
    assert not bad, "\n".join(bad)


def test_the_control_plane_has_no_lazy_torch_import():
    """A function-level ``import torch`` in core/ would escape the sys.modules test above
    until the function runs."""
    bad = _violations(sorted((PKG / "core").rglob("*.py")), ("torch",))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source", [
    "from ..engine.core import EngineCore\n",      # relative, two levels up
    "from .. import entrypoints\n",                # a module imported by name
    "from pagedllm import engine\n",
    "def f():\n    import pagedllm.entrypoints.llm\n",  # lazy, inside a function
])
def test_the_import_guard_sees_every_spelling(tmp_path, source, monkeypatch):
    """The guard itself (its oracle: a module written to violate it in each spelling)."""
    fake = tmp_path / "pagedllm"
    (fake / "worker").mkdir(parents=True)
    path = fake / "worker" / "bad.py"
    path.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    assert _violations([path], UPPER), source
