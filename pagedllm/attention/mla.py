"""Multi-head latent attention (DeepSeek-V2/V3) over the compressed paged cache, in PyTorch.

The cache (``cache_spec.py``: ``[1, num_slots, 1, kv_lora_rank + qk_rope_head_dim]`` per
layer) holds, per token, the normalised KV latent ``c`` (``kv_lora_rank``) and the rotated
shared rope key ``k_pe`` (``qk_rope_head_dim``) — one "head" for all query heads, instead of
``2 * num_heads * head_dim`` expanded K/V values. Per head h, with ``W_UK[h]`` / ``W_UV[h]``
the key / value rows of ``kv_b_proj``:

    k[s, h] = [W_UK[h] c_s ; k_pe_s]      v[s, h] = W_UV[h] c_s

- prefill (``mla_prefill``): expand each request's cached latents into per-head K/V through
  ``kv_b_proj`` and run causal attention (many queries share each expansion);
- decode (``mla_decode``): the absorbed form, which never expands the cache. Since
  ``q_nope . W_UK c = (W_UK^T q_nope) . c``, the query is absorbed through ``W_UK`` into the
  latent space (``absorb_query``), attention runs as multi-query attention over the latent
  cache itself (keys ``[c ; k_pe]``, values ``c``), and the per-head result goes out through
  ``W_UV`` (``unabsorb_output``). Same maths as the expanded form (sums reassociated).

Both run on any device (plain PyTorch) and read the same metadata as ``torch_ref.py``. On
CUDA with the fused ops (``layers/fused.py``) the decode attention over the latent cache and
the latent write are Triton kernels (``triton_mla.py``), with the PyTorch code here as their
oracle (``mla_decode_attention_ref``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.layers import fused


def _kernels(x: torch.Tensor):
    """``triton_mla`` when the fused Triton ops serve ``x`` (a CUDA tensor, Triton imports,
    ``PAGEDLLM_DISABLE_FUSED_OPS`` unset), else None: the PyTorch code here runs."""
    if not fused.use(x):
        return None
    from pagedllm.attention import triton_mla
    return triton_mla


def kernels_serve(device: torch.device) -> bool:
    """Whether the Triton MLA kernels serve tensors on ``device`` (decode attention and the
    latent write: no host syncs, slot -1 skipped, so CUDA graphs can capture the step)."""
    return device.type == "cuda" and fused.ops() is not None


def write_latent(cache: torch.Tensor, latent: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Store ``latent`` [num_tokens, latent_dim] (``[c ; k_pe]``) at ``slot_mapping``. On
    CUDA with the fused ops one Triton launch that skips slots < 0 (CUDA-graph padding)."""
    kernels = _kernels(latent)
    if kernels is not None:
        kernels.write_latent(cache, latent, slot_mapping)
        return
    cache[0].index_copy_(0, slot_mapping, latent.unsqueeze(1).to(cache.dtype))


def _blocks(cache: torch.Tensor, block_size: int) -> torch.Tensor:
    return cache[0].view(-1, block_size, cache.shape[-1])  # [num_blocks, block_size, D]


def gather_latent(cache: torch.Tensor, block_ids: torch.Tensor, block_size: int,
                  length: int) -> torch.Tensor:
    """The first ``length`` cached latents of one request, [length, latent_dim]."""
    return _blocks(cache, block_size).index_select(0, block_ids).flatten(0, 1)[:length]


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """q_nope [T, H, nope], W_UK [H, nope, r] -> W_UK^T q_nope [T, H, r]."""
    return torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)


def unabsorb_output(o_latent: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """o_latent [T, H, r], W_UV [H, v, r] -> W_UV o_latent [T, H, v]."""
    return torch.bmm(o_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)


def mla_decode_attention_ref(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                             seq_lens: torch.Tensor, *, scale: float, block_size: int,
                             kv_lora_rank: int,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """The absorbed attention in PyTorch (the CPU path and the oracle of
    ``triton_mla.mla_decode_attention``, same arguments): q [nd, H, r + rope] over every
    sequence's gathered latents, keys ``[c ; k_pe]``, values ``c`` -> [nd, H, r]; rows with
    seq_len 0 give zeros. ``bias``: the additive key mask [nd, 1, 1, L] when the caller has
    it (``AttentionMetadata.decode_bias``)."""
    nd, dim = q.shape[0], cache.shape[-1]
    kv = _blocks(cache, block_size).index_select(0, block_table.flatten().long())
    kv = kv.view(nd, 1, -1, dim).to(q.dtype)  # [nd, 1, L, r + rope]
    if bias is None:
        visible = torch.arange(kv.shape[2], device=q.device) < seq_lens.unsqueeze(1)
        bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(
            ~visible, float("-inf"))[:, None, None, :]
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kv, kv[..., :kv_lora_rank],
                                       attn_mask=bias.to(q.dtype), scale=scale,
                                       enable_gqa=True).squeeze(2)  # [nd, H, r]
    return torch.where((seq_lens > 0)[:, None, None], o, torch.zeros_like(o))


def mla_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
               meta: AttentionMetadata, w_uk: torch.Tensor, w_uv: torch.Tensor,
               scale: float) -> torch.Tensor:
    """The first ``meta.num_decodes`` rows (one query token each), absorbed:
    q_nope [nd, H, nope], q_pe [nd, H, rope] -> [nd, H, v]. The attention over the latent
    cache is ``triton_mla.mla_decode_attention`` on CUDA with the fused ops, else
    ``mla_decode_attention_ref``."""
    rank = w_uk.shape[-1]
    q = torch.cat([absorb_query(q_nope, w_uk), q_pe], dim=-1)  # [nd, H, r + rope]
    kernels = _kernels(q)
    attend = kernels.mla_decode_attention if kernels is not None else mla_decode_attention_ref
    extra = {} if kernels is not None else {"bias": meta.decode_bias(None)}
    o = attend(q, cache, meta.decode_block_table, meta.decode_seq_lens, scale=scale,
               block_size=meta.block_size, kv_lora_rank=rank, **extra)
    return unabsorb_output(o, w_uv)


def mla_prefill(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                expand: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                out: torch.Tensor, scale: float) -> None:
    """The prefill rows of ``q`` [num_tokens, H, nope + rope] into ``out`` [num_tokens, H, v]:
    per request, its context's latents (cached ones and this chunk's, already written) are
    expanded by ``expand(latent [S, D]) -> (k [S, H, nope + rope], v [S, H, v])`` and
    attended causally."""
    for idx, seq in enumerate(meta.prefills):
        rows = slice(seq.token_start, seq.token_start + seq.num_query_tokens)
        latent = gather_latent(cache, seq.block_ids, meta.block_size, seq.seq_len)
        k, v = expand(latent.to(q.dtype))
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=meta.prefill_bias(idx, None).to(q.dtype), scale=scale)
        out[rows] = o.squeeze(0).transpose(0, 1)
