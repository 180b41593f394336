"""A request as the control plane sees it: token counts, status and its sampling parameters.

Owned by the engine core (scheduler); the front end never sees it, only per-step deltas
(``engine/core.py``). The scheduler's whole view of progress is ``num_computed_tokens``
against ``num_tokens``: prefill, chunked prefill, prefix-cache hits, decode and recompute
after preemption are all just those two counts.
"""
from __future__ import annotations

import enum
import time

from pagedllm.core.adapters import LoRARequest, PromptAdapterRequest
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # gave its blocks back; waits to be recomputed
    SWAPPED = 3  # its blocks live in CPU swap space
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    def __init__(self, req_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 *, prompt: str | None = None, arrival_time: float | None = None,
                 priority: int = 0, max_model_len: int | None = None) -> None:
        self.req_id = req_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.priority = priority
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.num_preemptions = 0
        self.max_tokens = _max_tokens(sampling_params.max_tokens, max_model_len,
                                      len(prompt_token_ids))
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        # the soft prompt whose placeholders start the prompt (--enable-prompt-adapter) and
        # the LoRA it runs with (--enable-lora): ids and paths only; weights are the worker's
        self.prompt_adapter_request: PromptAdapterRequest | None = None
        self.lora_request: LoRARequest | None = None
        # PoolingParams of a pooling request: prefill only; it finishes (stopped) when its
        # prompt is computed, with the pooled output instead of a token (``sampling_params``
        # is then a one-token placeholder the sampler never sees)
        self.pooling_params: PoolingParams | None = None
        # seconds spent in schedule() calls that scheduled it, and (--collect-detailed-traces)
        # in the model forward / execution of its steps
        self.scheduler_time = 0.0
        self.model_forward_time: float | None = None
        self.model_execute_time: float | None = None

    def samples_without_host_state(self) -> bool:
        """False when sampling its next token needs host work that depends on the tokens
        before it (penalties, logits processors, guided decoding, min_tokens not yet
        reached): such a request decodes one token a step (no multi-step, no drafts).
        A pooling request never decodes: its last prompt token is pooled, not fed on."""
        p = self.sampling_params
        return (self.pooling_params is None
                and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
                and p.repetition_penalty == 1.0 and not p.logits_processors
                and p.guided_decoding is None and self.num_output_tokens >= p.min_tokens)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def truncate_output(self, num_output_tokens: int) -> None:
        """Drop output tokens after the first ``num_output_tokens`` (a stop string ended the
        request before the end of a multi-step batch)."""
        extra = self.num_output_tokens - num_output_tokens
        if extra > 0:
            del self.output_token_ids[num_output_tokens:]
            del self.all_token_ids[-extra:]

    def is_finished(self) -> bool:
        return self.status.is_finished

    def check_stop(self) -> bool:
        """Set a finished status if the last token ends the request; return whether it did."""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= params.min_tokens and last in params.all_stop_token_ids:
            self.status = RequestStatus.FINISHED_STOPPED
            # vLLM reports the id only for user stop_token_ids; EOS gives stop_reason None.
            assert params.stop_token_ids is not None  # a list since SamplingParams' init
            self.stop_reason = last if last in params.stop_token_ids else None
            return True
        if self.num_output_tokens >= self.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False


def _max_tokens(max_tokens: int | None, max_model_len: int | None, num_prompt: int) -> int:
    """Output tokens a request may produce: its ``max_tokens``, capped by the room
    ``max_model_len`` leaves after the prompt (at least one). ``max_tokens=None`` means "up to
    max_model_len", so one of the two must be given (the engine always passes the context
    length)."""
    if max_model_len is not None:
        room = max(1, max_model_len - num_prompt)
        return room if max_tokens is None else min(max_tokens, room)
    if max_tokens is None:
        raise ValueError("a Request with max_tokens=None needs max_model_len (its output is "
                         "bounded by the context length)")
    return max_tokens
