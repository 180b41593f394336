"""The engine core in its own process (``pagedllm serve``'s default): faults and shut-down.

Oracles: the OpenAI error shape and status codes of the server's contract; the process table
(/proc) for leftover processes; /metrics for freed KV blocks.
* kill -9 of the core mid-stream: the stream ends with an in-band 500 error within a second,
  new requests get 500, /health is 500 (or the server is already gone), and the server exits
  non-zero with a log line naming the cause; no process of its tree is left.
* VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1: the server stays up, /health answers 500.
* SIGTERM with tensor parallelism (the core's own worker processes): every process exits.
* a client that disconnects mid-stream frees its KV blocks in the core process.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx
import pytest

from tests.utils.server import RemoteServer
from tests.utils.tiny_models import build_tiny_model

# long requests (4000 tokens: seconds on CPU; the tiny model's 512-position context stretched
# by linear RoPE scaling), so that a stream is still running when the test kills the core or
# disconnects (a 200-token request was all generated before the kill in a CI run)
ARGS = ["--device", "cpu", "--max-model-len", "4096", "--rope-scaling",
        '{"rope_type": "linear", "factor": 8}', "--num-gpu-blocks-override", "300",
        "--disable-log-requests"]
BODY = {"model": None, "prompt": "The for statement", "max_tokens": 4000, "ignore_eos": True,
        "temperature": 0}


@pytest.fixture(scope="module")
def model_path():
    return str(build_tiny_model("llama"))


def _core_pid(server: RemoteServer) -> int:
    match = re.search(r"engine core process (\d+) spawned", server.log())
    assert match, server.log()
    return int(match.group(1))


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.add(pid)
        except OSError:
            pass
    return alive


def _assert_all_exit(tree: set[int], server: RemoteServer, timeout: float = 15.0) -> None:
    """Every process of the server's tree ends (multiprocessing's resource tracker exits once
    the processes holding its pipe are gone, a moment after the server)."""
    deadline = time.monotonic() + timeout
    while _alive(tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(tree), server.log()


def _wait_exit(server: RemoteServer, timeout: float = 20.0) -> int:
    try:
        return server.proc.wait(timeout)
    except Exception:  # noqa: BLE001
        pytest.fail(f"the server did not exit:\n{server.log()}")


def test_core_killed_mid_stream(model_path):
    with RemoteServer(model_path, ARGS) as server:
        body = dict(BODY, model=model_path, stream=True)
        tree = _children(server.proc.pid)
        assert _core_pid(server) in tree
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                          timeout=30) as response:
            lines = response.iter_lines()
            chunks = [next(lines) for _ in range(4)]  # the stream is running
            assert all(c.startswith("data: {") or not c for c in chunks)
            killed_at = time.monotonic()
            os.kill(_core_pid(server), signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
            ended_after = time.monotonic() - killed_at
        errors = [json.loads(line[6:]) for line in rest if line != "data: [DONE]"
                  and "error" in json.loads(line[6:])]
        assert errors and errors[-1]["error"]["code"] == 500, rest[-3:]
        assert "engine" in errors[-1]["error"]["message"]
        assert ended_after < 1.5
        try:  # until it has exited, the server answers 500
            health = httpx.get(f"{server.url}/health", timeout=2).status_code
            assert health == 500
            late = httpx.post(f"{server.url}/v1/completions",
                              json=dict(BODY, model=model_path), timeout=5)
            assert late.status_code == 500 and late.json()["object"] == "error"
        except httpx.TransportError:
            pass  # already gone
        assert _wait_exit(server) != 0
        log = server.log_path.read_text()
        assert "engine died" in log and "SIGKILL" in log and "Traceback" not in log
        _assert_all_exit(tree, server)


def test_keep_alive_on_engine_death(model_path, monkeypatch):
    monkeypatch.setenv("VLLM_KEEP_ALIVE_ON_ENGINE_DEATH", "1")
    with RemoteServer(model_path, ARGS) as server:
        os.kill(_core_pid(server), signal.SIGKILL)
        deadline = time.monotonic() + 5
        while httpx.get(f"{server.url}/health", timeout=2).status_code != 500:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(2)
        assert server.proc.poll() is None  # still serving (errors), as asked
        assert httpx.get(f"{server.url}/health", timeout=2).status_code == 500


def test_sigterm_with_tensor_parallel_workers_leaves_no_process(model_path):
    with RemoteServer(model_path, ARGS + ["--tensor-parallel-size", "2"]) as server:
        response = httpx.post(f"{server.url}/v1/completions",
                              json=dict(BODY, model=model_path, max_tokens=4), timeout=60)
        assert response.status_code == 200
        tree = _children(server.proc.pid)
        assert len(tree) >= 2  # the core and its second rank (at least)
        server.proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert _wait_exit(server) in (0, -signal.SIGTERM)
        assert "engine core stopped" in server.log_path.read_text()
        _assert_all_exit(tree, server)


def test_disconnected_stream_frees_blocks_in_the_core(model_path):
    with RemoteServer(model_path, ARGS) as server:
        body = dict(BODY, model=model_path, stream=True)
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                          timeout=30) as response:
            lines = response.iter_lines()
            for _ in range(6):
                next(lines)
            assert server.metrics()["vllm:gpu_cache_usage_perc"] > 0
        deadline = time.monotonic() + 10  # the client went away: the core aborts it
        while server.metrics()["vllm:gpu_cache_usage_perc"] != 0.0:
            assert time.monotonic() < deadline, server.metrics()
            time.sleep(0.1)
        assert server.metrics()["vllm:num_requests_running"] == 0


def test_config_error_after_the_core_started_exits_at_once(model_path):
    """The core process starts (and resolves the same arguments) before the front end has
    checked them against the model: a --max-model-len the model cannot take still ends
    `pagedllm serve` with the flag's error, exit code 2, within seconds, and no process of
    its tree is left (the core is stopped while it is still starting)."""
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "pagedllm", "serve", model_path, "--device", "cpu",
           "--max-model-len", "999999"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    tree = set()
    while proc.poll() is None and time.monotonic() - start < 60:
        tree |= _children(proc.pid)
        time.sleep(0.05)
    out = proc.communicate(timeout=5)[0]
    assert proc.returncode == 2, out
    assert "--max-model-len 999999 is larger than the model supports" in out
    assert "Traceback" not in out, out
    assert time.monotonic() - start < 30
    assert tree, "the engine core process was never started"
    deadline = time.monotonic() + 10
    while _alive(tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(tree)
