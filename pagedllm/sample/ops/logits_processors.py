"""Per-request Python logits processors (vLLM's offline signature).

A processor is ``fn(output_token_ids, logits_row)`` or
``fn(prompt_token_ids, output_token_ids, logits_row)`` and returns the new row. Only rows
whose request has processors are visited; this is the one per-request loop of the sampler
and costs nothing when no request uses the feature.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch


def _num_params(fn: Callable) -> int:
    try:
        return len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return 2


def apply_logits_processors(logits: torch.Tensor,
                            rows: list[tuple[int, list[Callable], list[int], list[int]]]
                            ) -> torch.Tensor:
    """rows: (row, processors, prompt token ids, output token ids)."""
    for row, processors, prompt_ids, output_ids in rows:
        logits_row = logits[row]
        for fn in processors:
            if _num_params(fn) == 3:
                logits_row = fn(prompt_ids, output_ids, logits_row)
            else:
                logits_row = fn(output_ids, logits_row)
        logits[row] = logits_row
    return logits
