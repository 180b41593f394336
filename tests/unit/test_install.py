"""`pip install pagedllm` serves: the server's imports are declared dependencies, and
importing pagedllm / running LLM offline still loads none of them (the GPU image may lack
them). The throwaway-venv install + `pagedllm serve` + completion runs as a step of .ci/run.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVER_IMPORTS = ("fastapi", "uvicorn", "starlette", "pydantic", "prometheus_client", "httpx",
                  "zmq")


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_and_offline_llm_load_no_server_modules():
    """A real offline generate on the bundled demo model, then no server module is loaded."""
    proc = _run(f"""
        import sys
        import pagedllm
        from pagedllm import LLM, SamplingParams
        llm = LLM(model={str(REPO / 'pagedllm' / 'demo_model')!r})
        out = llm.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4, out
        loaded = [m for m in {SERVER_IMPORTS!r} if m in sys.modules]
        print("LOADED", loaded)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def _declared_dependencies() -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


# Blocks every top-level module that is neither stdlib, pagedllm, nor provided by a
# distribution in the closure of pagedllm's declared dependencies: what a plain
# `pip install pagedllm` leaves importable (optional imports of third-party packages, e.g.
# fastapi trying opentelemetry, see ModuleNotFoundError as they would there).
_CLEAN_INSTALL_SIMULATION = """
    import importlib.abc, importlib.metadata as md, sys
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    def closure(requirements):
        seen, todo = set(), [Requirement(r) for r in requirements]
        while todo:
            req = todo.pop()
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = canonicalize_name(req.name)
            if name in seen:
                continue
            seen.add(name)
            todo += [Requirement(r) for r in (md.requires(req.name) or [])]
        return seen

    allowed_dists = closure(DECLARED)
    allowed = {"pagedllm"} | set(sys.stdlib_module_names) | {m.split(".")[0] for m in sys.modules}
    for top, dists in md.packages_distributions().items():
        if any(canonicalize_name(d) in allowed_dists for d in dists):
            allowed.add(top)

    class Blocker(importlib.abc.MetaPathFinder):
        blocked = set()
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top not in allowed and not top.startswith("_"):
                self.blocked.add(top)
                raise ModuleNotFoundError(f"not installed by `pip install pagedllm`: {top}",
                                          name=top)
            return None

    blocker = Blocker()
    sys.meta_path.insert(0, blocker)
"""


def test_server_imports_come_from_declared_dependencies():
    """With only declared dependencies importable, the server module and the engine-process
    client (pyzmq) import: a plain install can run `pagedllm serve`."""
    proc = _run(f"DECLARED = {_declared_dependencies()!r}\n" + textwrap.dedent(
        _CLEAN_INSTALL_SIMULATION) + textwrap.dedent("""
        import pagedllm.entrypoints.openai.api_server
        import pagedllm.engine.core_client
        import zmq, zmq.asyncio, uvicorn, httpx
        from pagedllm.cli import build_parser
        build_parser().parse_args(["serve", "--port", "0"])
        print("BLOCKED", sorted(blocker.blocked))
    """))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BLOCKED" in proc.stdout


def test_simulation_blocks_undeclared_packages():
    """The oracle itself: a package the test extra installs but the main dependencies do not
    (openai) cannot be imported under the simulation."""
    proc = _run(f"DECLARED = {_declared_dependencies()!r}\n" + textwrap.dedent(
        _CLEAN_INSTALL_SIMULATION) + "\nimport openai\n")
    assert proc.returncode != 0
    assert "not installed by `pip install pagedllm`: openai" in proc.stderr


def test_serve_extra_is_kept_as_an_alias():
    """`pip install 'pagedllm[serve]'` keeps working and adds nothing beyond the defaults."""
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    serve = set(project["optional-dependencies"]["serve"])
    assert serve and serve <= set(project["dependencies"])
