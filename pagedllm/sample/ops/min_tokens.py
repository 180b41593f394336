"""``min_tokens``: until a row has that many output tokens, its stop ids (EOS unless
``ignore_eos``, and ``stop_token_ids``) get ``-inf`` so they cannot be sampled."""
from __future__ import annotations

import torch


def apply_min_tokens(logits: torch.Tensor, rows: torch.Tensor,
                     token_ids: torch.Tensor) -> torch.Tensor:
    """rows [num_pairs], token_ids [num_pairs]: the (row, stop id) pairs to mask."""
    logits[rows, token_ids] = -float("inf")
    return logits
