#!/usr/bin/env bash
# The static guards of .ci/run, runnable alone: ruff (rules in pyproject.toml), mypy on the
# control plane, the engine, the option handling and model resolution (pyproject.toml
# [tool.mypy]), and the 60-line function budget (scripts/check_function_length.py). The plane
# import guards are tests (tests/unit/test_plane_boundaries.py). Exits non-zero on the first
# failing guard.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
echo "== ruff";            "$PY" -m ruff check pagedllm tests scripts
echo "== mypy";            "$PY" -m mypy --python-executable "$PY"
echo "== function length"; "$PY" scripts/check_function_length.py
