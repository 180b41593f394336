"""The LM head applied only to the rows that need logits, with optional final soft-capping."""
from __future__ import annotations

import torch

from pagedllm.distributed import (all_gather, broadcast_from_last_stage, get_tp_size,
                                  is_last_stage)
from pagedllm.layers import fused


def compute_logits(hidden_states: torch.Tensor, lm_head_weight: torch.Tensor,
                   soft_cap: float | None = None, scale: float = 1.0) -> torch.Tensor:
    # hidden_states [num_rows, hidden] -> [num_rows, vocab] in fp32
    logits = fused.linear(hidden_states, lm_head_weight, fp32_out=True)
    if get_tp_size() > 1:  # vocab-parallel head: gather every rank's slice, drop the padding
        logits = all_gather(logits, dim=-1)[:, :lm_head_weight.org_vocab_size]
    if scale != 1.0:
        logits = logits * scale
    if soft_cap:
        logits = torch.tanh(logits / soft_cap) * soft_cap
    return logits


def pipeline_logits(hidden_states: torch.Tensor, head: torch.nn.Module | None, vocab_size: int,
                    soft_cap: float | None = None, scale: float = 1.0,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Logits on every pipeline stage: the last computes them with ``head`` (its LM head or
    tied embedding; None on other stages) and broadcasts them to the others. ``scale``
    multiplies them (Cohere's ``logit_scale``); ``bias`` (GPT-J's LM head bias, the whole
    vocabulary on every rank) is added after the tensor-parallel gather."""
    logits = None
    if is_last_stage():
        logits = compute_logits(hidden_states, head.weight, soft_cap, scale)
        if bias is not None:
            logits = logits + bias.float()
    return broadcast_from_last_stage(logits, (hidden_states.shape[0], vocab_size),
                                     torch.float32, hidden_states.device)
