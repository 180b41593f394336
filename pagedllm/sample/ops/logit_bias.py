"""``logit_bias`` and ``allowed_token_ids``.

``logit_bias`` is sparse: (row, token, value) triples, the value clamped to [-100, 100] like
vLLM's OpenAI processor, added with one ``index_put_``. ``allowed_token_ids`` is a dense
additive mask per row that sets it (0 on the allowed ids, ``-inf`` elsewhere), built once per
batch by the metadata builder and added with one ``index_add_``. The allowed mask is applied
first; the two commute (``-inf + bias`` stays ``-inf``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class BiasInputs:
    rows: torch.Tensor | None = None  # [num_pairs] logit_bias (row, token, value) triples
    token_ids: torch.Tensor | None = None  # [num_pairs]
    values: torch.Tensor | None = None  # [num_pairs] clamped to [-100, 100]
    flat_ids: np.ndarray | None = None  # [num_pairs] row * vocab + token (the CPU path)
    allowed_rows: torch.Tensor | None = None  # [num_allowed] rows with allowed_token_ids
    allowed_mask: torch.Tensor | None = None  # [num_allowed, vocab] 0 allowed, -inf not


def build_bias(vocab_size: int, allowed: list[tuple[int, list[int]]],
               biases: list[tuple[int, dict[int, float]]],
               device: torch.device) -> BiasInputs:
    """allowed: (row, token ids); biases: (row, {token id: bias})."""
    out = BiasInputs()
    if allowed:
        mask = torch.full((len(allowed), vocab_size), -float("inf"))
        local = [i for i, (_, ids) in enumerate(allowed) for _ in ids]
        tokens = [t for _, ids in allowed for t in ids]
        mask[local, tokens] = 0.0
        out.allowed_rows = torch.tensor([row for row, _ in allowed], device=device)
        out.allowed_mask = mask.to(device)
    if biases:
        out.rows = torch.tensor([row for row, b in biases for _ in b], device=device)
        out.token_ids = torch.tensor([int(t) for _, b in biases for t in b], device=device)
        out.values = torch.tensor([float(v) for _, b in biases for v in b.values()],
                                  dtype=torch.float32).clamp(-100.0, 100.0).to(device)
        out.flat_ids = (out.rows * vocab_size + out.token_ids).cpu().numpy()
    return out


def apply_logit_bias(logits: torch.Tensor, bias: BiasInputs) -> torch.Tensor:
    if bias.allowed_rows is not None:
        logits.index_add_(0, bias.allowed_rows, bias.allowed_mask)
    if bias.rows is None:
        return logits
    if logits.device.type == "cpu" and logits.is_contiguous():  # numpy on the same memory
        np.add.at(logits.numpy().reshape(-1), bias.flat_ids, bias.values.numpy())
    else:
        logits.index_put_((bias.rows, bias.token_ids), bias.values, accumulate=True)
    return logits
