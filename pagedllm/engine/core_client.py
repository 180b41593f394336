"""The engine core in its own process, and the front end's client of it (``pagedllm serve``).

Two ZeroMQ sockets over ipc, both bound by the front end: requests and aborts go in on one
(PUSH -> PULL), the core's messages come out on the other. Messages are pickled tuples
(protocol 5):

    in:  ("add", CoreRequest) | ("abort", [seq ids]) | ("stop",)
         ("call", call id, EngineCore method name, args)
    out: ("result", call id, error text or None, result)
         ("acks", [(request_id, error or None, final prompt ids or None), ...])
         ("step", [SeqDelta, ...], stats, time sent) | ("stats", stats) (an idle core after
         aborts)
         ("failed", [seq ids], text) | ("fatal", text)

Start-up goes over a pipe. The front end starts the process first and sends it the engine
arguments, ("args", EngineArgs, log_stats), then resolves the configuration while the child
imports torch and the engine. It then sends ("config", EngineConfig): its Hugging Face config
is plain data (`pagedllm.models.plain_config`), so unpickling it imports no transformers
(that import was 4.5 s of the core's 7.2 s on the H100 machine). A
configuration too large for the pipe's buffer is not sent: ("resolve",) tells the core to
resolve the arguments itself. ("config", EngineConfig, log_stats) first hands over a resolved
configuration instead. The core answers ("ready", cache_info) once the model is loaded and
profiled, or ("init_error", traceback).

The core process is a busy loop with no asyncio: drain the input socket (blocking only while
it has nothing to run), answer the adds of this round, ``step()``, send the step's deltas
with the scheduler stats. It exits when told to stop, on SIGTERM, or when its parent process
is gone (no orphan keeps a GPU); the executor's own shutdown ends tp/pp workers and Ray
actors. An exception inside a step fails the requests in flight (a "failed" message) and the
loop goes on, as in one process.
"""
from __future__ import annotations

import gc
import logging
import os
import pickle
import signal
import tempfile
import threading
import time
import traceback
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig

logger = logging.getLogger("pagedllm.engine.core_client")

_IDLE_POLL_MS = 500  # an idle core checks that its parent is alive this often
_PENDING_POLL_MS = 5  # ... and whether a guided compile is done, while one is pending
# the largest configuration the front end sends after the arguments (a Unix socket pair's send
# buffer is about 200 KiB, so a send never blocks while the core imports; the 8B shape's is
# about 6 KiB); a larger one: the core resolves the arguments itself
_OFFER_MAX_BYTES = 96 * 1024
_READY_TIMEOUT_S = float(os.environ.get("PAGEDLLM_ENGINE_READY_TIMEOUT_S", "1800"))


def _dumps(message) -> bytes:
    return pickle.dumps(message, protocol=5)


# ---- the core process ----------------------------------------------------------------------
def run_engine_core(in_addr: str, out_addr: str, parent_pid: int, conn,
                    spawned_at: float) -> None:
    """Process target: import the engine while the front end resolves the configuration,
    take the configuration from ``conn``, build the core, then serve it until told to stop.
    The cyclic collector is off during the imports (torch, the models and transformers
    allocate hundreds of thousands of objects, none of them garbage: its passes over them
    took 0.4-0.8 s of 2.4 s on a 2-core CPU; no change measured on the H100 machine); it is
    back on before the engine is built."""
    gc.disable()
    threading.Thread(target=_init_cuda_driver, name="cuInit", daemon=True).start()
    import zmq
    from pagedllm.logging_setup import configure_logging
    configure_logging()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the front end, which stops us
    signal.signal(signal.SIGTERM, _raise_exit)
    from pagedllm.engine.core import EngineCore  # the heavy imports (torch, the models)
    gc.enable()
    logger.info("start-up: engine core process up in %.1f s (spawn and imports)",
                time.time() - spawned_at)
    configured = _wait_config(conn, parent_pid)
    if configured is None:
        return
    kind, payload, log_stats = configured
    try:
        config = payload if kind == "config" else _resolve_quietly(payload)
    except Exception:  # noqa: BLE001 - the front end resolved the same arguments: it reports
        conn.send(("init_error", traceback.format_exc()))
        return
    ctx = zmq.Context()
    inbox, outbox = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    inbox.connect(in_addr)
    outbox.connect(out_addr)
    core = None
    try:
        start = time.perf_counter()
        core = EngineCore(config, log_stats)
        logger.info("engine core ready in %.1f s (pid %d)", time.perf_counter() - start,
                    os.getpid())
        conn.send(("ready", core.cache_info()))
        CoreLoop(core, inbox, outbox, parent_pid).run()
    except SystemExit:
        pass
    except BaseException:  # noqa: BLE001 - tell the front end why, then exit non-zero
        text = traceback.format_exc()
        logger.error("engine core failed:\n%s", text)
        if core is None:
            conn.send(("init_error", text))
        else:
            outbox.send(_dumps(("fatal", text)))
        raise
    finally:
        if core is not None:
            core.shutdown()
        outbox.close(linger=1000)
        inbox.close(linger=0)
        ctx.term()


