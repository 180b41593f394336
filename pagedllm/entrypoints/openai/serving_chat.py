"""POST /v1/chat/completions: apply the chat template, generate, answer as OpenAI's chat API.

Streaming sends, per choice, a first chunk with the role (and empty content), then content
deltas; the finishing delta carries ``finish_reason``; with ``stream_options.include_usage`` a
last chunk with no choices carries the usage; then ``data: [DONE]``.

Tools: ``tools`` reach the chat template. A named ``tool_choice`` or "required" generates under
a JSON schema (``ChatCompletionRequest.tool_call_schema``, the guided-decoding path) and the
text becomes ``tool_calls``; "auto" (needs --enable-auto-tool-choice and --tool-call-parser)
generates freely and the configured parser finds the calls, finish_reason "tool_calls". One
``ToolParser`` per choice turns text into message fields, whole or as stream deltas.
"""
from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator, Optional

from pagedllm.engine.async_engine import RequestStream
from pagedllm.entrypoints.openai.protocol import (ChatCompletionRequest,
                                                  ChatCompletionResponse,
                                                  ChatCompletionResponseChoice,
                                                  ChatCompletionResponseStreamChoice,
                                                  ChatCompletionStreamResponse, ChatMessage,
                                                  DeltaMessage, UsageInfo, random_uuid)
from pagedllm.entrypoints.openai.sandbox import TemplateError, TemplateSandbox
from pagedllm.entrypoints.openai.serving_completion import prompt_logprobs_json
from pagedllm.entrypoints.openai.serving_engine import (OpenAIError, OpenAIServing,
                                                        abort_unfinished, build_params, sse,
                                                        sse_error, tail_logprobs,
                                                        until_disconnected)
from pagedllm.entrypoints.openai.tool_parsers import (TOOL_PARSERS, NamedToolParser,
                                                      RequiredToolParser, ToolParser)
from pagedllm.outputs import CompletionOutput, RequestOutput


