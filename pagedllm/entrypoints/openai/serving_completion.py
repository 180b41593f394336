"""POST /v1/completions: one engine request per prompt, ``n`` choices each, streamed as SSE
(``DELTA`` outputs) or collected (``FINAL_ONLY``). Choice ``index`` = prompt_index * n +
completion index, as vLLM numbers them.
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Optional

from pagedllm.engine.async_engine import RequestStream
from pagedllm.entrypoints.openai.protocol import (CompletionLogProbs, CompletionRequest,
                                                  CompletionResponse,
                                                  CompletionResponseChoice,
                                                  CompletionResponseStreamChoice,
                                                  CompletionStreamResponse, UsageInfo,
                                                  random_uuid)
from pagedllm.entrypoints.openai.serving_engine import (OpenAIError, OpenAIServing,
                                                        abort_unfinished, build_params,
                                                        merge_streams, sse, sse_error,
                                                        tail_logprobs, until_disconnected)
from pagedllm.outputs import CompletionOutput, RequestOutput

_Prompt = tuple[Optional[str], list[int]]


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request):
        """A ``CompletionResponse``, or an async iterator of SSE strings when streaming;
        with a LoRA adapter's own tokenizer when it ships one (``for_adapter``)."""
        adapter = self.check_model(request.model)
        return await self.for_adapter(adapter)._create(request, raw_request, adapter)

    async def _create(self, request: CompletionRequest, raw_request, adapter):
        virtual = self.num_virtual_tokens(adapter)
        if request.suffix is not None:
            raise OpenAIError("suffix is not currently supported")
        self.check_logprobs("logprobs", request.logprobs)
        self.check_logprobs("prompt_logprobs", request.prompt_logprobs)
        prompts = await self._prompts(request)
        request_id, created = f"cmpl-{random_uuid()}", int(time.time())
        if request.use_beam_search:
            return await until_disconnected(raw_request, self._beam_search_response(
                request, request_id, created, prompts, adapter))
        streams: list[RequestStream] = []
        try:
            for i, (text, ids) in enumerate(prompts):
                self.check_length(len(ids) + virtual, request.max_tokens)
                params = build_params(request, self.ctx.max_model_len - len(ids) - virtual)
                streams.append(await self.add(
                    f"{request_id}-{i}", {"prompt": text, "prompt_token_ids": ids}, params,
                    request.priority, adapter, raw_request))
        except BaseException:
            abort_unfinished(self.engine, streams)
            raise
        if request.stream:
            return self._stream(request, request_id, created, prompts, streams)
        return await until_disconnected(
            raw_request, self._collect(request, request_id, created, prompts, streams))

    async def _prompts(self, request: CompletionRequest) -> list[_Prompt]:
        """(text or None, token ids) per prompt: text, list of texts, ids or list of ids.
        Long text is tokenized off the event loop (``tokenize_async``): a big prompt must not
        hold ``/health`` and the other streams."""
        prompt = request.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise OpenAIError("prompt must not be empty")
        if all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        prompts = []
        for item in prompt:
            if isinstance(item, str):
                ids = await self.tokenize_async(item, request.add_special_tokens,
                                                request.truncate_prompt_tokens)
                prompts.append((item, ids))
            else:
                if not item:
                    raise OpenAIError("prompt must not contain an empty list of token ids")
                ids = list(item)[-request.truncate_prompt_tokens:] \
                    if request.truncate_prompt_tokens else list(item)
                prompts.append((None, ids))
        return prompts

    def completion_logprobs(self, token_ids: list[int], logprobs: list, num_top: int,
                            text_offset: int) -> CompletionLogProbs:
        """As the shared formatter, with each ``top_logprobs`` entry starting with the
        chosen token (vLLM's order: the sampled or prompt token, then the top ranks)."""
        out = super().completion_logprobs(token_ids, logprobs, num_top, text_offset)
        out.top_logprobs = [_chosen_first(top, token)
                            for top, token in zip(out.top_logprobs, out.tokens)]
        return out

    def _prompt_text(self, prompt: _Prompt) -> str:
        text, ids = prompt
        return text if text is not None else self.decode(ids)

    # ---- full response -------------------------------------------------------------------
    async def _collect(self, request: CompletionRequest, request_id: str, created: int,
                       prompts: list[_Prompt], streams: list[RequestStream]) -> dict:
        finals: list[Optional[RequestOutput]] = [None] * len(streams)
        try:
            async for idx, output in merge_streams(streams):
                finals[idx] = output
        finally:
            abort_unfinished(self.engine, streams)
        choices, num_prompt, num_gen = [], 0, 0
        for idx, output in enumerate(finals):
            num_prompt += len(output.prompt_token_ids)
            for completion in output.outputs:
                num_gen += len(completion.token_ids)
                choices.append(self._choice(request, prompts[idx], output, completion,
                                            idx * request.n + completion.index))
        choices.sort(key=lambda c: c.index)
        usage = UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_gen,
                          total_tokens=num_prompt + num_gen)
        return CompletionResponse(id=request_id, created=created, model=request.model,
                                  choices=choices, usage=usage).model_dump()

    def _choice(self, request: CompletionRequest, prompt: _Prompt, output: RequestOutput,
                completion: CompletionOutput, index: int) -> CompletionResponseChoice:
        text, token_ids = completion.text, list(completion.token_ids)
        logprobs = completion.logprobs
        if request.echo_only:  # prompt scoring: the one step the engine ran is not answered
            text, token_ids, logprobs = "", [], [] if logprobs is not None else None
        prefix = ""
        if request.echo:
            prefix = self._prompt_text(prompt)
            token_ids = list(output.prompt_token_ids) + token_ids
            if logprobs is not None:
                logprobs = list(output.prompt_logprobs or
                                [None] * len(output.prompt_token_ids)) + list(logprobs)
        lp = None
        if request.logprobs is not None and logprobs is not None:
            lp = self.completion_logprobs(token_ids, logprobs, request.logprobs, 0)
        # vLLM answers the engine's prompt logprobs whenever it computed them (asked for,
        # prompt_logprobs=0 included, or implied by echo with logprobs)
        return CompletionResponseChoice(
            index=index, text=prefix + text, logprobs=lp,
            finish_reason=completion.finish_reason, stop_reason=completion.stop_reason,
            prompt_logprobs=prompt_logprobs_json(output))

    async def _beam_search_response(self, request: CompletionRequest, request_id: str,
                                    created: int, prompts: list[_Prompt], adapter) -> dict:
        """``use_beam_search``: every prompt searched at once; choice ``index`` = prompt
        index * n + rank (best first), as vLLM numbers them."""
        virtual = self.num_virtual_tokens(adapter)
        for _, ids in prompts:
            self.check_length(len(ids) + virtual, request.max_tokens)
        found = await asyncio.gather(*(
            self.beam_search(request, ids, adapter, f"{request_id}-{i}")
            for i, (_, ids) in enumerate(prompts)))
        choices = [CompletionResponseChoice(index=i * request.n + rank, text=text,
                                            finish_reason=finish_reason)
                   for i, answers in enumerate(found)
                   for rank, (text, _, finish_reason) in enumerate(answers)]
        num_prompt = sum(len(ids) for _, ids in prompts)
        num_gen = sum(len(ids) for answers in found for _, ids, _ in answers)
        usage = UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_gen,
                          total_tokens=num_prompt + num_gen)
        return CompletionResponse(id=request_id, created=created, model=request.model,
                                  choices=choices, usage=usage).model_dump()

    # ---- streaming -----------------------------------------------------------------------
    async def _stream(self, request: CompletionRequest, request_id: str, created: int,
                      prompts: list[_Prompt], streams: list[RequestStream]
                      ) -> AsyncIterator[str]:
        state = _StreamState(request.n * len(prompts))
        opts = request.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = include_usage and bool(opts.continuous_usage_stats)
        try:
            async for idx, output in merge_streams(streams):
                state.prompt_tokens[idx] = len(output.prompt_token_ids)
                for completion in output.outputs:
                    index = idx * request.n + completion.index
                    choice = self._stream_choice(request, prompts[idx], output, completion,
                                                 index, state)
                    if choice is None:
                        continue
                    chunk = CompletionStreamResponse(id=request_id, created=created,
                                                     model=request.model, choices=[choice])
                    if continuous:
                        chunk.usage = state.usage()
                    yield sse(chunk.model_dump_json())
            if include_usage:
                chunk = CompletionStreamResponse(id=request_id, created=created,
                                                 model=request.model, choices=[],
                                                 usage=state.usage())
                yield sse(chunk.model_dump_json())
        except OpenAIError as exc:
            yield sse_error(exc.message, exc.err_type, exc.status)
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
            yield sse_error(str(exc))
        finally:
            abort_unfinished(self.engine, streams)
        yield "data: [DONE]\n\n"

    def _stream_choice(self, request: CompletionRequest, prompt: _Prompt,
                       output: RequestOutput, completion: CompletionOutput, index: int,
                       state: "_StreamState") -> Optional[CompletionResponseStreamChoice]:
        if index in state.finished:
            return None  # with n > 1 a finished choice may be repeated in later outputs
        if completion.finish_reason is not None:
            state.finished.add(index)
        text, token_ids = completion.text, list(completion.token_ids)
        logprobs = tail_logprobs(completion.logprobs, len(token_ids))
        state.completion_tokens[index] += len(token_ids)
        if request.echo_only:  # prompt scoring: only the prompt is streamed back
            text, token_ids, logprobs = "", [], [] if logprobs is not None else None
        if request.echo and index not in state.echoed:
            state.echoed.add(index)
            text = self._prompt_text(prompt) + text
            token_ids = list(output.prompt_token_ids) + token_ids
            if logprobs is not None:
                logprobs = list(output.prompt_logprobs or
                                [None] * len(output.prompt_token_ids)) + logprobs
        if not text and not token_ids and completion.finish_reason is None:
            return None
        lp = None
        if request.logprobs is not None and logprobs is not None:
            lp = self.completion_logprobs(token_ids, logprobs, request.logprobs,
                                          state.text_offset[index])
        state.text_offset[index] += len(text)
        return CompletionResponseStreamChoice(
            index=index, text=text, logprobs=lp, finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason)


def _chosen_first(top: Optional[dict[str, float]], token: str) -> Optional[dict[str, float]]:
    if top is None or token not in top:
        return top
    return {token: top[token], **{k: v for k, v in top.items() if k != token}}


class _StreamState:
    def __init__(self, num_choices: int) -> None:
        self.completion_tokens = [0] * num_choices
        self.text_offset = [0] * num_choices
        self.echoed: set[int] = set()
        self.finished: set[int] = set()
        self.prompt_tokens: dict[int, int] = {}

    def usage(self) -> UsageInfo:
        num_prompt, num_gen = sum(self.prompt_tokens.values()), sum(self.completion_tokens)
        return UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_gen,
                         total_tokens=num_prompt + num_gen)


def prompt_logprobs_json(output: RequestOutput) -> Optional[list]:
    """vLLM's ``prompt_logprobs`` shape: per prompt position None (the first) or
    ``{token_id: {"logprob", "rank", "decoded_token"}}``, the prompt token first."""
    if output.prompt_logprobs is None:
        return None
    return [None if step is None else
            {tid: {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
             for tid, lp in step.items()} for step in output.prompt_logprobs]
