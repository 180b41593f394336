"""What the engine hands back to users: vLLM 0.6.3's RequestOutput / CompletionOutput shapes."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# For each position: token id -> Logprob (the sampled token plus the top-k alternatives).
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class RequestMetrics:
    arrival_time: float
    last_token_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    time_in_queue: float | None = None
    finished_time: float | None = None


@dataclass
class CompletionOutput:
    """One generated sequence of a request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    lora_request: object | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """Everything a user sees about one request so far."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    lora_request: object | None = None
    encoder_prompt: str | None = None
    encoder_prompt_token_ids: list[int] | None = None
    num_cached_tokens: int | None = None


@dataclass
class EmbeddingOutput:
    """The pooled hidden state of one prompt (vLLM 0.6.3's shape): a vector, or for a
    per-token pooler (``Qwen2ForRewardModel``) one row per prompt token."""

    embedding: list[float] | list[list[float]]


@dataclass
class EmbeddingRequestOutput:
    """What ``LLM.encode`` returns per prompt and the server's embedding requests get: one
    output, once the prompt has been run."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool
    metrics: RequestMetrics | None = None
    prompt: str | None = None


def merge_delta_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Several DELTA outputs of one request as one (a stream whose reader fell behind gets
    its pending tokens in one chunk): texts, ids and logprobs concatenated per completion,
    the last output's finish state and metrics."""
    if len(outputs) == 1:
        return outputs[0]
    merged: dict[int, CompletionOutput] = {}
    for output in outputs:
        for c in output.outputs:
            prev = merged.get(c.index)
            if prev is None:
                merged[c.index] = CompletionOutput(
                    c.index, c.text, list(c.token_ids), c.cumulative_logprob,
                    None if c.logprobs is None else list(c.logprobs), c.finish_reason,
                    c.stop_reason, c.lora_request)
                continue
            prev.text += c.text
            prev.token_ids += c.token_ids
            if c.logprobs is not None:
                prev.logprobs = (prev.logprobs or []) + list(c.logprobs)
            prev.cumulative_logprob = c.cumulative_logprob
            prev.finish_reason, prev.stop_reason = c.finish_reason, c.stop_reason
    first, last = outputs[0], outputs[-1]
    prompt_logprobs = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs), None)
    return RequestOutput(last.request_id, first.prompt, first.prompt_token_ids,
                         prompt_logprobs or last.prompt_logprobs,
                         [merged[i] for i in sorted(merged)], last.finished, last.metrics,
                         last.lora_request, last.encoder_prompt,
                         last.encoder_prompt_token_ids, last.num_cached_tokens)