def parse_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with list-of-parts content flattened to text (only text parts are supported)."""
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message.get("role"), str):
            raise OpenAIError(f"messages[{i}].role is required and must be a string")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise OpenAIError(f"messages[{i}].content: part type {kind!r} is not "
                                      "supported (only 'text'; multimodal models are not "
                                      "built yet)")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is None:
            # vLLM renders a missing/null content (an assistant turn that only calls tools) as
            # "": templates that concatenate message['content'] would fail on None
            content = ""
        elif not isinstance(content, str):
            raise OpenAIError(f"messages[{i}].content must be a string or a list of parts")
        parsed.append({**message, "content": content})
        if message["role"] == "assistant" and isinstance(message.get("tool_calls"), list):
            parsed[-1]["tool_calls"] = _parse_tool_calls(message["tool_calls"], i)
    return parsed


def _parse_tool_calls(tool_calls: list, i: int) -> list[dict]:
    """An assistant message's tool calls with ``arguments`` decoded: chat templates expect a
    dict there, while OpenAI clients send JSON text."""
    parsed = []
    for j, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise OpenAIError(f"messages[{i}].tool_calls[{j}].function is required")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError as exc:
                raise OpenAIError(f"messages[{i}].tool_calls[{j}].function.arguments must be "
                                  f"JSON text: {exc}") from exc
        parsed.append({**call, "function": {**function, "arguments": arguments}})
    return parsed


class OpenAIServingChat(OpenAIServing):
    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool,
                            continue_final_message: bool = False,
                            chat_template: Optional[str] = None,
                            chat_template_kwargs: Optional[dict] = None,
                            documents: Optional[list] = None,
                            tools: Optional[list[dict]] = None) -> str:
        """The prompt text, rendered on the caller's thread (``/tokenize``); a request's own
        template is rendered in the bounded sandbox (``sandbox.py``), so it holds the caller
        for at most the template budget. Async callers use ``render_chat_template``."""
        args = self._template_args(messages, add_generation_prompt, continue_final_message,
                                   chat_template, chat_template_kwargs, documents, tools)
        return _template_errors(lambda: self._sandbox().render_sync(*args))

    async def render_chat_template(self, messages: list[dict], *, add_generation_prompt: bool,
                                   continue_final_message: bool = False,
                                   chat_template: Optional[str] = None,
                                   chat_template_kwargs: Optional[dict] = None,
                                   documents: Optional[list] = None,
                                   tools: Optional[list[dict]] = None) -> str:
        """``apply_chat_template`` off the event loop: a template is a program, and rendering
        one on the loop froze ``/health`` and every stream (issue 24 finding 3)."""
        args = self._template_args(messages, add_generation_prompt, continue_final_message,
                                   chat_template, chat_template_kwargs, documents, tools)
        try:
            return await self._sandbox().render(*args)
        except Exception as exc:  # noqa: BLE001 - mapped as in apply_chat_template
            return _template_errors(lambda err=exc: _reraise(err))  # bound: `exc` is unset after

    def _template_args(self, messages, add_generation_prompt, continue_final_message,
                       chat_template, chat_template_kwargs, documents, tools) -> tuple:
        """(messages, template, trusted, kwargs) for ``TemplateSandbox``; trusted: not the
        request's own template."""
        self.require_tokenizer()
        kwargs = dict(chat_template_kwargs or {})
        if documents is not None:
            kwargs["documents"] = documents
        if tools is not None:
            kwargs["tools"] = tools
        if continue_final_message:
            kwargs["continue_final_message"] = True
        kwargs["add_generation_prompt"] = add_generation_prompt
        return (parse_messages(messages), chat_template or self.ctx.chat_template,
                chat_template is None, kwargs)

    def _sandbox(self) -> TemplateSandbox:
        sandbox = getattr(self, "_template_sandbox", None)
        if sandbox is None:
            sandbox = self._template_sandbox = TemplateSandbox(self.require_tokenizer())
        return sandbox

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request):
        """A ``ChatCompletionResponse``, or an async iterator of SSE strings when streaming;
        with a LoRA adapter's own tokenizer when it ships one (``for_adapter``)."""
        adapter = self.check_model(request.model)
        return await self.for_adapter(adapter)._create(request, raw_request, adapter)

    async def _create(self, request: ChatCompletionRequest, raw_request, adapter):
        virtual = self.num_virtual_tokens(adapter)
        self.check_logprobs("top_logprobs", request.num_logprobs)
        self.check_logprobs("prompt_logprobs", request.prompt_logprobs)
        request = self._check_tool_choice(request)
        prompt = await self.render_chat_template(
            request.messages, add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            chat_template=request.chat_template,
            chat_template_kwargs=request.chat_template_kwargs, documents=request.documents,
            tools=None if request.tools is None else [t.model_dump() for t in request.tools])
        ids = await self.tokenize_async(prompt, request.add_special_tokens,
                                        request.truncate_prompt_tokens)
        self.check_length(len(ids) + virtual, request.requested_max_tokens)
        request_id, created = f"chat-{random_uuid()}", int(time.time())
        if request.use_beam_search:
            return await until_disconnected(raw_request, self._beam_search_response(
                request, request_id, created, ids, adapter))
        params = build_params(request, self.ctx.max_model_len - len(ids) - virtual)
        stream = await self.add(request_id, {"prompt": prompt, "prompt_token_ids": ids},
                                params, request.priority, adapter, raw_request)
        if request.stream:
            return self._stream(request, request_id, created, stream)
        return await until_disconnected(raw_request,
                                        self._collect(request, request_id, created, stream))

    def _check_tool_choice(self, request: ChatCompletionRequest) -> ChatCompletionRequest:
        """400 for "auto" without a configured parser; a parser whose markers are special
        tokens gets them kept in the output text."""
        if not request.tools or request.tool_choice != "auto":
            return request
        if not (self.ctx.enable_auto_tools and self.ctx.tool_parser):
            raise OpenAIError('"auto" tool choice requires --enable-auto-tool-choice and '
                              "--tool-call-parser to be set")
        if TOOL_PARSERS[self.ctx.tool_parser].needs_special_tokens:
            return request.model_copy(update={"skip_special_tokens": False})
        return request

    def _tool_parser(self, request: ChatCompletionRequest) -> Optional[ToolParser]:
        """A fresh parser for one choice, None when the output is plain content."""
        if not request.tools or request.tool_choice in (None, "none"):
            return None
        max_calls = 1 if request.parallel_tool_calls is False else None
        if request.named_tool is not None:
            return NamedToolParser(request.named_tool.function.name, max_calls)
        if request.tool_choice == "required":
            return RequiredToolParser(max_calls)
        return TOOL_PARSERS[self.ctx.tool_parser](max_calls)

    def _role(self, request: ChatCompletionRequest) -> str:
        if request.add_generation_prompt:
            return self.ctx.response_role
        return request.messages[-1].get("role", self.ctx.response_role)

    def _echo_text(self, request: ChatCompletionRequest, role: str) -> str:
        last = request.messages[-1]
        if request.echo and last.get("role") == role and last.get("content"):
            return parse_messages([last])[0]["content"] or ""
        return ""

    def _logprobs(self, request: ChatCompletionRequest, completion: CompletionOutput,
                  token_ids: list[int]):
        logprobs = tail_logprobs(completion.logprobs, len(token_ids))
        if not request.logprobs or logprobs is None:
            return None
        return self.chat_logprobs(token_ids, logprobs, request.top_logprobs or 0)

    # ---- full response -------------------------------------------------------------------
    async def _collect(self, request: ChatCompletionRequest, request_id: str, created: int,
                       stream: RequestStream) -> dict:
        final: Optional[RequestOutput] = None
        try:
            async for output in stream:
                final = output
        finally:
            abort_unfinished(self.engine, [stream])
        role = self._role(request)
        echo = self._echo_text(request, role)
        choices = []
        for completion in final.outputs:
            message, finish_reason = self._message(request, role, echo, completion)
            choices.append(ChatCompletionResponseChoice(
                index=completion.index, message=message,
                logprobs=self._logprobs(request, completion, list(completion.token_ids)),
                finish_reason=finish_reason, stop_reason=completion.stop_reason))
        choices.sort(key=lambda c: c.index)
        num_prompt = len(final.prompt_token_ids)
        num_gen = sum(len(c.token_ids) for c in final.outputs)
        usage = UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_gen,
                          total_tokens=num_prompt + num_gen)
        return ChatCompletionResponse(id=request_id, created=created, model=request.model,
                                      choices=choices, usage=usage,
                                      prompt_logprobs=prompt_logprobs_json(final)).model_dump()

    async def _beam_search_response(self, request: ChatCompletionRequest, request_id: str,
                                    created: int, prompt_ids: list[int], adapter) -> dict:
        """``use_beam_search``: the ``n`` best sequences as choices, best first (tools are
        not parsed from them: a beam is plain content)."""
        answers = await self.beam_search(request, prompt_ids, adapter, request_id)
        role = self._role(request)
        choices = [ChatCompletionResponseChoice(index=i, message=ChatMessage(role=role,
                                                                             content=text),
                                                finish_reason=finish_reason)
                   for i, (text, _, finish_reason) in enumerate(answers)]
        num_gen = sum(len(ids) for _, ids, _ in answers)
        usage = UsageInfo(prompt_tokens=len(prompt_ids), completion_tokens=num_gen,
                          total_tokens=len(prompt_ids) + num_gen)
        return ChatCompletionResponse(id=request_id, created=created, model=request.model,
                                      choices=choices, usage=usage).model_dump()

    def _message(self, request: ChatCompletionRequest, role: str, echo: str,
                 completion: CompletionOutput) -> tuple[ChatMessage, Optional[str]]:
        parser = self._tool_parser(request)
        info = parser.extract_tool_calls(completion.text) if parser else None
        if info is None or not info.tools_called:
            return ChatMessage(role=role, content=echo + completion.text), \
                completion.finish_reason
        content = echo + info.content if info.content else (echo or None)
        if request.named_tool is not None and content is None:
            content = ""  # vLLM answers a named tool call with content "", not null
        return (ChatMessage(role=role, content=content, tool_calls=info.tool_calls),
                _finish_reason(parser, True, completion.finish_reason))

    # ---- streaming -----------------------------------------------------------------------
    def _chunk(self, request_id: str, created: int, model: str,
               choices: list[ChatCompletionResponseStreamChoice],
               usage: Optional[UsageInfo] = None) -> str:
        chunk = ChatCompletionStreamResponse(id=request_id, object="chat.completion.chunk",
                                             created=created, model=model, choices=choices)
        if usage is not None:
            chunk.usage = usage
        return sse(chunk.model_dump_json(exclude_unset=True))

    async def _stream(self, request: ChatCompletionRequest, request_id: str, created: int,
                      stream: RequestStream) -> AsyncIterator[str]:
        opts = request.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = include_usage and bool(opts.continuous_usage_stats)
        role = self._role(request)
        echo = self._echo_text(request, role)
        num_prompt, num_gen = stream.stats.num_prompt_tokens, [0] * request.n

        def usage() -> UsageInfo:
            return UsageInfo(prompt_tokens=num_prompt, completion_tokens=sum(num_gen),
                             total_tokens=num_prompt + sum(num_gen))

        try:
            for i in range(request.n):
                first = [ChatCompletionResponseStreamChoice(
                    index=i, delta=DeltaMessage(role=role, content=""), logprobs=None,
                    finish_reason=None)]
                yield self._chunk(request_id, created, request.model, first,
                                  usage() if continuous else None)
                if echo:
                    yield self._chunk(request_id, created, request.model, [
                        ChatCompletionResponseStreamChoice(
                            index=i, delta=DeltaMessage(content=echo), logprobs=None,
                            finish_reason=None)], usage() if continuous else None)
            finished: set[int] = set()
            parsers = [self._tool_parser(request) for _ in range(request.n)]
            texts = [""] * request.n
            async for output in stream:
                for completion in output.outputs:
                    if completion.index in finished:
                        continue  # with n > 1 a finished choice may be repeated later
                    token_ids = list(completion.token_ids)
                    num_gen[completion.index] += len(token_ids)
                    parser, previous = parsers[completion.index], texts[completion.index]
                    texts[completion.index] = previous + completion.text
                    delta = _delta(parser, previous, texts[completion.index], completion)
                    if delta is None:
                        continue
                    choice = ChatCompletionResponseStreamChoice(index=completion.index,
                                                                delta=delta)
                    logprobs = self._logprobs(request, completion, token_ids)
                    if logprobs is not None:
                        choice.logprobs = logprobs
                    if completion.finish_reason is not None:
                        finished.add(completion.index)
                        choice.finish_reason = _finish_reason(
                            parser, bool(parser and parser.tools_called), completion.finish_reason)
                        choice.stop_reason = completion.stop_reason
                    yield self._chunk(request_id, created, request.model, [choice],
                                      usage() if continuous else None)
            if include_usage:
                yield self._chunk(request_id, created, request.model, [], usage())
        except OpenAIError as exc:
            yield sse_error(exc.message, exc.err_type, exc.status)
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
            yield sse_error(str(exc))
        finally:
            abort_unfinished(self.engine, [stream])
        yield "data: [DONE]\n\n"



