"""The CUDA attention backend: Triton kernels of ``triton_attention.py``.

Decode rows (the first ``num_decodes`` tokens, one per request) go through the paged decode
kernel with the decode block table; prefill rows go through the varlen prefill kernel with the
packed prefill tensors the runner builds (``needs_packed_prefill``).
"""
from __future__ import annotations

import torch

from pagedllm.attention import triton_attention as kernels
from pagedllm.attention.backend import AttentionBackend, AttentionMetadata
from pagedllm.switches import switches


def _rope_fuses(q, rotary, q_norm, k_norm) -> bool:
    """Whether the fused rotary kernels take this layer: neox rotary, a contiguous q, and q/k
    norms (if any) that are plain RMSNorms with one eps."""
    norms_fuse = q_norm is None or (not q_norm.offset and not k_norm.offset
                                    and q_norm.eps == k_norm.eps)
    return rotary.is_neox_style and norms_fuse and q.stride(-1) == 1


def _norm_args(q_norm, k_norm) -> tuple:
    """(q norm weight, k norm weight, eps) for the fused kernels; Nones without norms."""
    if q_norm is None:
        return None, None, 1e-6
    return q_norm.weight, k_norm.weight, q_norm.eps


class TritonBackend(AttentionBackend):
    name = "triton"
    needs_packed_prefill = True

    def write_kv_cache(self, kv_cache, k, v, slot_mapping, k_scale=1.0, v_scale=1.0) -> None:
        kernels.write_kv_cache(kv_cache, k, v, slot_mapping, k_scale, v_scale)

    def rope_write_kv_cache(self, kv_cache, q, k, v, slot_mapping, positions, rotary,
                            q_norm=None, k_norm=None, k_scale=1.0, v_scale=1.0):
        """One kernel for q/k norms, neox rotary and the cache write (three to five kernels
        otherwise); other rotary styles and norm variants take the general path."""
        if not _rope_fuses(q, rotary, q_norm, k_norm):
            return super().rope_write_kv_cache(kv_cache, q, k, v, slot_mapping, positions,
                                               rotary, q_norm, k_norm, k_scale, v_scale)
        kernels.rope_write_kv_cache(
            kv_cache, q, k, v, slot_mapping, positions, rotary.cos, rotary.sin,
            rotary.rotary_dim, *_norm_args(q_norm, k_norm), k_scale, v_scale)
        return q

    def rope_attend(self, q, k, v, kv_cache, meta: AttentionMetadata, positions, rotary,
                    q_norm=None, k_norm=None, *, scale: float, sliding_window: int | None,
                    soft_cap: float | None, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> torch.Tensor | None:
        """Decode-only steps with ``PAGEDLLM_DECODE_ROPE=1``: the q/k norms, the rotation and
        the KV write inside the paged decode kernel (``DecodeRope``: one launch fewer a
        layer); None where that does not apply (the caller takes the two-kernel path)."""
        if not (switches().decode_rope and _rope_fuses(q, rotary, q_norm, k_norm)
                and meta.num_decodes == q.shape[0] and not meta.prefills):
            return None
        rope = kernels.DecodeRope(k, v, meta.slot_mapping, positions, rotary.cos, rotary.sin,
                                  rotary.rotary_dim, *_norm_args(q_norm, k_norm))
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return kernels.paged_attention_decode(
            q, kv_cache, meta.decode_block_table, meta.decode_seq_lens, scale=scale,
            block_size=meta.block_size, sliding_window=sliding_window, soft_cap=soft_cap,
            out=out, k_scale=k_scale, v_scale=v_scale, rope=rope)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, *,
               scale: float, sliding_window: int | None, soft_cap: float | None,
               k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        out = torch.empty_like(q)  # [num_tokens, num_heads, head_dim]
        nd = meta.num_decodes
        if nd:
            kernels.paged_attention_decode(
                q[:nd], kv_cache, meta.decode_block_table, meta.decode_seq_lens, scale=scale,
                block_size=meta.block_size, sliding_window=sliding_window, soft_cap=soft_cap,
                out=out[:nd], k_scale=k_scale, v_scale=v_scale)
        if meta.prefills:
            kernels.paged_attention_prefill(
                q[nd:], kv_cache, meta.prefill_block_table, meta.prefill_seq_lens,
                meta.prefill_query_start_loc, scale=scale, block_size=meta.block_size,
                max_query_len=meta.max_prefill_query_len, sliding_window=sliding_window,
                soft_cap=soft_cap, out=out[nd:], k_scale=k_scale, v_scale=v_scale)
        return out
