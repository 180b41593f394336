"""Chat templates off the event loop; a request's own ``chat_template`` in a bounded process.

A chat template is a program: ``{% for i in range(100000) %}{% for j in range(100000) %}``
runs for hours inside jinja2's sandbox (which caps one ``range``, not the nesting), and it
ran on the event loop, so ``/health`` and every stream froze. vLLM 0.6.3 accepts
``chat_template`` in chat and ``/tokenize`` requests, so instead of refusing it:

* a request-supplied template is rendered by ``tokenizer.apply_chat_template`` (transformers'
  ``ImmutableSandboxedEnvironment``, the same output as in-process) in a ``BoundedWorker``
  child process with a time budget (``PAGEDLLM_CHAT_TEMPLATE_TIMEOUT_S``, 5 s) and a memory
  budget (``PAGEDLLM_CHAT_TEMPLATE_MEMORY_MB``, 1024); one past either is killed and the
  request gets a 400 naming ``chat_template``;
* the operator's template (``--chat-template`` or the tokenizer's) is trusted and rendered in
  this process, on a worker thread.
Both awaitable forms run on threads, never on the loop. ``render_sync`` is for callers that are
not async (``/tokenize``): bounded, but it holds the loop for up to the budget.
"""
from __future__ import annotations

import asyncio
import os
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pagedllm.guided.bounded import BoundedWorker, BudgetExceeded, JobError

_TIMEOUT_S = float(os.environ.get("PAGEDLLM_CHAT_TEMPLATE_TIMEOUT_S", "5"))
_MEMORY_MB = float(os.environ.get("PAGEDLLM_CHAT_TEMPLATE_MEMORY_MB", "1024"))


def worker_init(tokenizer_bytes: bytes):
    return pickle.loads(tokenizer_bytes)


def worker_render(tokenizer, messages: list[dict], template: str, kwargs: dict) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         **kwargs)


class TemplateError(ValueError):
    """The template could not be rendered (the caller's input: a 400)."""


class TemplateSandbox:
    """Renders chat templates for one tokenizer; the child process starts on first use."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._worker: BoundedWorker | None = None
        self._lock = threading.Lock()
        # one thread per kind of work: rendering in-process, and waiting on the child
        self._local = ThreadPoolExecutor(2, thread_name_prefix="chat-template")
        self._remote = ThreadPoolExecutor(1, thread_name_prefix="chat-template-sandbox")

    async def render(self, messages: list[dict], template: str | None, trusted: bool,
                     kwargs: dict[str, Any]) -> str:
        """The prompt text; ``trusted``: the operator's template (or the tokenizer's)."""
        loop = asyncio.get_running_loop()
        pool = self._local if trusted else self._remote
        return await loop.run_in_executor(pool, self.render_sync, messages, template,
                                          trusted, kwargs)

    def render_sync(self, messages: list[dict], template: str | None, trusted: bool,
                    kwargs: dict[str, Any]) -> str:
        if trusted:
            return self.tokenizer.apply_chat_template(messages, chat_template=template,
                                                      tokenize=False, **kwargs)
        try:
            return self._child().run(messages, template, kwargs)
        except BudgetExceeded as exc:
            variable = "PAGEDLLM_CHAT_TEMPLATE_TIMEOUT_S" if exc.kind == "time" else \
                "PAGEDLLM_CHAT_TEMPLATE_MEMORY_MB"
            raise TemplateError(f"chat_template: rendering the request's template {exc} "
                                f"({variable})") from exc
        except JobError as exc:
            raise TemplateError(f"could not apply the chat template: {exc}") from exc

    def _child(self) -> BoundedWorker:
        with self._lock:
            if self._worker is None:
                try:
                    data = pickle.dumps(self.tokenizer, protocol=5)
                except Exception as exc:  # noqa: BLE001 - e.g. a remote-code tokenizer
                    raise TemplateError(
                        "chat_template in a request is not supported with this tokenizer "
                        f"(it cannot be sent to the template sandbox: {exc}); use the "
                        "server's --chat-template") from exc
                self._worker = BoundedWorker(
                    "pagedllm.entrypoints.openai.sandbox:worker_init", (data,),
                    "pagedllm.entrypoints.openai.sandbox:worker_render", _TIMEOUT_S,
                    _MEMORY_MB, "chat-template")
            return self._worker

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