def _template_errors(render):
    """``render()``; a failing template is the caller's input: a 400 (OpenAIError)."""
    try:
        return render()
    except OpenAIError:
        raise
    except TemplateError as exc:
        raise OpenAIError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - jinja / missing template: the caller's input
        raise OpenAIError(f"could not apply the chat template: {exc}") from exc


def _reraise(exc: BaseException):
    raise exc


def _delta(parser: Optional[ToolParser], previous: str, text: str,
           completion: CompletionOutput) -> Optional[DeltaMessage]:
    """The delta of one streamed output (None: no chunk unless the choice finished)."""
    is_finished = completion.finish_reason is not None
    if parser is None:
        if not completion.text and not is_finished:
            return None
        return DeltaMessage(content=completion.text)
    if is_finished:
        return parser.finish_streaming(text) or DeltaMessage()
    if not completion.text:
        return None
    return parser.extract_tool_calls_streaming(previous, text, completion.text)


def _finish_reason(parser: Optional[ToolParser], tools_called: bool,
                   finish_reason: Optional[str]) -> Optional[str]:
    """The engine's reason, or "tool_calls" where the model chose to call (auto) and stopped
    by itself; a forced call or a cut-off output keeps the engine's reason."""
    if parser is not None and parser.reports_tool_calls_finish and tools_called \
            and finish_reason == "stop":
        return "tool_calls"
    return finish_reason
