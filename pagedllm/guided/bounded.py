"""``BoundedWorker``: run untrusted-cost jobs (grammar compiles, chat templates) in a child
process under a time and a memory budget.

Why a process: a runaway compile inside a C++/Rust extension cannot be interrupted from
Python (a thread cannot be killed, and a signal handler only runs between bytecodes), so it
would hold the caller's loop, its memory and even SIGTERM. A child can be killed.

The child is ``python -m pagedllm.guided.bounded`` (not multiprocessing: no re-import of the
caller's ``__main__``, which spawn does). Messages are length-prefixed pickles over its
stdin/stdout: first ``("init", "module:init_fn", init args, "module:job_fn")``, answered
``("ready", None)``; then ``("job", args)`` one at a time (``job_fn(state, *args)``),
answered ``("ok", result)`` or ``("error", text)``. The parent polls the child's resident
memory while it waits; a job past its time or memory budget gets the child killed (SIGKILL)
and ``BudgetExceeded``; the next job starts a fresh child.
The child also dies with its parent (PR_SET_PDEATHSIG, and EOF on stdin), and caps its own
address space (RLIMIT_AS) so that a single huge allocation fails there instead of the host.
"""
from __future__ import annotations

import importlib
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any

_HEADER = struct.Struct("<Q")
_POLL_S = 0.02
_START_TIMEOUT_S = float(os.environ.get("PAGEDLLM_BOUNDED_WORKER_START_TIMEOUT_S", "120"))


class BudgetExceeded(Exception):
    """A job ran past its time or memory budget (``kind``: "time" or "memory")."""

    def __init__(self, kind: str, limit: float, unit: str) -> None:
        self.kind, self.limit, self.unit = kind, limit, unit
        super().__init__(f"exceeded the {kind} budget of {limit:g} {unit}")


class JobError(Exception):
    """The job raised in the child; the text is its ``str(exc)`` (a ValueError's message is
    kept as is, other exceptions get their type name)."""


class BoundedWorker:
    """One child process running ``job(state, *args)`` with ``state = init(*init_args)``.

    ``run`` is thread-safe (jobs are serialized) and blocking; call it off any event loop."""

    def __init__(self, init: str, init_args: tuple, job: str, time_s: float,
                 memory_mb: float, name: str) -> None:
        self.init, self.init_args, self.job = init, init_args, job
        self.time_s, self.memory_mb, self.name = time_s, memory_mb, name
        self._proc: subprocess.Popen | None = None
        self._baseline_rss = 0
        self._lock = threading.Lock()
        self._closed = False
        self.num_killed = 0

    def run(self, *args: Any, time_s: float | None = None) -> Any:
        """The job's result; ``BudgetExceeded`` or ``JobError``."""
        with self._lock:
            self._ensure_started()
            self._send(("job", args))
            budget = self.time_s if time_s is None else time_s
            try:
                kind, payload = self._recv(time.monotonic() + budget, budget)
            except BudgetExceeded:
                self._kill()
                raise
        if kind == "error":
            raise JobError(payload)
        return payload

    def start(self) -> None:
        """Start the child now (it is otherwise started by the first job)."""
        with self._lock:
            self._ensure_started()

    def close(self) -> None:
        """Kill the child now, without waiting for a job in progress (which then fails):
        shutdown and SIGTERM must not wait out a compile budget."""
        self._closed = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    # ---- the child's life ----------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        if self._closed:
            raise JobError(f"the {self.name} worker is shut down")
        env = dict(os.environ, PAGEDLLM_BOUNDED_MEMORY_MB=str(self.memory_mb))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pagedllm.guided.bounded"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env, close_fds=True)
        try:
            self._send(("init", self.init, self.init_args, self.job))
            kind, payload = self._recv(time.monotonic() + _START_TIMEOUT_S, None)
        except BudgetExceeded as exc:
            self._kill()
            raise RuntimeError(f"the {self.name} worker did not start in "
                               f"{_START_TIMEOUT_S:.0f} s") from exc
        if kind != "ready":
            self._kill()
            raise RuntimeError(f"the {self.name} worker failed to start: {payload}")
        self._baseline_rss = _rss_bytes(self._proc.pid)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            self.num_killed += 1
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    # ---- messages ------------------------------------------------------------------------
    def _send(self, message) -> None:
        data = pickle.dumps(message, protocol=5)
        try:
            self._proc.stdin.write(_HEADER.pack(len(data)) + data)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            self._kill()
            raise JobError(f"the {self.name} worker is gone ({exc})") from exc

    def _recv(self, deadline: float, budget: float | None) -> tuple:
        header = self._read(_HEADER.size, deadline, budget)
        return pickle.loads(self._read(_HEADER.unpack(header)[0], deadline, budget))

    def _read(self, size: int, deadline: float, budget: float | None) -> bytes:
        """``size`` bytes from the child; its memory is checked every poll."""
        fd, chunks, left = self._proc.stdout.fileno(), [], size
        while left:
            if time.monotonic() > deadline:
                raise BudgetExceeded("time", budget or _START_TIMEOUT_S, "s")
            if budget is not None and self._over_memory():
                raise BudgetExceeded("memory", self.memory_mb, "MB")
            if not select.select([fd], [], [], _POLL_S)[0]:
                continue
            try:
                chunk = os.read(fd, min(left, 1 << 20))
            except OSError:
                chunk = b""
            if not chunk:
                code = self._proc.wait()
                self._kill()
                if code == -signal.SIGKILL or code == -signal.SIGSEGV or code < 0:
                    raise JobError(f"the {self.name} worker died ({_signal_name(code)}); "
                                   "the input is too costly")
                raise JobError(f"the {self.name} worker exited with code {code}")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _over_memory(self) -> bool:
        return _rss_bytes(self._proc.pid) - self._baseline_rss > self.memory_mb * 2 ** 20


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"exit code {code}"


def _resolve(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# ---- the child ---------------------------------------------------------------------------
def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: a compile stuck in native code must not outlive the server."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _cap_address_space() -> None:
    """RLIMIT_AS at today's size plus twice the memory budget: one huge allocation fails
    here (MemoryError) before the parent's poll could see it."""
    import resource
    budget = float(os.environ.get("PAGEDLLM_BOUNDED_MEMORY_MB", "0")) * 2 ** 20
    if budget <= 0:
        return
    with open("/proc/self/statm") as f:
        vms = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    try:
        resource.setrlimit(resource.RLIMIT_AS, (int(vms + 2 * budget), resource.RLIM_INFINITY))
    except (ValueError, OSError):
        pass


def _child_main() -> None:
    _die_with_parent()
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")  # the protocol's stream; fd 1 (prints) goes to stderr
    os.dup2(2, 1)

    def reply(message) -> None:
        data = pickle.dumps(message, protocol=5)
        out.write(_HEADER.pack(len(data)) + data)
        out.flush()

    state, job = None, None
    while True:
        header = inp.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return  # the parent is gone
        message = pickle.loads(inp.read(_HEADER.unpack(header)[0]))
        try:
            if message[0] == "init":
                state, job = _resolve(message[1])(*message[2]), _resolve(message[3])
                _cap_address_space()
                reply(("ready", None))
                continue
            reply(("ok", job(state, *message[1])))
        except MemoryError:
            reply(("error", "the input needs more memory than the budget allows"))
        except ValueError as exc:
            reply(("error", str(exc)))
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            reply(("error", f"{type(exc).__name__}: {exc}"))


if __name__ == "__main__":
    _child_main()
