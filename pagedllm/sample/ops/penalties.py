"""Repetition, frequency and presence penalties (vLLM 0.6.3 / OpenAI definitions).

For a row with prompt tokens P, output tokens O, ``count[t]`` = occurrences of t in O:
1. repetition (CTRL paper): for every t in P or O, ``logit > 0 ? logit / r : logit * r``;
2. frequency: ``logit[t] -= frequency_penalty * count[t]``;
3. presence: ``logit[t] -= presence_penalty * (count[t] > 0)``.
Token histories arrive right-padded with ``vocab_size``. The op is sparse: only the logits of
tokens in a row's history are gathered, penalised and scattered back (a duplicate id writes
the same value twice), so its cost grows with history length, not with the vocabulary; the
only dense pass is the zeroed output-count table.
"""
from __future__ import annotations

import torch


def apply_penalties(logits: torch.Tensor,  # [num_rows, vocab] (modified in place)
                    rows: torch.Tensor,  # [num_penalized] rows that use a penalty
                    prompt_ids: torch.Tensor,  # [num_penalized, max_prompt_len]
                    output_ids: torch.Tensor,  # [num_penalized, max_output_len]
                    presence: torch.Tensor,  # [num_penalized]
                    frequency: torch.Tensor,  # [num_penalized]
                    repetition: torch.Tensor,  # [num_penalized]
                    ) -> torch.Tensor:
    vocab_size = logits.shape[1]
    counts = torch.zeros(rows.shape[0], vocab_size + 1, dtype=logits.dtype,
                         device=logits.device)  # [num_penalized, vocab + 1], pad bin last
    counts.scatter_add_(1, output_ids, torch.ones_like(output_ids, dtype=logits.dtype))
    ids = torch.cat([prompt_ids, output_ids], dim=1)  # [num_penalized, history]
    ids = torch.where(ids == vocab_size, ids[:, :1], ids)  # pad -> first prompt token
    row_idx = rows[:, None].expand_as(ids)
    values = logits[row_idx, ids]
    rep = repetition[:, None]
    values = torch.where(values > 0, values / rep, values * rep)
    output_counts = counts.gather(1, ids)
    values -= frequency[:, None] * output_counts + presence[:, None] * (output_counts > 0)
    logits[row_idx, ids] = values
    return logits
