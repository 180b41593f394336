"""What completions, chat and tokenize share: model-name check, prompt tokenization and length
checks, OpenAI error bodies, SSE framing, logprob formatting and client-disconnect handling.

The front end keeps its own tokenizer (a second instance of the engine's): Hugging Face fast
tokenizers are not safe to use from two threads at once, and the engine thread detokenizes.
Prompts reach the engine as ``{"prompt": text, "prompt_token_ids": ids}``.
"""
from __future__ import annotations

import asyncio
import copy
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, AsyncIterator, Awaitable, Optional

from pagedllm.engine.async_engine import AsyncLLMEngine, RequestStream
from pagedllm.engine.inputs import LoRATokenizers
from pagedllm.entrypoints.openai.protocol import (ChatCompletionLogProb,
                                                  ChatCompletionLogProbs,
                                                  ChatCompletionLogProbsContent,
                                                  CompletionLogProbs, ErrorResponse)
from pagedllm.tracing import trace_headers
from pagedllm.outputs import Logprob, RequestOutput

_MIN_LOGPROB = -9999.0


class OpenAIError(Exception):
    """An error with its OpenAI type and HTTP status; the app turns it into an ErrorResponse."""

    def __init__(self, message: str, err_type: str = "BadRequestError",
                 status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.message, self.err_type, self.status = message, err_type, status

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(message=self.message, type=self.err_type, code=self.status.value)


def build_params(request, default_max_tokens: int):
    """``request.to_sampling_params`` with SamplingParams' ValueError turned into a 400."""
    try:
        return request.to_sampling_params(default_max_tokens)
    except ValueError as exc:
        raise OpenAIError(str(exc)) from exc


def error_body(message: str, err_type: str = "BadRequestError",
               status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> dict:
    return ErrorResponse(message=message, type=err_type, code=status.value).model_dump()


def check_valid_text(text: str, field: str = "prompt") -> None:
    """400 for text that is not Unicode: JSON's ``"\\ud800"`` decodes to a lone UTF-16
    surrogate, which no tokenizer (nor UTF-8) accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise OpenAIError(f"{field} is not valid Unicode text: it contains a lone UTF-16 "
                          f"surrogate ({text[exc.start]!r}) at position {exc.start}") from exc


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


def sse_error(message: str, err_type: str = "InternalServerError",
              status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR) -> str:
    return sse(json.dumps({"error": error_body(message, err_type, status)}))


@dataclass
class ServingContext:
    """Everything a serving class reads: the engine, names, limits and server options."""
    engine: AsyncLLMEngine
    tokenizer: Any  # the front end's own tokenizer, or None with --skip-tokenizer-init
    served_model_names: list[str]
    max_model_len: int
    max_logprobs: int
    response_role: str = "assistant"
    chat_template: Optional[str] = None
    return_tokens_as_token_ids: bool = False
    enable_auto_tools: bool = False     # --enable-auto-tool-choice
    tool_parser: Optional[str] = None   # --tool-call-parser
    # --prompt-adapters: model name -> PromptAdapterRequest (a request's model selects one)
    prompt_adapters: dict = field(default_factory=dict)
    # --lora-modules: model name -> LoRARequest (likewise)
    lora_modules: dict = field(default_factory=dict)
    # engine.inputs.LoRATokenizers over ``tokenizer``: an adapter's own tokenizer, if any
    lora_tokenizers: Any = None

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


class OpenAIServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx
        self.engine = ctx.engine
        self.tokenizer = ctx.tokenizer
        self._adapter_views: dict[int, "OpenAIServing"] = {}

    def for_adapter(self, adapter) -> "OpenAIServing":
        """This serving object as a request of ``adapter`` sees it: a LoRA adapter that
        ships its own tokenizer (added tokens; vLLM 0.6.3's ``get_lora_tokenizer``) gets a
        view that tokenizes, renders templates and decodes with it (made once per adapter,
        with its own caches); otherwise ``self``."""
        from pagedllm.core.adapters import LoRARequest
        if not isinstance(adapter, LoRARequest) or self.ctx.lora_tokenizers is None:
            return self
        tokenizer = self.ctx.lora_tokenizers.get(adapter)
        if tokenizer is self.tokenizer:
            return self
        view = self._adapter_views.get(adapter.lora_int_id)
        if view is None:
            view = copy.copy(self)
            for cached in ("_chars_per_token", "_template_sandbox"):
                view.__dict__.pop(cached, None)
            view.tokenizer, view._adapter_views = tokenizer, {}
            if len(self._adapter_views) >= LoRATokenizers.MAX_CACHED:  # oldest view first
                del self._adapter_views[next(iter(self._adapter_views))]
            self._adapter_views[adapter.lora_int_id] = view
        return view

    # ---- checks --------------------------------------------------------------------------
    def check_model(self, model: Optional[str]):
        """404 for an unknown model; the prompt adapter or LoRA a model name selects, else
        None."""
        if model is None or model in self.ctx.served_model_names:
            return None
        if model in self.ctx.prompt_adapters:
            return self.ctx.prompt_adapters[model]
        if model in self.ctx.lora_modules:
            return self.ctx.lora_modules[model]
        raise OpenAIError(f"The model `{model}` does not exist.", "NotFoundError",
                          HTTPStatus.NOT_FOUND)

    @staticmethod
    def num_virtual_tokens(adapter) -> int:
        """Placeholder tokens the engine puts before a prompt for its prompt adapter."""
        return getattr(adapter, "prompt_adapter_num_virtual_tokens", 0)  # LoRA: none

    def check_logprobs(self, field: str, value: Optional[int]) -> None:
        if value is not None and value > self.ctx.max_logprobs:
            raise OpenAIError(f"{field}={value} is more than the server allows "
                              f"(--max-logprobs {self.ctx.max_logprobs}).")

    def check_length(self, num_prompt_tokens: int, max_tokens: Optional[int]) -> None:
        """vLLM's context check: the prompt plus the requested completion must fit."""
        limit = self.ctx.max_model_len
        if max_tokens is None:
            if num_prompt_tokens >= limit:
                raise OpenAIError(
                    f"This model's maximum context length is {limit} tokens. However, you "
                    f"requested {num_prompt_tokens} tokens in the messages, Please reduce the "
                    "length of the messages.")
        elif num_prompt_tokens + max_tokens > limit:
            raise OpenAIError(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
                f"messages, {max_tokens} in the completion). Please reduce the length of the "
                "messages or completion.")

    def require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise OpenAIError("this endpoint needs a tokenizer; the server runs with "
                              "--skip-tokenizer-init, so pass token ids")
        return self.tokenizer

    # ---- prompts -------------------------------------------------------------------------
    async def tokenize_async(self, text: str, add_special_tokens: bool,
                             truncate: Optional[int] = None) -> list[int]:
        """``tokenize`` off the event loop for long text (Hugging Face tokenizers release
        the GIL): a big prompt must not hold ``/health`` and every stream. Short text is
        tokenized inline (the thread hop would cost more). The tokenize thread has its own
        tokenizer instance: a fast tokenizer is not safe to use from two threads at once."""
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return self.tokenize(text, add_special_tokens, truncate)
        if truncate is None:  # cheap, and refuses megabytes before the thread hop
            self._check_text_can_fit(text)
        tokenizer = _background_tokenizer(self.require_tokenizer())
        return await asyncio.get_running_loop().run_in_executor(
            _TOKENIZE_POOL, self.tokenize, text, add_special_tokens, truncate, tokenizer)

    def tokenize(self, text: str, add_special_tokens: bool,
                 truncate: Optional[int] = None, tokenizer: Any = None) -> list[int]:
        """The ids of user text; text the tokenizer cannot take (a lone UTF-16 surrogate, or
        anything else it raises on) is the caller's input, so a 400, never a 500.
        ``tokenizer``: the tokenize thread's own instance (``tokenize_async``)."""
        tokenizer = self.require_tokenizer() if tokenizer is None else tokenizer
        if truncate is None:  # truncation legitimately takes text of any length
            self._check_text_can_fit(text)
        check_valid_text(text)
        try:
            ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - Rust panics (pyo3) are BaseException
            raise OpenAIError(f"The prompt could not be tokenized: {type(exc).__name__}: "
                              f"{exc}") from exc
        return ids[-truncate:] if truncate else ids

    def _max_chars_per_token(self) -> int:
        """The longest vocabulary entry, in characters: no token stands for more text than
        its entry spells (byte-level BPE entries spell one character per byte, SentencePiece
        ones their text, added tokens their content). Computed once, on first use."""
        cached = getattr(self, "_chars_per_token", None)
        if cached is None:
            vocab = self.require_tokenizer().get_vocab()
            cached = self._chars_per_token = max(map(len, vocab), default=1) or 1
        return cached

    def _check_text_can_fit(self, text: str) -> None:
        """Refuse, before tokenizing it, text that needs more than ``max_model_len`` tokens
        whatever the tokenizer does: tokenizing megabytes blocks the server for seconds.
        (Sound for tokenizers that keep every character; one whose normalizer deletes
        characters, or WordPiece's whole-word [UNK], could fit longer text.)"""
        limit = self.ctx.max_model_len * self._max_chars_per_token()
        if len(text) > limit:
            raise OpenAIError(
                f"This model's maximum context length is {self.ctx.max_model_len} tokens, and "
                f"a token covers at most {self._max_chars_per_token()} characters, so a prompt "
                f"of {len(text)} characters cannot fit (the most is {limit}). Please reduce "
                "the length of the prompt.")

    def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids)

    def token_text(self, token_id: int, logprob: Optional[Logprob] = None) -> str:
        if self.ctx.return_tokens_as_token_ids:
            return f"token_id:{token_id}"
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.decode([token_id])

    # ---- engine calls --------------------------------------------------------------------
    async def add(self, request_id: str, prompt: dict, params, priority: int,
                  prompt_adapter=None, raw_request=None) -> RequestStream:
        headers = trace_headers(raw_request.headers) if raw_request is not None else None
        from pagedllm.core.adapters import LoRARequest
        lora = prompt_adapter if isinstance(prompt_adapter, LoRARequest) else None
        try:
            return await self.engine.add_request(
                request_id, prompt, params, priority=priority,
                prompt_adapter_request=None if lora is not None else prompt_adapter,
                trace_headers=headers, lora_request=lora)
        except ValueError as exc:
            raise OpenAIError(str(exc)) from exc

    async def beam_search(self, request, prompt_ids: list[int], adapter, request_id: str
                          ) -> list[tuple[str, list[int], str]]:
        """``use_beam_search``: ``pagedllm.beam_search.beam_search_async`` over the engine
        (what ``LLM.beam_search`` runs offline), for one prompt. The ``n`` best sequences as
        (text, generated token ids, finish_reason: "stop" at EOS, else "length")."""
        from pagedllm.beam_search import beam_search_async, check_beam_width
        from pagedllm.core.adapters import LoRARequest
        eos_id = self.require_tokenizer().eos_token_id
        virtual = self.num_virtual_tokens(adapter)
        try:
            params = request.to_beam_search_params(
                self.ctx.max_model_len - len(prompt_ids) - virtual)
            check_beam_width(params, self.ctx.max_logprobs)
        except ValueError as exc:
            raise OpenAIError(str(exc)) from exc
        key = "lora_request" if isinstance(adapter, LoRARequest) else "prompt_adapter_request"
        try:
            found = await beam_search_async(self.engine, prompt_ids, params, eos_id, request_id,
                                            **({key: adapter} if adapter is not None else {}))
        except ValueError as exc:  # the engine refused the prompt (as ``add`` maps it): a 400
            raise OpenAIError(str(exc)) from exc
        answers = []
        for seq in found.sequences[:request.n]:
            generated = seq.tokens[len(prompt_ids):]
            stopped = not params.ignore_eos and generated[-1:] == [eos_id]
            text = self.tokenizer.decode(generated,
                                         skip_special_tokens=request.skip_special_tokens)
            answers.append((text, generated, "stop" if stopped else "length"))
        return answers

    # ---- logprobs ------------------------------------------------------------------------
    def _top(self, step: dict[int, Logprob], num: int) -> list[tuple[int, Logprob]]:
        ranked = sorted(step.items(), key=lambda kv: (kv[1].rank is None, kv[1].rank or 0))
        return ranked[:num]

    def completion_logprobs(self, token_ids: list[int], logprobs: list, num_top: int,
                            text_offset: int) -> CompletionLogProbs:
        """OpenAI completions shape; ``logprobs[i]`` may be None (the first prompt token)."""
        out = CompletionLogProbs()
        for token_id, step in zip(token_ids, logprobs):
            token = self.token_text(token_id, step.get(token_id) if step else None)
            out.tokens.append(token)
            out.text_offset.append(text_offset)
            text_offset += len(token)
            if step is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            sampled = step.get(token_id)
            out.token_logprobs.append(_clamp(sampled.logprob) if sampled else None)
            top = {self.token_text(tid, lp): _clamp(lp.logprob)
                   for tid, lp in self._top(step, num_top)}
            if sampled is not None:
                top.setdefault(token, _clamp(sampled.logprob))
            out.top_logprobs.append(top)
        return out

    def chat_logprobs(self, token_ids: list[int], logprobs: list,
                      num_top: int) -> ChatCompletionLogProbs:
        content = []
        for token_id, step in zip(token_ids, logprobs):
            sampled = step.get(token_id) if step else None
            token = self.token_text(token_id, sampled)
            top = [ChatCompletionLogProb(token=(t := self.token_text(tid, lp)),
                                         logprob=_clamp(lp.logprob),
                                         bytes=list(t.encode("utf-8", "replace")))
                   for tid, lp in self._top(step or {}, num_top)]
            content.append(ChatCompletionLogProbsContent(
                token=token, logprob=_clamp(sampled.logprob) if sampled else _MIN_LOGPROB,
                bytes=list(token.encode("utf-8", "replace")), top_logprobs=top))
        return ChatCompletionLogProbs(content=content)


_INLINE_TOKENIZE_CHARS = 4096  # longer text is tokenized on the tokenize thread
_TOKENIZE_POOL = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
_BACKGROUND_TOKENIZERS: dict[int, Any] = {}


def _background_tokenizer(tokenizer: Any) -> Any:
    """A copy of ``tokenizer`` used only on the tokenize thread (made once, on the loop)."""
    copy_ = _BACKGROUND_TOKENIZERS.get(id(tokenizer))
    if copy_ is None:
        copy_ = _BACKGROUND_TOKENIZERS[id(tokenizer)] = copy.deepcopy(tokenizer)
    return copy_


def _clamp(logprob: float) -> float:
    return _MIN_LOGPROB if math.isinf(logprob) or math.isnan(logprob) else \
        max(logprob, _MIN_LOGPROB)


def tail_logprobs(logprobs: Optional[list], num_tokens: int) -> Optional[list]:
    """The logprobs of the last ``num_tokens`` tokens (DELTA outputs may carry more)."""
    if logprobs is None:
        return None
    return list(logprobs[-num_tokens:]) if num_tokens else []


async def merge_streams(streams: list[RequestStream]
                        ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as ``(prompt_index, output)`` in arrival order."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    merged: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(idx: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                merged.put_nowait((idx, output))
        except Exception as exc:  # noqa: BLE001 - re-raised in the consumer
            merged.put_nowait((idx, exc))
        merged.put_nowait((idx, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            idx, item = await merged.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield idx, item
    finally:
        for task in tasks:
            task.cancel()


def abort_unfinished(engine: AsyncLLMEngine, streams: list[RequestStream]) -> None:
    for stream in streams:
        if not stream.finished:
            engine.abort(stream.request_id)


class ClientDisconnected(Exception):
    """The HTTP client went away before its (non-streaming) response was ready."""


async def until_disconnected(raw_request, work: Awaitable) -> Any:
    """Await ``work``; if the HTTP client disconnects first, cancel it (its ``finally`` aborts
    the engine requests) and raise ``ClientDisconnected``. Without an HTTP request (the
    batch runner) there is nobody to watch: just await ``work``."""
    if raw_request is None:
        return await work
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await raw_request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # disconnected, or this handler itself was cancelled
            task.cancel()
    if task in done:
        return task.result()
    raise ClientDisconnected()
