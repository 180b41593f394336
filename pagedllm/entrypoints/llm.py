"""``LLM``: offline batch generation, a thin loop over the engine (vLLM's offline API)."""
from __future__ import annotations

import itertools
from typing import Sequence

from pagedllm.engine.engine import LLMEngine
from pagedllm.engine.inputs import PromptInputs
from pagedllm.outputs import EmbeddingRequestOutput, RequestOutput
from pagedllm.pooling_params import PoolingParams
from pagedllm.core.adapters import PromptAdapterRequest
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """Load a model once, then ``generate`` / ``chat`` over batches of prompts (``encode``
    for an embedding model).

    ``LLM(model="path/or/repo", **engine_args)`` takes every engine argument by its
    vLLM name (``block_size=8``, ``enable_prefix_caching=True``, ...).
    """

    def __init__(self, model: str, **kwargs) -> None:
        from pagedllm.arg_utils import EngineArgs
        kwargs.setdefault("disable_log_stats", True)
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._counter = itertools.count()

    @classmethod
    def from_engine_args(cls, engine_args) -> "LLM":
        llm = cls.__new__(cls)
        llm.engine_args = engine_args
        llm.llm_engine = LLMEngine.from_engine_args(engine_args)
        llm._counter = itertools.count()
        return llm

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptInputs | Sequence[PromptInputs] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 prompt_token_ids: list[list[int]] | None = None, use_tqdm: bool = True,
                 priority: list[int] | None = None,
                 prompt_adapter_request: PromptAdapterRequest | None = None,
                 lora_request=None) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order.
        ``prompt_adapter_request``: one soft prompt for every prompt (--enable-prompt-adapter).
        ``lora_request``: a ``LoRARequest`` for every prompt, or a list with one (or None)
        per prompt (--enable-lora)."""
        if self.llm_engine.config.model.embedding_mode:
            raise ValueError("LLM.generate() is only supported for (conditional) generation "
                             "models (XForCausalLM, XForConditionalGeneration); this is an "
                             "embedding model: use LLM.encode()")
        prompts = _as_prompt_list(prompts, prompt_token_ids)
        params = _final_only(self._per_prompt(sampling_params or SamplingParams(), len(prompts)))
        priorities = priority if priority is not None else [0] * len(prompts)
        if len(priorities) != len(prompts):
            raise ValueError(f"priority has {len(priorities)} entries for {len(prompts)} prompts")
        loras = list(lora_request) if isinstance(lora_request, (list, tuple)) else \
            [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"lora_request has {len(loras)} entries for {len(prompts)} prompts")
        return self._run_engine(self._add_requests(
            [dict(prompt=prompt, params=p, priority=prio, lora_request=lora,
                  prompt_adapter_request=prompt_adapter_request)
             for prompt, p, prio, lora in zip(prompts, params, priorities, loras)]), use_tqdm)

    def encode(self, prompts: PromptInputs | Sequence[PromptInputs] | None = None,
               pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
               prompt_token_ids: list[list[int]] | None = None,
               use_tqdm: bool = True, lora_request=None,
               prompt_adapter_request: PromptAdapterRequest | None = None,
               ) -> list[EmbeddingRequestOutput]:
        """vLLM 0.6.3's ``LLM.encode``: the pooled output of every prompt (an embedding
        model's ``outputs.embedding``), in prompt order. Each prompt runs once, prefill only,
        through the same engine as ``generate``. ``lora_request`` / ``prompt_adapter_request``
        (vLLM's signature) are refused: embedding requests run the base model."""
        if not self.llm_engine.config.model.embedding_mode:
            raise ValueError("LLM.encode() is only supported for embedding models (XModel); "
                             "this model is generative: use LLM.generate()")
        prompts = _as_prompt_list(prompts, prompt_token_ids)
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            params = [pooling_params or PoolingParams()] * len(prompts)
        else:
            params = list(pooling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} pooling_params for {len(prompts)} "
                                 "prompts; pass one, or one per prompt")
        return self._run_engine(self._add_requests(
            [dict(prompt=prompt, params=p, lora_request=lora_request,
                  prompt_adapter_request=prompt_adapter_request)
             for prompt, p in zip(prompts, params)]), use_tqdm)

    def _add_requests(self, requests: list[dict]) -> list[str]:
        """Add every request (keyword arguments of ``add_request``) under fresh ids; if one
        is refused, the ones added so far are aborted and the error raised."""
        req_ids = []
        try:
            for request in requests:
                req_id = str(next(self._counter))
                self.llm_engine.add_request(req_id, **request)
                req_ids.append(req_id)
        except Exception:
            self.llm_engine.abort_request(req_ids)
            raise
        return req_ids

    @staticmethod
    def _per_prompt(sampling_params, num_prompts: int) -> list[SamplingParams]:
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        sampling_params = list(sampling_params)
        if len(sampling_params) != num_prompts:
            raise ValueError(f"got {len(sampling_params)} sampling_params for {num_prompts} "
                             "prompts; pass one, or one per prompt")
        return sampling_params

    def _run_engine(self, req_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(req_ids) > 1:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(req_ids), desc="Processed prompts", dynamic_ncols=True)
        while self.llm_engine.has_unfinished_requests():
            for output in self.llm_engine.step():
                if output.finished:
                    finished[output.request_id] = output
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [finished[r] for r in req_ids]

    def beam_search(self, prompts, params):
        """Beam search per prompt (strings or token-id lists) with ``BeamSearchParams``;
        returns ``BeamSearchOutput`` objects, best sequence first (see pagedllm/beam_search)."""
        from pagedllm.beam_search import beam_search
        return beam_search(self, list(prompts), params)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then generate."""
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer (do not pass --skip-tokenizer-init)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conversation in conversations:
            token_ids = tokenizer.apply_chat_template(
                conversation, chat_template=chat_template, tokenize=True,
                add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {}))
            if isinstance(token_ids, dict) or hasattr(token_ids, "input_ids"):
                token_ids = token_ids["input_ids"]
            prompts.append({"prompt_token_ids": list(token_ids)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


def _as_prompt_list(prompts, prompt_token_ids) -> list:
    """One prompt or many (strings, token-id lists, prompt dicts) as a list."""
    if prompts is None:
        if prompt_token_ids is None:
            raise ValueError("either prompts or prompt_token_ids must be given")
        prompts = [{"prompt_token_ids": ids} for ids in prompt_token_ids]
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                             and isinstance(prompts[0], int)):
        prompts = [prompts]
    return list(prompts)


def _final_only(params: list[SamplingParams]) -> list[SamplingParams]:
    """generate() returns finished outputs only, so (like vLLM) ask the engine for nothing
    else: no per-step RequestOutput is built. The caller's objects are not modified."""
    copies: dict[int, SamplingParams] = {}
    out = []
    for p in params:
        if p.output_kind != RequestOutputKind.FINAL_ONLY and id(p) not in copies:
            copies[id(p)] = p.clone()
            copies[id(p)].output_kind = RequestOutputKind.FINAL_ONLY
        out.append(copies.get(id(p), p))
    return out

