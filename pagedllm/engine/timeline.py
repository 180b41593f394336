"""Per-step timelines of the engine core and the serving front end (where serving time goes).

Enabled by ``PAGEDLLM_STEP_TIMELINE=<dir>`` (off by default: nothing is recorded). The core
records when each request reached it and, per step, when the step finished, how many requests
and tokens it ran, how many of them were new prefills and how many requests still waited; the
multi-process front end records, per step message, when the core sent it, when it was handled
and how long making its outputs took. Each writes ``<dir>/<role>-<pid>.json`` at shutdown;
``benchmarks/timeline.py`` compares the server's core with an offline run's. Wall-clock times
(``time.time()``) so that the processes' records line up.
"""
from __future__ import annotations

import json
import os
import time


def timeline_dir() -> str | None:
    """pagedllm's own diagnostic switch (no vLLM spelling)."""
    return os.environ.get("PAGEDLLM_STEP_TIMELINE") or None


class Timeline:
    """Rows appended in the hot path (a list append each); written once at ``save``."""

    def __init__(self, role: str, directory: str) -> None:
        self.role, self.directory = role, directory
        self.rows: dict[str, list] = {}

    @classmethod
    def create(cls, role: str) -> "Timeline | None":
        directory = timeline_dir()
        return cls(role, directory) if directory else None

    def add(self, kind: str, *values) -> None:
        self.rows.setdefault(kind, []).append((time.time(), *values))

    def save(self) -> str:
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"{self.role}-{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump(self.rows, f)
        return path
