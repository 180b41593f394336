"""What crosses from the control plane to the compute plane each step, and back.

A request's full data (tokens, sampling parameters, block ids) is sent once, when it is
(re)scheduled from the waiting or swapped queue; afterwards only diffs (new block ids, the
computed-token count) are sent. The runner keeps the rest in its persistent batch state.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.core.adapters import LoRARequest, PromptAdapterRequest
from pagedllm.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    req_id: str
    token_ids: list[int]  # prompt + outputs generated so far (after a recompute preemption)
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    num_output_tokens: int  # how many sampled tokens the seeded generator has already produced
    # --enable-prompt-adapter: the soft prompt whose rows replace the embeddings of the first
    # num_virtual_tokens (placeholder) tokens; --enable-lora: the LoRA of its rows. Requests
    # (ids, names, paths) only: the worker's AdapterStore holds the weights by id
    prompt_adapter_request: PromptAdapterRequest | None = None
    lora_request: LoRARequest | None = None
    # a pooling request (PoolingParams): prefill only, its pooled hidden state is the answer
    pooling_params: object = None


@dataclass
class CachedRequestData:
    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # req_id -> tokens to compute this step
    total_num_scheduled_tokens: int
    finished_req_ids: set[str] = field(default_factory=set)  # finished or preempted: drop state
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (gpu, cpu)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu, gpu)
    # (src, dst) device blocks to copy before anything else this step: the partial last
    # prompt block of an n / best_of child (copy-on-write fork)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    preempted_req_ids: set[str] = field(default_factory=set)
    # --num-scheduler-steps: decode steps the runner runs back to back on this batch (every
    # request decodes one token per step; its blocks already cover all of them)
    num_steps: int = 1
    # the runner's multi-step path runs this batch (decodes only, each step's ids fed on the
    # device, a lookahead batch may take its last ids): every batch of num_steps > 1, and
    # with the single-step lookahead (--num-scheduler-steps 1, async output processing)
    # one-step decode batches too
    multi_step: bool = False
    # speculative decoding: req_id -> draft tokens scheduled after its last token (its
    # num_scheduled_tokens is 1 + len(draft)); the runner verifies them in this step
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class TokenLogprobs:
    """Logprobs at one position: the sampled (or prompt) token and the top alternatives."""
    token_id: int
    logprob: float
    rank: int  # 1 = most likely
    topk_ids: list[int]
    topk_logprobs: list[float]


@dataclass
class ModelRunnerOutput:
    req_ids: list[str]
    # per request, the tokens sampled this step in order: none when it was mid-prompt
    # (chunked prefill), one per decode step (``SchedulerOutput.num_steps``) otherwise; a
    # speculating request: its accepted draft tokens plus one
    sampled_token_ids: list[list[int]]
    # req_id -> logprobs of each token sampled this step (requests that need them only)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # req_id -> (prompt position of the first entry, one entry per scored prompt token)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # --collect-detailed-traces: seconds of this step in the model forward / execution
    model_forward_time: float | None = None
    model_execute_time: float | None = None
    # pooling requests whose prompt was completed this step: req_id -> the pooled output (a
    # host float32 tensor: [hidden] or one row per prompt token); they sample nothing
    pooled: dict[str, object] = field(default_factory=dict)
