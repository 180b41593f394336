"""The front half of the engine: requests in as prompts, ``RequestOutput``s out.

``prepare_request`` validates a user request and turns it into the ``CoreRequest`` the core
takes (token ids, cloned and checked params). ``OutputProcessor`` keeps one ``SequenceGroup``
per request and turns the core's per-step ``SeqDelta``s into outputs: incremental text, stop
strings (vLLM's order), logprob dicts, best_of ranking, tracing spans. A stop string ends the
sequence here at once (later tokens from the core are dropped) and comes back to the caller as
a sequence id to abort in the core. It runs wherever the front end runs: in ``LLMEngine``
beside the core, or in the API-server process with the core in its own process.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import time

from pagedllm.core.request import RequestStatus
from pagedllm.engine.core import CoreRequest, SeqDelta, seq_ids
from pagedllm.engine.inputs import LoRATokenizers, PromptInputs, PromptProcessor
from pagedllm.engine.sequence_group import PoolingGroup, Sequence, SequenceGroup, TokenDecoder
from pagedllm.outputs import RequestOutput
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig


def check_request_params(params: SamplingParams, vocab_size: int, max_logprobs: int) -> None:
    """Checks that need the model: logprob caps and token ids in the vocabulary."""
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and value > max_logprobs:
            raise ValueError(f"SamplingParams.{name}={value} is greater than the maximum "
                             f"allowed {max_logprobs}; raise --max-logprobs or ask for fewer")
    if params.logit_bias:
        params.logit_bias = {int(k): float(v) for k, v in params.logit_bias.items()}
        bad = [t for t in params.logit_bias if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"SamplingParams.logit_bias has out-of-vocabulary token id(s) "
                             f"{bad[:5]}; ids must be in [0, {vocab_size})")
    assert params.stop_token_ids is not None  # a list since SamplingParams' init
    bad = [t for t in params.stop_token_ids if not 0 <= int(t) < vocab_size]
    if bad:  # min_tokens masks them in the logits: an id past the vocabulary would crash a step
        raise ValueError(f"SamplingParams.stop_token_ids has out-of-vocabulary token id(s) "
                         f"{bad[:5]}; ids must be in [0, {vocab_size})")
    if params.allowed_token_ids is not None:
        bad = [t for t in params.allowed_token_ids if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"SamplingParams.allowed_token_ids has out-of-vocabulary token "
                             f"id(s) {bad[:5]}; ids must be in [0, {vocab_size})")
        params.allowed_token_ids = [int(t) for t in params.allowed_token_ids]


def prepare_request(config: EngineConfig, inputs: PromptProcessor, request_id: str,
                    prompt: PromptInputs,
                    params: SamplingParams | PoolingParams, arrival_time: float | None = None,
                    priority: int = 0, prompt_adapter_request=None,
                    lora_request=None) -> tuple[str | None, CoreRequest]:
    """Validate a request (ValueError naming the bad field) and tokenize its prompt:
    (prompt text, the ``CoreRequest``). ``params``: SamplingParams for a generative model,
    PoolingParams for an embedding model (``check_request_kind``)."""
    check_request_kind(config.model, params)
    if isinstance(params, PoolingParams):
        return _prepare_pooling(config, inputs, request_id, prompt, params, arrival_time,
                                priority, prompt_adapter_request, lora_request)
    unsupported = params.unsupported_fields()
    if unsupported:
        raise ValueError(f"SamplingParams field(s) {', '.join(unsupported)} are not supported "
                         "yet")
    if priority != 0 and config.scheduler.scheduling_policy != "priority":
        raise ValueError(f"priority={priority} needs --scheduling-policy priority")
    text, token_ids = inputs.process(prompt, lora_request)
    try:
        params = params.clone()
    except RecursionError:  # e.g. a guided_json schema nested hundreds of levels deep
        raise ValueError("the request's parameters are nested too deeply to copy "
                         "(guided_json / guided_choice / logit_bias)") from None
    check_request_params(params, config.model.vocab_size, config.model.max_logprobs)
    if params.truncate_prompt_tokens is not None:
        token_ids = token_ids[-params.truncate_prompt_tokens:]
    params.update_from_generation_config(inputs.eos_token_ids)
    arrival_time = time.time() if arrival_time is None else arrival_time
    return text, CoreRequest(request_id, list(token_ids), params, arrival_time, priority,
                             prompt_adapter_request, lora_request)


def check_request_kind(model_config, params) -> None:
    """Generative models take SamplingParams, embedding (pooling) models PoolingParams;
    the other kind is a ValueError that names what the model does support."""
    arch = model_config.architecture
    if isinstance(params, PoolingParams):
        if not model_config.embedding_mode:
            raise ValueError(f"the model ({arch}) does not support the Embeddings API: it is a "
                             "generative model; embeddings need an embedding model (e.g. "
                             "MistralModel, LlamaModel, Gemma2Model, Qwen2ForRewardModel)")
        return
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
    if model_config.embedding_mode:
        raise ValueError(f"the model ({arch}) is an embedding model: it does not generate "
                         "text; use the Embeddings API (/v1/embeddings, LLM.encode)")


def _prepare_pooling(config: EngineConfig, inputs: PromptProcessor, request_id: str,
                     prompt: PromptInputs, params: PoolingParams, arrival_time: float | None,
                     priority: int, prompt_adapter_request,
                     lora_request) -> tuple[str | None, CoreRequest]:
    """A pooling request: the prompt is tokenized and checked as for generation; it needs
    no room for output (a prompt of max_model_len tokens fits). The core gets PoolingParams
    without ``additional_data``: no pooler reads it, and a client's arbitrarily nested JSON
    must not have to cross to the core process."""
    if priority != 0 and config.scheduler.scheduling_policy != "priority":
        raise ValueError(f"priority={priority} needs --scheduling-policy priority")
    if prompt_adapter_request is not None or lora_request is not None:
        raise ValueError("embedding requests take no prompt adapter or LoRA")
    text, token_ids = inputs.process(prompt)
    arrival_time = time.time() if arrival_time is None else arrival_time
    return text, CoreRequest(request_id, list(token_ids), PoolingParams(), arrival_time,
                             priority)


class OutputProcessor:
    def __init__(self, tokenizer, max_model_len: int, tracer=None,
                 lora_tokenizers: LoRATokenizers | None = None) -> None:
        """``lora_tokenizers``: a LoRA request whose adapter ships a tokenizer is
        detokenized with it (vLLM 0.6.3's ``get_lora_tokenizer``)."""
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.tracer = tracer  # --otlp-traces-endpoint: one span per finished request
        self.lora_tokenizers = lora_tokenizers
        self.groups: dict[str, SequenceGroup] = {}  # user request id -> its sequences
        self._seqs: dict[str, tuple[SequenceGroup, Sequence]] = {}  # sequence id -> seq
        self._decoders: dict[int, TokenDecoder] = {id(tokenizer): TokenDecoder(tokenizer)}

    def _tokenizer_for(self, req: CoreRequest):
        if self.lora_tokenizers is None or req.lora_request is None:
            return self.tokenizer
        return self.lora_tokenizers.get(req.lora_request)

    def _decoder(self, group: SequenceGroup) -> TokenDecoder:
        """Logprobs' ``decoded_token`` texts, by the group's tokenizer (cached per id)."""
        decoder = self._decoders.get(id(group.tokenizer))
        if decoder is None:
            decoder = self._decoders[id(group.tokenizer)] = TokenDecoder(group.tokenizer)
        return decoder

    def add(self, text: str | None, req: CoreRequest,
            trace_headers: dict[str, str] | None = None) -> SequenceGroup:
        if req.request_id in self.groups:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        group: SequenceGroup
        if isinstance(req.params, PoolingParams):
            group = PoolingGroup(req.request_id, req.params, text, req.prompt_token_ids,
                                 req.arrival_time, self.max_model_len, self.tokenizer)
        else:
            assert req.params.best_of is not None  # SamplingParams' init sets it
            group = SequenceGroup(req.request_id, req.params, text, req.prompt_token_ids,
                                  seq_ids(req.request_id, req.params.best_of),
                                  req.arrival_time, self.max_model_len,
                                  self._tokenizer_for(req))
        group.trace_headers = trace_headers
        self.groups[req.request_id] = group
        for seq in group.seqs:
            self._seqs[seq.request.req_id] = (group, seq)
        return group

    def remove(self, request_id: str) -> list[str]:
        """Forget a request; the ids of its sequences that the core may still run."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return []
        for seq_id in group.req_ids:
            self._seqs.pop(seq_id, None)
        return [s.request.req_id for s in group.seqs if not s.request.is_finished()]

    def request_id_of(self, seq_id: str) -> str | None:
        """The user request a sequence belongs to (None once it is gone)."""
        entry = self._seqs.get(seq_id)
        return None if entry is None else entry[0].request_id

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def process(self, deltas: list[SeqDelta],
                per_token: bool = False) -> tuple[list[RequestOutput], list[str]]:
        """One step's deltas -> (outputs, ids of sequences a stop string ended, which the
        core must abort). ``per_token`` (--multi-step-stream-outputs): one output per decoded
        token of a multi-step batch instead of one per step."""
        outputs: list[RequestOutput] = []
        stopped: list[str] = []
        groups: dict[str, SequenceGroup] = {}
        for delta in deltas:
            entry = self._seqs.get(delta.seq_id)
            if entry is None or entry[1].request.is_finished():
                continue  # aborted, or ended by a stop string: late tokens are dropped
            group, seq = entry
            if self._apply(group, seq, delta, per_token and delta.multi_step,
                           outputs, stopped):
                groups[group.request_id] = group
        for group in groups.values():
            output = group.make_output()
            if output is not None:
                outputs.append(output)
            if group.is_finished():
                self._finished(group)
        return outputs, stopped

    def _apply(self, group: SequenceGroup, seq: Sequence, delta: SeqDelta, per_token: bool,
               outputs: list[RequestOutput], stopped: list[str]) -> bool:
        """Take one delta into its sequence; True when it brought tokens."""
        state = seq.request
        state.first_scheduled_time, state.first_token_time, state.num_cached_tokens = \
            delta.times
        if delta.trace_times is not None:
            state.scheduler_time, state.model_forward_time, state.model_execute_time = \
                delta.trace_times
        if delta.prompt_logprobs is not None:
            group.add_prompt_logprobs(*delta.prompt_logprobs, self._decoder(group))
        if delta.pooled is not None and isinstance(group, PoolingGroup):  # it has finished
            group.pooled, state.status = delta.pooled, RequestStatus(delta.status)
            return True
        new_ids = delta.new_token_ids
        if not new_ids:
            return False
        state.status, state.stop_reason = RequestStatus(delta.status), delta.stop_reason
        first = state.num_output_tokens
        state.output_token_ids += new_ids
        for i in range(len(new_ids)):
            if delta.logprobs is not None:
                group.add_logprobs(seq, delta.logprobs[i], self._decoder(group))
            if self._detokenize(seq, first + i, stopped):
                break
            if per_token and i < len(new_ids) - 1:
                output = group.make_output()
                if output is not None:
                    outputs.append(output)
        return True

    def _finished(self, group: SequenceGroup) -> None:
        if self.tracer is not None:
            self.tracer.request_finished(group, group.trace_headers, time.time())
        del self.groups[group.request_id]
        for seq_id in group.req_ids:
            del self._seqs[seq_id]

    def _detokenize(self, seq: Sequence, index: int, stopped: list[str]) -> bool:
        """New text of output token ``index``, then the stop rules that work on text (vLLM
        order). Returns True when the sequence ended at this token (later tokens of a
        multi-token delta are dropped)."""
        state, detok = seq.request, seq.detokenizer
        num_chars = detok.update(state.output_token_ids[index])
        params = state.sampling_params
        is_last = index == state.num_output_tokens - 1
        if is_last and state.status == RequestStatus.FINISHED_STOPPED:
            detok.drop_last(num_chars)  # ended by EOS or a stop token id
            return True
        if index + 1 < params.min_tokens:
            return False
        stop = detok.find_stop_string(num_chars)
        if stop is None:
            return False
        if not state.is_finished():
            stopped.append(state.req_id)  # the core still runs it
        state.stop_reason = stop
        state.truncate_output(index + 1)
        state.status = RequestStatus.FINISHED_STOPPED
        return True