def _init_cuda_driver() -> None:
    """cuInit, while the main thread imports (ctypes releases the GIL during the call): the
    configuration's first CUDA query (``torch.cuda.is_available``) would otherwise wait for
    the driver to start (on the H100 machine the configuration step still took 1.4 s once
    transformers' imports had moved before it: most likely this). Idempotent, so torch's
    own initialisation later finds it done; without a CUDA driver nothing happens. The
    core starts its workers with spawn, never fork, so an early cuInit is safe."""
    import ctypes
    try:
        ctypes.CDLL("libcuda.so.1").cuInit(0)
    except (OSError, AttributeError):
        pass


def _wait_config(conn, parent_pid: int):
    """("config" | "args", payload, log_stats) from the front end, or None when it gave up or
    is gone. After ("args", ...) the front end's resolved configuration follows, or
    ("resolve",) when it could not send it (the core resolves the arguments)."""
    message = _recv_start(conn, parent_pid)
    if message is None or message[0] not in ("args", "config"):
        return None
    if message[0] == "config":
        return message
    follow = _recv_start(conn, parent_pid)
    if follow is None or follow[0] not in ("config", "resolve"):
        return None
    if follow[0] == "config":
        logger.info("start-up: engine core took the front end's configuration")
        return "config", follow[1], message[2]
    return message


def _recv_start(conn, parent_pid: int):
    """The next start-up message, or None when the pipe closed or the front end is gone."""
    while not conn.poll(_IDLE_POLL_MS / 1000):
        if os.getppid() != parent_pid:
            return None
    try:
        return conn.recv()
    except EOFError:
        return None


def _resolve_quietly(engine_args) -> "EngineConfig":
    """The engine configuration from the front end's arguments. The front end resolves the
    same arguments and reports their warnings and errors; here they stay below ERROR (an
    error still reaches the front end, as the init_error's traceback)."""
    start = time.perf_counter()
    noisy = [logging.getLogger(name) for name in ("pagedllm", "transformers")]
    levels = [log.level for log in noisy]
    for log in noisy:
        log.setLevel(logging.ERROR)
    try:
        config = engine_args.create_engine_config()
    finally:
        for log, level in zip(noisy, levels):
            log.setLevel(level)
    logger.info("start-up: engine core resolved the configuration in %.1f s",
                time.perf_counter() - start)
    return config


def _raise_exit(*_) -> None:
    raise SystemExit(0)


