"""POST /v1/embeddings (vLLM 0.6.3's ``serving_embedding.py`` contract): its schema and handler.

One engine request per input (``PoolingParams``, prefill only; ids ``embd-<uuid>-<i>``), each
answering the pooled hidden state of its prompt. Fields as 0.6.3's ``EmbeddingRequest``:
``input`` (a string, a list of strings, token ids, or a list of token-id lists),
``encoding_format`` (``float``, or ``base64``: the float32 bytes, as the ``openai`` client
decodes them), ``dimensions`` (rejected: "dimensions is currently not supported"), ``user``,
``additional_data`` (the PoolingParams' field: accepted, and as in 0.6.3 no built-in model
reads it) and ``priority``. Usage counts the prompt
tokens. A generative model answers 400 (0.6.3: "Embedding API disabled"; the message names
both that and that the model does not support the Embeddings API).

Where it differs from 0.6.3: ``created`` is wall-clock seconds (0.6.3 sends
``time.monotonic()``); a per-token pooler (``Qwen2ForRewardModel``) answers one row per
prompt token (a list of lists, or their float32 bytes row after row in base64), where 0.6.3's
response model fails to validate such data; an empty ``input`` is a 400.
"""
from __future__ import annotations

import base64
import time
from typing import Any, List, Literal, Optional, Union

import numpy as np

from pagedllm.engine.async_engine import RequestStream
from pagedllm.entrypoints.openai.protocol import OpenAIBaseModel, UsageInfo, random_uuid
from pagedllm.entrypoints.openai.serving_engine import (OpenAIError, OpenAIServing,
                                                        abort_unfinished, merge_streams,
                                                        until_disconnected)
from pagedllm.outputs import EmbeddingRequestOutput
from pagedllm.pooling_params import PoolingParams


class EmbeddingRequest(OpenAIBaseModel):
    model: str
    input: Union[List[int], List[List[int]], str, List[str]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None
    additional_data: Optional[Any] = None  # vLLM's pooling parameter
    priority: int = 0  # vLLM's extra parameter (--scheduling-policy priority)

    def to_pooling_params(self) -> PoolingParams:
        return PoolingParams(additional_data=self.additional_data)


class EmbeddingResponseData(OpenAIBaseModel):
    index: int
    object: str = "embedding"
    embedding: Union[List[float], List[List[float]], str]


class EmbeddingResponse(OpenAIBaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: List[EmbeddingResponseData]
    usage: UsageInfo


def encode_embedding(embedding: list, encoding_format: str) -> Union[list, str]:
    """``float``: the list as is; ``base64``: its float32 bytes (row after row)."""
    if encoding_format == "float":
        return embedding
    return base64.b64encode(np.asarray(embedding, dtype=np.float32).tobytes()).decode("utf-8")


class OpenAIServingEmbedding(OpenAIServing):
    async def create_embedding(self, request: EmbeddingRequest, raw_request) -> dict:
        """The ``EmbeddingResponse`` of every input, in input order."""
        adapter = self.check_model(request.model)
        if not self.engine.config.model.embedding_mode:
            raise OpenAIError(
                f"Embedding API disabled: the model `{self.ctx.model_name}` "
                f"({self.engine.config.model.architecture}) does not support the Embeddings "
                "API; serve an embedding model (e.g. MistralModel, LlamaModel, Gemma2Model, "
                "Qwen2ForRewardModel)")
        if request.dimensions is not None:
            raise OpenAIError("dimensions is currently not supported")
        if adapter is not None:
            raise OpenAIError(f"The model `{request.model}` is an adapter: embedding requests "
                              "run the base model only")
        prompts = await self._prompts(request.input)
        request_id, created = f"embd-{random_uuid()}", int(time.time())
        params = request.to_pooling_params()
        streams: list[RequestStream] = []
        try:
            for i, (text, ids) in enumerate(prompts):
                streams.append(await self.add(
                    f"{request_id}-{i}", {"prompt": text, "prompt_token_ids": ids}, params,
                    request.priority, None, raw_request))
        except BaseException:
            abort_unfinished(self.engine, streams)
            raise
        return await until_disconnected(
            raw_request, self._collect(request, request_id, created, streams))

    async def _prompts(self, value) -> list[tuple[Optional[str], list[int]]]:
        """(text or None, token ids) per input; 0.6.3's length check: a prompt may fill
        the whole context (nothing is generated)."""
        items = [value] if isinstance(value, str) else list(value)
        if not items:
            raise OpenAIError("input must not be empty")
        if all(isinstance(t, int) for t in items):
            items = [items]
        prompts = []
        for item in items:
            if isinstance(item, str):
                prompts.append((item, await self.tokenize_async(item, True)))
            elif not item:
                raise OpenAIError("input must not contain an empty list of token ids")
            else:
                prompts.append((None, list(item)))
        limit = self.ctx.max_model_len
        for _, ids in prompts:
            if len(ids) > limit:
                raise OpenAIError(
                    f"This model's maximum context length is {limit} tokens. However, you "
                    f"requested {len(ids)} tokens in the input for embedding generation. "
                    "Please reduce the length of the input.")
        return prompts

    async def _collect(self, request: EmbeddingRequest, request_id: str, created: int,
                       streams: list[RequestStream]) -> dict:
        finals: list[Optional[EmbeddingRequestOutput]] = [None] * len(streams)
        try:
            async for idx, output in merge_streams(streams):
                finals[idx] = output
        finally:
            abort_unfinished(self.engine, streams)
        data = [EmbeddingResponseData(index=i, embedding=encode_embedding(
                    output.outputs.embedding, request.encoding_format))
                for i, output in enumerate(finals)]
        num_prompt = sum(len(output.prompt_token_ids) for output in finals)
        usage = UsageInfo(prompt_tokens=num_prompt, total_tokens=num_prompt)
        return EmbeddingResponse(id=request_id, created=created, model=request.model,
                                 data=data, usage=usage).model_dump()
