"""``logit_bias`` and ``allowed_token_ids`` as one dense additive tensor.

The metadata builder folds both into ``bias`` [num_rows, vocab]: the user's bias per token
(clamped to [-100, 100] like vLLM's OpenAI processor) plus ``-inf`` on every token outside
``allowed_token_ids`` for rows that set it; rows that set neither are zero.
"""
from __future__ import annotations

import torch


def build_bias(num_rows: int, vocab_size: int, allowed: list[tuple[int, list[int]]],
               biases: list[tuple[int, dict[int, float]]], device: torch.device) -> torch.Tensor:
    """allowed: (row, token ids); biases: (row, {token id: bias}) -> bias [num_rows, vocab]."""
    bias = torch.zeros(num_rows, vocab_size, dtype=torch.float32)
    if allowed:
        rows = torch.tensor([row for row, _ in allowed])
        block = torch.full((len(allowed), vocab_size), -float("inf"))
        local = [i for i, (_, ids) in enumerate(allowed) for _ in ids]
        tokens = [t for _, ids in allowed for t in ids]
        block[local, tokens] = 0.0
        bias[rows] = block
    if biases:
        rows = [row for row, b in biases for _ in b]
        tokens = [t for _, b in biases for t in b]
        values = torch.tensor([v for _, b in biases for v in b.values()]).clamp(-100.0, 100.0)
        bias.index_put_((torch.tensor(rows), torch.tensor(tokens)), values, accumulate=True)
    return bias.to(device)


def apply_logit_bias(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return logits.add_(bias)
