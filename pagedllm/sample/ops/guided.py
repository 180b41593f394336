"""Guided decoding: apply the token bitmasks of all constrained rows in one batched op.

``bitmask`` [num_guided, ceil(vocab / 32)] int32 comes from the runner's grammar matchers
(bit j of word w set: token 32 * w + j is allowed). Disallowed tokens get ``-inf``; tokens
beyond the bitmask's width (a model vocab padded past the tokenizer's) are disallowed.

The bitmask is expanded through a 256-entry table per byte into an additive
[num_guided, vocab] mask (0 or -inf; one ``index_select``; the runner does this on its helper
thread while the model runs), then the sampler adds it to the guided rows (one ``add_`` /
``index_add_``). On CPU this is ~10x faster than a bool mask with
``masked_fill_`` (measured in docs/benchmarks.md).
"""
from __future__ import annotations

import torch


def _additive_by_byte(device: torch.device) -> torch.Tensor:
    """[256, 8] float32: 0 where bit j of byte b is set, else -inf (2K elements per call)."""
    byte = torch.arange(256, device=device)[:, None]
    is_set = ((byte >> torch.arange(8, device=device)) & 1).bool()
    return torch.zeros(256, 8, device=device).masked_fill_(~is_set, -float("inf"))


def additive_mask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[num_guided, num_words] int32 -> [num_guided, vocab_size] float32 (0 or -inf)."""
    num_rows = bitmask.shape[0]
    # Little-endian bytes: byte k of word w holds tokens 32w + 8k .. 32w + 8k + 7.
    byte_ids = bitmask.contiguous().view(torch.uint8).long().view(-1)  # [num_guided * 4 * W]
    mask = _additive_by_byte(bitmask.device).index_select(0, byte_ids).view(num_rows, -1)
    if mask.shape[1] < vocab_size:
        mask = torch.nn.functional.pad(mask, (0, vocab_size - mask.shape[1]),
                                       value=-float("inf"))
    return mask[:, :vocab_size]


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[num_guided, num_words] int32 -> [num_guided, vocab_size] bool (True: allowed)."""
    return additive_mask(bitmask, vocab_size) == 0


def apply_guided_mask(logits: torch.Tensor, rows: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """logits [num_rows, vocab] fp32 (in place); rows [num_guided]; mask [num_guided, vocab]
    from ``additive_mask`` (the runner expands it on its helper thread during the forward)."""
    if rows.shape[0] == logits.shape[0]:  # every row guided, in order (runner builds them so)
        return logits.add_(mask)
    return logits.index_add_(0, rows, mask)


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor,
                        bitmask: torch.Tensor) -> torch.Tensor:
    """Expand and apply in one call (bitmask [num_guided, num_words] int32)."""
    return apply_guided_mask(logits, rows, additive_mask(bitmask, logits.shape[-1]))
