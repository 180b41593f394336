"""The front end's view of one user request: ``best_of`` sequences and their outputs.

A request with ``best_of == 1`` is one sequence whose id is the user's request id. With
``best_of > 1`` the first sequence (index 0, the parent) prefills the prompt; on its first
token the core's scheduler forks the others (ids ``"{request_id}#{i}"``), which share the
prompt's KV blocks. Outputs: with ``n == best_of`` every sequence, in index order; with
``best_of > n`` only once all are finished, the ``n`` with the highest cumulative logprob
(the "processed" logprobs the sampler returns), re-indexed 0..n-1.
Owned by the ``OutputProcessor``; each sequence is a ``SeqState``, the front end's copy of
what the core sent (the core's ``Request`` objects never leave the core).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from pagedllm.core.request import RequestStatus
from pagedllm.core.scheduler_output import TokenLogprobs
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.outputs import (CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput,
                              Logprob, RequestMetrics, RequestOutput)
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


class TokenDecoder:
    """``decoded_token`` of logprobs: the text of a single token id (cached per id)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[tuple[int, bool], str] = {}

    def __call__(self, token_id: int, params: SamplingParams) -> str | None:
        if self.tokenizer is None or not params.detokenize:
            return None
        key = (token_id, params.skip_special_tokens)
        text = self._cache.get(key)
        if text is None:
            text = self.tokenizer.decode([token_id],
                                         skip_special_tokens=params.skip_special_tokens)
            self._cache[key] = text
        return text

    def to_dict(self, entry: TokenLogprobs, params: SamplingParams) -> dict[int, Logprob]:
        """vLLM's shape: the sampled / prompt token first, then the top alternatives."""
        out = {entry.token_id: Logprob(entry.logprob, entry.rank,
                                       self(entry.token_id, params))}
        for rank, (tid, lp) in enumerate(zip(entry.topk_ids, entry.topk_logprobs), start=1):
            if tid not in out:
                out[tid] = Logprob(lp, rank, self(tid, params))
        return out


class SeqState:
    """One sequence as the front end knows it: the tokens, status and times the core sent,
    less what a stop string cut off."""

    def __init__(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float, max_model_len: int | None) -> None:
        self.req_id = req_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = params
        self.arrival_time = arrival_time
        self.output_token_ids: list[int] = []
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.max_tokens = params.max_tokens
        if max_model_len is not None:  # as the core's Request computes it
            room = max(1, max_model_len - len(prompt_token_ids))
            self.max_tokens = room if self.max_tokens is None else min(self.max_tokens, room)
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.num_cached_tokens = 0
        self.scheduler_time = 0.0
        self.model_forward_time: float | None = None
        self.model_execute_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def is_finished(self) -> bool:
        return self.status.is_finished

    def truncate_output(self, num_output_tokens: int) -> None:
        del self.output_token_ids[num_output_tokens:]


@dataclass
class Sequence:
    request: SeqState
    detokenizer: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    num_sent_chars: int = 0
    num_sent_tokens: int = 0