class CoreLoop:
    """The core process's loop: inputs, acks, one step, its outputs."""

    def __init__(self, core, inbox, outbox, parent_pid: int) -> None:
        self.core, self.inbox, self.outbox, self.parent_pid = core, inbox, outbox, parent_pid
        self.num_steps = 0
        self.step_s = 0.0  # inside core.step()
        self.send_s = 0.0  # pickling and sending the step's message
        self._changed = False  # an add or abort since the last message with stats

    def run(self) -> None:
        import zmq
        while True:
            if not self.core.has_unfinished_requests():
                pending = self.core.has_pending()
                timeout = _PENDING_POLL_MS if pending else _IDLE_POLL_MS
                if not self.inbox.poll(timeout, zmq.POLLIN) and not pending:
                    if os.getppid() != self.parent_pid:
                        logger.warning("the front-end process is gone; engine core exits")
                        return
                    continue
            if not self._drain():
                break
            if self.core.has_unfinished_requests():
                self._step()
            elif self._changed:  # e.g. an abort freed blocks: /metrics must see it
                self.outbox.send(_dumps(("stats", self.core.get_stats())))
            self._changed = False
        logger.info("engine core stopped after %d steps: %.2f s in step(), %.3f s sending "
                    "outputs (%.1f us a step)", self.num_steps, self.step_s, self.send_s,
                    1e6 * self.send_s / max(self.num_steps, 1))

    def _drain(self) -> bool:
        """Apply every queued message, then add the requests whose guided compile has
        finished (their acks go out now: a compile never holds the loop); False on stop."""
        import zmq
        acks = []
        while True:
            try:
                message = pickle.loads(self.inbox.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            kind = message[0]
            if kind == "stop":
                return False
            self._changed = True
            if kind == "abort":
                self.core.abort(message[1])
            elif kind == "add":
                ack = self._add(message[1])
                if ack is not None:  # None: its constraint is compiling
                    acks.append(ack)
            elif kind == "call":
                self.outbox.send(_dumps(("result", message[1], *self._call(*message[2:]))))
        if self.core.has_pending():
            acks += [self._ack(req, added, exc) for req, added, exc in self.core.finish_pending()]
        if acks:
            self._changed = True
            self.outbox.send(_dumps(("acks", acks)))
        return True

    def _call(self, method: str, args: tuple) -> tuple:
        """A utility call: (error text or None, result)."""
        try:
            return None, getattr(self.core, method)(*args)
        except Exception as exc:  # noqa: BLE001 - raised in the caller
            return f"{type(exc).__name__}: {exc}", None

    def _add(self, request) -> tuple | None:
        """The add's ack, or None while its guided constraint compiles."""
        try:
            added = self.core.submit_request(request)
        except Exception as exc:  # noqa: BLE001 - every rejection goes back to the caller
            return self._ack(request, None, exc)
        return None if added is None else self._ack(request, added, None)

    @staticmethod
    def _ack(request, added, exc: Exception | None) -> tuple:
        """(request_id, error text or None, final prompt ids if they changed)."""
        if exc is not None:
            return request.request_id, f"{exc}" if isinstance(exc, ValueError) else repr(exc), \
                None
        prompt = added.prompt_token_ids
        return request.request_id, None, \
            (prompt if len(prompt) != len(request.prompt_token_ids) else None)

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            deltas = self.core.step()
        except Exception as exc:  # noqa: BLE001 - fail the in-flight requests, keep serving
            logger.exception("engine step failed; failing the in-flight requests")
            seq_ids = list(self.core.scheduler.requests)
            try:
                seq_ids = self.core.fail_all()
            except Exception:  # noqa: BLE001
                logger.exception("aborting after a failed step also failed")
            self.outbox.send(_dumps(("failed", seq_ids, f"engine step failed: {exc!r}")))
            return
        finally:
            self.num_steps += 1
            self.step_s += time.perf_counter() - start
        sent = time.perf_counter()
        self.outbox.send(_dumps(("step", deltas, self.core.get_stats(), time.time())),
                         copy=False)
        self.send_s += time.perf_counter() - sent


# ---- the front end's side ------------------------------------------------------------------
class MPCoreClient:
    """Starts the core process and talks to it. ``send`` is synchronous (ZeroMQ queues it);
    ``recv`` is awaited by the front end's reader task."""

    def __init__(self) -> None:
        """Starts the core process at once: it imports the engine while the front end
        resolves the engine configuration; ``configure`` hands it over."""
        import multiprocessing

        import zmq
        import zmq.asyncio
        base = os.path.join(tempfile.gettempdir(), f"pagedllm-{uuid.uuid4().hex[:12]}")
        self.in_addr, self.out_addr = f"ipc://{base}-in", f"ipc://{base}-out"
        self._ctx, self._actx = zmq.Context(), zmq.asyncio.Context()
        self._inbox = self._ctx.socket(zmq.PUSH)  # the core's input
        self._inbox.bind(self.in_addr)
        self._outbox = self._actx.socket(zmq.PULL)  # the core's output
        self._outbox.bind(self.out_addr)
        # spawn: CUDA cannot be used in a forked child; not a daemon: the core may start
        # tp/pp worker processes of its own
        mp = multiprocessing.get_context("spawn")
        self._ready, child_conn = mp.Pipe(duplex=True)
        self.proc = mp.Process(target=run_engine_core, name="pagedllm-engine-core",
                               args=(self.in_addr, self.out_addr, os.getpid(), child_conn,
                                     time.time()), daemon=False)
        from pagedllm.logging_setup import process_age_s
        self.spawned_at_age_s = process_age_s()  # the front end's imports before the spawn
        # (the core's OpenMP threads wait as OpenMP does by default, spinning a while at a
        # barrier, as offline runs do: passive waiting, which the core had before, served the
        # 2-core tiny-Llama benchmark at 0.73-0.82 of offline against 0.81-0.91, and its
        # 1-token TTFT was 10 ms against 12 ms: docs/benchmarks.md, fourth part)
        self.proc.start()
        child_conn.close()
        self.cache_info: dict[str, Any] = {}
        self.ready = False  # the core answered "ready": it reads its input socket now
        self.recv_s = 0.0  # front end: receiving and unpickling the core's messages
        self._closed = False
        self.configured = False
        self.config: EngineConfig | None = None  # the front end's resolution (start_with_args)

    def configure(self, config: EngineConfig, log_stats: bool | None = None) -> None:
        """Hand the core process its engine configuration (it builds the engine then)."""
        self._ready.send_bytes(_dumps(("config", config, log_stats)))
        self.configured = True

    def configure_args(self, engine_args, log_stats: bool | None = None) -> None:
        """Hand the core process the engine arguments: it resolves the configuration itself
        (in parallel with the front end's own resolution) and builds the engine."""
        self._ready.send(("args", engine_args, log_stats))
        self.configured = True

    def start_with_args(self, engine_args, log_stats: bool | None = None) -> EngineConfig:
        """Hand the core the engine arguments, resolve them here and send it the result
        (``offer_config``); the resolved configuration is kept as ``config``. ``pagedllm
        serve`` calls this before importing the server, so the core builds the engine while
        this process imports the rest. The core is stopped if the resolution fails."""
        self.configure_args(engine_args, log_stats)
        try:
            start = time.perf_counter()
            config = engine_args.create_engine_config()
            logger.info("start-up: engine configuration resolved in %.1f s",
                        time.perf_counter() - start)
            self.offer_config(config)
        except BaseException:
            self.shutdown(timeout=0.5)  # it may be busy resolving or loading: no wait
            raise
        self.config = config
        return config

    def offer_config(self, config: EngineConfig) -> bool:
        """After ``configure_args``: send the core the front end's resolved configuration,
        or ("resolve",) when it does not fit the
        pipe's buffer with room to spare (the core may still be importing: a send must never
        block) or does not pickle. True when sent."""
        if self.proc.exitcode is not None:
            return False
        try:
            data = _dumps(("config", config))
        except Exception:  # noqa: BLE001 - e.g. a callable in it: the core resolves its own
            data = b""
        sent = 0 < len(data) <= _OFFER_MAX_BYTES
        self._ready.send_bytes(data if sent else _dumps(("resolve",)))
        return sent

    def wait_ready(self) -> None:
        """Block until the core has loaded the model (or raise with its error)."""
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._ready.poll(0.2):
                try:
                    kind, payload = self._ready.recv()
                except EOFError:  # it died before answering; the exit code says how
                    break
                if kind == "ready":
                    self.cache_info, self.ready = payload, True
                    return
                raise RuntimeError(f"the engine core failed to start:\n{payload}")
            if not self.proc.is_alive():
                break
        if not self.proc.is_alive():
            self.proc.join(1)
            raise RuntimeError(f"{self.exit_cause()} while starting")
        raise RuntimeError(f"the engine core was not ready in {_READY_TIMEOUT_S:.0f} s")

    def send(self, message) -> None:
        self._inbox.send(_dumps(message))

    def add_request(self, request) -> None:
        try:
            data = _dumps(("add", request))
        except Exception as exc:  # noqa: BLE001 - e.g. a logits processor that is a lambda
            raise ValueError(f"the request cannot be sent to the engine process: {exc}") \
                from exc
        self._inbox.send(data)

    def abort(self, seq_ids: list[str]) -> None:
        if seq_ids:
            self.send(("abort", list(seq_ids)))

    async def recv(self, timeout_ms: int):
        """The core's next message, or None when nothing came within ``timeout_ms``."""
        if not await self._outbox.poll(timeout_ms):  # flags default to POLLIN
            return None
        return self._decode(await self._outbox.recv(copy=False))

    def recv_nowait(self):
        """The core's next message if one is queued already, else None (never waits)."""
        import zmq
        try:
            data = self._outbox.recv(zmq.NOBLOCK, copy=False).result()  # settled at once
        except zmq.Again:
            return None
        return self._decode(data)

    def _decode(self, data):
        """Unpickle one message of the core (timed: the front end's share of the IPC)."""
        start = time.perf_counter()
        message = pickle.loads(data.buffer)
        self.recv_s += time.perf_counter() - start
        return message

    def is_alive(self) -> bool:
        return self.proc.is_alive()

    def exit_cause(self) -> str:
        code = self.proc.exitcode
        if code is None:
            return "the engine core process is running"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"the engine core process (pid {self.proc.pid}) was killed by {name}"
        return f"the engine core process (pid {self.proc.pid}) exited with code {code}"

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the core to stop, then make sure it has (no orphan process). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.proc.is_alive():
            try:  # a core not ready yet listens on the pipe (or not at all: terminated below)
                if self.ready:  # never block: a PUSH whose peer is gone would wait for it
                    import zmq
                    self._inbox.send(_dumps(("stop",)), flags=zmq.NOBLOCK)
                else:
                    self._ready.send(("stop",))
            except Exception:  # noqa: BLE001 - the socket or pipe may be gone already
                pass
            self.proc.join(timeout)
        if self.proc.is_alive():
            if self.ready:  # one still starting is stopped this way on purpose
                logger.warning("engine core did not stop in %.0f s; terminating it", timeout)
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self._inbox.close(linger=0)
        self._outbox.close(linger=0)
        for addr in (self.in_addr, self.out_addr):
            path = addr.removeprefix("ipc://")
            if os.path.exists(path):
                os.unlink(path)

