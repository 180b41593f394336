"""``GuideService``: guided-decoding compiles that never stall the engine core.

A constraint's compile cost is the client's choice: ``guided_regex "[ab]*a[ab]{20}"`` (a DFA of
2**21 states) or a JSON string with ``maxLength`` 1000 ran for minutes and gigabytes inside the
core's loop, holding every request and SIGTERM. Here each compile runs in a
``BoundedWorker`` child process (time and memory budgets; killed when one runs out) that
sends back the compiled guide's serialized form: xgrammar's JSON of the compiled grammar
(loaded here against this process's one ``TokenizerInfo``), outlines' index and
lm-format-enforcer's guide as pickles. A budget that runs out, like a parser error, is a
``ValueError`` naming the ``guided_*`` field (HTTP 400), and its verdict is cached, so a
repeat is refused at once.

``submit`` returns a ``Future`` at once (the engine core keeps the request aside until it is
done, and keeps stepping the others); ``compile`` waits for it (``LLM``, the in-process
engine). Compiles run one at a time in one worker; a constraint being compiled is compiled
once for every request that asks for it. The cache of guides and verdicts is LRU, bounded by
entries and by the bytes of the serialized guides.

Limits (environment, read when the service is built):
``PAGEDLLM_GUIDED_COMPILE_TIMEOUT_S`` (10), ``PAGEDLLM_GUIDED_COMPILE_MEMORY_MB`` (2048, over
the worker's idle size), ``PAGEDLLM_GUIDED_MAX_CONSTRAINT_CHARS`` (65536, the constraint's
text), ``PAGEDLLM_GUIDED_CACHE_MB`` (512) and ``PAGEDLLM_GUIDED_CACHE_ENTRIES`` (256).
"""
from __future__ import annotations

import os
import pickle
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from pagedllm.guided.bounded import BoundedWorker, BudgetExceeded, JobError
from pagedllm.guided.compiler import CompiledGuide, GuidedCompiler
from pagedllm.guided.params import IMPLEMENTED_BACKENDS, GuidedDecodingParams


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return default if value in (None, "") else float(value)


@dataclass(frozen=True)
class GuideLimits:
    timeout_s: float = 10.0
    memory_mb: float = 2048.0
    max_constraint_chars: int = 65536
    cache_mb: float = 512.0
    cache_entries: int = 256

    @classmethod
    def from_env(cls) -> "GuideLimits":
        return cls(_env_float("PAGEDLLM_GUIDED_COMPILE_TIMEOUT_S", cls.timeout_s),
                   _env_float("PAGEDLLM_GUIDED_COMPILE_MEMORY_MB", cls.memory_mb),
                   int(_env_float("PAGEDLLM_GUIDED_MAX_CONSTRAINT_CHARS",
                                  cls.max_constraint_chars)),
                   _env_float("PAGEDLLM_GUIDED_CACHE_MB", cls.cache_mb),
                   int(_env_float("PAGEDLLM_GUIDED_CACHE_ENTRIES", cls.cache_entries)))


class GuideCache:
    """LRU of compiled guides and of refusals (an error text), bounded by entries and bytes
    (a guide's bytes: its serialized size, the best measure of its memory at hand)."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[tuple, tuple[CompiledGuide | str, int]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple) -> CompiledGuide | str | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: tuple, value: CompiledGuide | str, nbytes: int) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= old[1]
        if nbytes > self.max_bytes:
            return  # larger than the whole cache: used once, not kept
        self._items[key] = (value, nbytes)
        self.nbytes += nbytes
        while len(self._items) > self.max_entries or self.nbytes > self.max_bytes:
            self.nbytes -= self._items.popitem(last=False)[1][1]


# ---- the worker's side ---------------------------------------------------------------------
def worker_init(tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...],
                default_backend: str) -> GuidedCompiler:
    """The worker's compiler, every installed backend set up (imports, vocabulary tables)
    before the first job, so that a compile's time budget is spent on the constraint alone
    (start-up has its own, longer limit)."""
    compiler = GuidedCompiler(tokenizer, vocab_size, set(eos_token_ids), default_backend)
    for backend in IMPLEMENTED_BACKENDS:
        try:
            compiler.build(GuidedDecodingParams(choice=("a",)), backend)
        except ValueError:  # not installed: its first request gets the install hint
            pass
    return compiler


def worker_compile(compiler: GuidedCompiler, params: GuidedDecodingParams,
                   backend: str) -> tuple[str, bytes]:
    """The compiled constraint, serialized for the engine core's process."""
    guide = compiler.build(params, backend)
    if backend == "xgrammar":
        return backend, guide.grammar.serialize_json().encode()
    return backend, pickle.dumps(guide.grammar, protocol=5)


