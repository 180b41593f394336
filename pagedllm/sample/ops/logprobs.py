"""Logprobs as vLLM returns them: the sampled (or target) token's logprob and rank, plus the
top-k tokens of each row. ``logprobs`` are ``log_softmax`` of the fully processed logits
(after penalties, bias, temperature and filters), as in vLLM 0.6.3; rank 1 is the best token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LogprobsTensors:
    token_ids: torch.Tensor  # [num_rows] the sampled / target token
    logprobs: torch.Tensor  # [num_rows] its logprob
    ranks: torch.Tensor  # [num_rows] its rank (1 = most likely)
    topk_ids: torch.Tensor  # [num_rows, k]
    topk_logprobs: torch.Tensor  # [num_rows, k]


def gather_logprobs(logprobs: torch.Tensor,  # [num_rows, vocab]
                    token_ids: torch.Tensor,  # [num_rows]
                    num_topk: int) -> LogprobsTensors:
    chosen = logprobs.gather(1, token_ids[:, None])  # [num_rows, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    if num_topk > 0:
        topk_logprobs, topk_ids = logprobs.topk(num_topk, dim=-1)
    else:
        topk_logprobs = logprobs.new_empty(logprobs.shape[0], 0)
        topk_ids = token_ids.new_empty(logprobs.shape[0], 0)
    return LogprobsTensors(token_ids, chosen.squeeze(1), ranks, topk_ids, topk_logprobs)
