"""One batched sampler for the whole step.

Pipeline, in order, over [num_rows, vocab] fp32 logits (every op only touches the rows that
use it; see ``metadata.py``):
1. penalties: repetition (prompt + output tokens), frequency and presence (output tokens);
2. logit_bias and allowed_token_ids (one additive tensor);
3. min_tokens: stop ids (EOS unless ignore_eos, stop_token_ids) get -inf until reached;
4. logits processors: per-request Python callables, looping only over rows that have them;
   then guided decoding: the token masks of all constrained rows, in one op (a row keeps
   only the tokens its grammar allows next, so even greedy rows obey it);
5. greedy rows take the argmax here (their temperature counts as 1.0);
6. temperature: divide each random row by its temperature;
7. top-k then top-p (one sort), then min-p;
8. sample: inverse CDF with one uniform per row (seeded rows: a generator per request and
   token index, so seeded requests are batch independent);
9. logprobs: ``log_softmax`` of the logits after steps 1-7 (vLLM 0.6.3 returns these
   "processed" logprobs: temperature and filters included, greedy rows at temperature 1),
   the chosen token's logprob and rank and the top-k per row, only when a row needs them.
vLLM 0.6.3 applies logits processors (which carry its logit_bias / allowed_token_ids) before
min_tokens and the penalties; here the penalties come first. The two orders differ only when
a request combines a penalty with a bias or processor.
No host sync happens here; the runner copies the results to the host once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.sample.metadata import SamplingMetadata
from pagedllm.sample.ops.guided import apply_guided_mask
from pagedllm.sample.ops.logit_bias import apply_logit_bias
from pagedllm.sample.ops.logits_processors import apply_logits_processors
from pagedllm.sample.ops.logprobs import LogprobsTensors, gather_logprobs
from pagedllm.sample.ops.min_tokens import apply_min_tokens
from pagedllm.sample.ops.penalties import apply_penalties
from pagedllm.sample.ops.random_sample import sample_from_probs, uniform_per_row
from pagedllm.sample.ops.top_k_top_p import apply_min_p, apply_top_k_top_p


@dataclass
class SamplerOutput:
    sampled_ids: torch.Tensor  # [num_rows] int64
    logprobs: LogprobsTensors | None  # None when no row asked for logprobs


def apply_filters(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Steps 6-7: temperature, top-k / top-p, min-p (in place where possible)."""
    if meta.all_greedy:
        return logits
    logits = logits.div_(meta.temperature[:, None])
    if meta.filters is not None:
        f = meta.filters
        logits = apply_top_k_top_p(logits, f.rows, f.top_k, f.top_p, f.max_top_k)
    if meta.min_p_rows is not None:
        logits = apply_min_p(logits, meta.min_p_rows, meta.min_p)
    return logits


def apply_logits_ops(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Steps 1-4: penalties, bias / allowed ids, min_tokens, logits processors, guided."""
    if meta.penalties is not None:
        p = meta.penalties
        logits = apply_penalties(logits, p.rows, p.prompt_ids, p.output_ids, p.presence,
                                 p.frequency, p.repetition)
    if meta.bias_rows is not None:
        logits[meta.bias_rows] = apply_logit_bias(logits[meta.bias_rows], meta.bias)
    if meta.min_tokens_rows is not None:
        logits = apply_min_tokens(logits, meta.min_tokens_rows, meta.min_tokens_ids)
    if meta.processor_rows:
        logits = apply_logits_processors(logits, meta.processor_rows)
    if meta.guided_rows is not None:
        logits = apply_guided_mask(logits, meta.guided_rows, meta.guided_mask)
    return logits


class Sampler:
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits [num_rows, vocab] fp32 (modified in place) -> sampled ids and logprobs."""
        logits = apply_logits_ops(logits, meta)
        # max().indices: the first maximum like argmax, ~3x faster on CPU for wide rows.
        greedy_ids = logits.max(dim=-1).indices
        if meta.all_greedy and meta.max_num_logprobs < 0:
            return SamplerOutput(greedy_ids, None)
        logits = apply_filters(logits, meta)
        sampled = greedy_ids
        if not meta.all_greedy:
            probs = logits.softmax(dim=-1)
            u = uniform_per_row(logits.shape[0], meta.generator, meta.seeded_rows, logits.device)
            sampled = torch.where(meta.is_greedy, greedy_ids, sample_from_probs(probs, u))
        logprobs = None
        if meta.max_num_logprobs >= 0:
            logprobs = gather_logprobs(logits.log_softmax(dim=-1), sampled,
                                       meta.max_num_logprobs)
        return SamplerOutput(sampled, logprobs)
