"""Start the real OpenAI server as a subprocess on a free 127.0.0.1 port, for e2e tests."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RemoteServer:
    """``with RemoteServer(model, args) as server:`` ... ``server.url``; stops on exit."""

    def __init__(self, model: str, args: list[str] = (), startup_timeout: float = 120.0,
                 entry: tuple[str, ...] = ("-m", "pagedllm.entrypoints.openai.api_server")
                 ) -> None:
        """``entry``: how the server is started (vLLM's module by default; ("-m", "pagedllm",
        "serve") is the `pagedllm serve` command)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
        self.log_path = Path(f"/tmp/pagedllm-server-{self.port}.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, *entry, "--model", model,
             "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        self._wait_healthy(startup_timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-5000:]

    def metrics(self) -> dict[str, float]:
        """Sample name (with labels stripped) -> value; labelled samples are summed."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            match = re.match(r"^([^{\s]+)(\{[^}]*\})?\s+(\S+)$", line)
            if match:
                name = match.group(1)
                values[name] = values.get(name, 0.0) + float(match.group(3))
        return values

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def __enter__(self) -> "RemoteServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