# ---- the engine's side ---------------------------------------------------------------------
class GuideService:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int],
                 default_backend: str, limits: GuideLimits | None = None) -> None:
        self.limits = limits or GuideLimits.from_env()
        self.local = GuidedCompiler(tokenizer, vocab_size, eos_token_ids, default_backend)
        self.worker = BoundedWorker(
            "pagedllm.guided.service:worker_init",
            (tokenizer, vocab_size, tuple(sorted(eos_token_ids)), default_backend),
            "pagedllm.guided.service:worker_compile", self.limits.timeout_s,
            self.limits.memory_mb, "guided-compile")
        weakref.finalize(self, self.worker.close)
        self.cache = GuideCache(self.limits.cache_entries, int(self.limits.cache_mb * 2 ** 20))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="guided-compile")
        self._in_flight: dict[tuple, Future] = {}
        self._lock = threading.Lock()
        self._xgr_info = None

    def compile(self, params: GuidedDecodingParams) -> CompiledGuide:
        """Blocking, bounded compile (``LLM`` and the in-process engine)."""
        return self.submit(params).result()

    def submit(self, params: GuidedDecodingParams) -> Future:
        """A future of the compiled guide (done already on a cache hit); ValueError at once
        for a constraint refused before compiling (size, backend, no tokenizer)."""
        key = self._key(params)
        with self._lock:
            hit = self.cache.get(key)
            if hit is not None:
                return _done(hit)
            future = self._in_flight.get(key)
            if future is None:
                future = self._pool.submit(self._compile, key, params)
                self._in_flight[key] = future
        return future

    def _key(self, params: GuidedDecodingParams) -> tuple[str, str]:
        if self.local.tokenizer is None:
            raise ValueError("guided decoding needs a tokenizer; it is not available with "
                             "--skip-tokenizer-init")
        backend = self.local.resolve_backend(params)
        text = params.cache_key()
        if len(text) > self.limits.max_constraint_chars:
            raise ValueError(
                f"guided_{params.kind} is {len(text)} characters long; the most is "
                f"{self.limits.max_constraint_chars} (PAGEDLLM_GUIDED_MAX_CONSTRAINT_CHARS)")
        return backend, text

    def _compile(self, key: tuple[str, str], params: GuidedDecodingParams) -> CompiledGuide:
        """On the service's thread: the worker compiles, this process loads the result."""
        try:
            try:
                backend, payload = self.worker.run(params, key[0])
            except BudgetExceeded as exc:
                self._pool.submit(self._restart)  # the next compile finds a worker ready
                raise self._refuse(key, _budget_message(params, exc, self.limits)) from exc
            except JobError as exc:
                raise self._refuse(key, str(exc)) from exc
            guide = CompiledGuide(backend, self._load(backend, payload),
                                  self.local.stop_token_ids)
            with self._lock:
                self.cache.put(key, guide, len(payload))
            return guide
        finally:
            with self._lock:
                self._in_flight.pop(key, None)

    def _restart(self) -> None:
        try:
            self.worker.start()
        except Exception:  # noqa: BLE001 - the next compile reports it
            pass

    def _refuse(self, key: tuple, message: str) -> ValueError:
        with self._lock:
            self.cache.put(key, message, len(message))
        return ValueError(message)

    def _load(self, backend: str, payload: bytes):
        if backend != "xgrammar":
            return pickle.loads(payload)
        import xgrammar as xgr
        if self._xgr_info is None:  # built once, as GuidedCompiler builds it
            self._xgr_info = xgr.TokenizerInfo.from_huggingface(
                self.local.tokenizer, vocab_size=self.local.vocab_size,
                stop_token_ids=list(self.local.stop_token_ids) or None)
        return xgr.CompiledGrammar.deserialize_json(payload.decode(), self._xgr_info)

    def close(self) -> None:
        self.worker.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _done(value: CompiledGuide | str) -> Future:
    future: Future = Future()
    if isinstance(value, str):
        future.set_exception(ValueError(value))
    else:
        future.set_result(value)
    return future


def _budget_message(params: GuidedDecodingParams, exc: BudgetExceeded,
                    limits: GuideLimits) -> str:
    variable = "PAGEDLLM_GUIDED_COMPILE_TIMEOUT_S" if exc.kind == "time" else \
        "PAGEDLLM_GUIDED_COMPILE_MEMORY_MB"
    return (f"guided_{params.kind}: compiling the constraint {exc} ({variable}); simplify "
            "it (e.g. smaller repetition counts, maxLength or maxItems)")