class SequenceGroup:
    def __init__(self, request_id: str, params: SamplingParams, prompt: str | None,
                 prompt_token_ids: list[int], seq_ids: list[str], arrival_time: float,
                 max_model_len: int | None, tokenizer) -> None:
        self.request_id = request_id
        self.params = params
        self.prompt = prompt
        self.trace_headers: dict[str, str] | None = None  # the caller's trace context
        self.tokenizer = tokenizer
        self.seqs = [self._sequence(SeqState(seq_id, prompt_token_ids, params, arrival_time,
                                             max_model_len)) for seq_id in seq_ids]
        self.parent = self.seqs[0].request
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = None
        if params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(prompt_token_ids)

    def _sequence(self, state: SeqState) -> Sequence:
        return Sequence(state, IncrementalDetokenizer(self.tokenizer, state.prompt_token_ids,
                                                      state.sampling_params))

    def set_prompt_token_ids(self, token_ids: list[int]) -> None:
        """The core's final prompt (a prompt adapter's placeholders come first)."""
        for seq in self.seqs:
            seq.request.prompt_token_ids = token_ids
            seq.detokenizer = self._sequence(seq.request).detokenizer
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(token_ids)

    @property
    def req_ids(self) -> list[str]:
        return [s.request.req_id for s in self.seqs]

    def is_finished(self) -> bool:
        return all(s.request.is_finished() for s in self.seqs)

    def add_prompt_logprobs(self, first_pos: int, entries: list[TokenLogprobs],
                            decoder: TokenDecoder) -> None:
        if self.prompt_logprobs is None:
            return
        for pos, entry in enumerate(entries, start=first_pos):
            if self.prompt_logprobs[pos] is None:  # a recompute after preemption repeats them
                self.prompt_logprobs[pos] = decoder.to_dict(entry, self.params)

    def add_logprobs(self, seq: Sequence, entry: TokenLogprobs | None,
                     decoder: TokenDecoder) -> None:
        if entry is None:
            return
        seq.cumulative_logprob += entry.logprob
        if self.params.logprobs is not None:
            seq.logprobs.append(decoder.to_dict(entry, self.params))

    # ---- outputs -------------------------------------------------------------------------
    def _metrics(self, finished: bool) -> RequestMetrics:
        parent, now = self.parent, time.time()
        return RequestMetrics(
            arrival_time=parent.arrival_time, last_token_time=now,
            first_scheduled_time=parent.first_scheduled_time,
            first_token_time=parent.first_token_time,
            time_in_queue=(parent.first_scheduled_time or now) - parent.arrival_time,
            finished_time=now if finished else None)

    def make_output(self) -> RequestOutput | None:
        finished = self.is_finished()
        kind, best_of = self.params.output_kind, self.params.best_of
        assert best_of is not None  # SamplingParams' init sets it (to n by default)
        ranked = best_of > self.params.n
        if (kind == RequestOutputKind.FINAL_ONLY or ranked) and not finished:
            return None
        seqs = self.seqs
        if ranked:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[:self.params.n]
        outputs = [self._completion(i, s, kind) for i, s in enumerate(seqs)]
        parent, metrics = self.parent, self._metrics(finished)
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            prompt_token_ids=parent.prompt_token_ids, prompt_logprobs=self.prompt_logprobs,
            outputs=outputs, finished=finished, metrics=metrics,
            num_cached_tokens=parent.num_cached_tokens)

    def _stop_hold_back(self) -> int:
        params = self.params
        if not params.stop or params.include_stop_str_in_output:
            return 0
        return max(len(stop) for stop in params.stop) - 1

    def _completion(self, index: int, seq: Sequence, kind: RequestOutputKind) -> CompletionOutput:
        request = seq.request
        text, token_ids = seq.detokenizer.output_text, request.output_token_ids
        logprobs = seq.logprobs
        done = request.is_finished()
        if kind == RequestOutputKind.DELTA:
            # hold back the last len(longest stop string) - 1 characters while running: a
            # stop string that a later token completes must not have been sent already
            end = len(text) if done else max(seq.num_sent_chars,
                                             len(text) - self._stop_hold_back())
            text, token_ids = text[seq.num_sent_chars:end], token_ids[seq.num_sent_tokens:]
            logprobs = logprobs[seq.num_sent_tokens:]
            seq.num_sent_chars = end
            seq.num_sent_tokens = request.num_output_tokens
        has_logprobs = self.params.logprobs is not None
        return CompletionOutput(
            index=index, text=text, token_ids=list(token_ids),
            cumulative_logprob=seq.cumulative_logprob if has_logprobs else None,
            logprobs=list(logprobs) if has_logprobs else None,
            finish_reason=request.status.finish_reason if done else None,
            stop_reason=request.stop_reason if done else None)


class PoolingGroup(SequenceGroup):
    """A pooling request (``PoolingParams``): one sequence that runs its prompt only; its one
    output is an ``EmbeddingRequestOutput`` once the core sends the pooled data. The
    sequence's params are the core's prefill-only placeholder (nothing is detokenized)."""

    def __init__(self, request_id: str, pooling_params, prompt: str | None,
                 prompt_token_ids: list[int], arrival_time: float, max_model_len: int | None,
                 tokenizer) -> None:
        super().__init__(request_id, SamplingParams(max_tokens=1, temperature=0.0,
                                                    detokenize=False),
                         prompt, prompt_token_ids, [request_id], arrival_time, max_model_len,
                         tokenizer)
        self.pooling_params = pooling_params
        self.pooled = None  # host float32 tensor from the core, once the prompt has run

    def make_output(self) -> EmbeddingRequestOutput | None:  # type: ignore[override]
        # a pooling group's one output is an embedding, not a RequestOutput
        if self.pooled is None:
            return None
        return EmbeddingRequestOutput(
            request_id=self.request_id, outputs=EmbeddingOutput(self.pooled.tolist()),
            prompt_token_ids=self.parent.prompt_token_ids, finished=True,
            metrics=self._metrics(True), prompt=self.prompt)
