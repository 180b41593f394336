"""Attention metadata built once per step by the model runner and read by every layer.

Batch order contract (set by the runner): the first ``num_decodes`` requests each contribute
exactly one query token and come first in the flattened token dimension; the remaining
requests (prefills, chunked or not, possibly with a prefix-cached context) follow.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pagedllm.distributed import PendingSend
    from pagedllm.worker.lora import LoRABatch


@dataclass
class PrefillSeq:
    token_start: int  # first row of this request in the flattened query tokens
    num_query_tokens: int
    seq_len: int  # context + new tokens
    block_ids: torch.Tensor  # [cdiv(seq_len, block_size)] blocks holding its keys, in order


@dataclass
class AttentionMetadata:
    block_size: int
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's K/V is written
    num_decodes: int
    decode_seq_lens: torch.Tensor | None  # [num_decodes]
    decode_block_table: torch.Tensor | None  # [num_decodes, cdiv(max_decode_seq_len, block_size)]
    prefills: list[PrefillSeq]
    # Packed prefill tensors, built only for backends that want them (``needs_packed_prefill``)
    prefill_block_table: torch.Tensor | None = None  # [num_prefills, max_blocks] int32
    prefill_seq_lens: torch.Tensor | None = None  # [num_prefills] int32
    prefill_query_start_loc: torch.Tensor | None = None  # [num_prefills + 1] int32, from 0
    max_prefill_query_len: int = 0
    _bias_cache: dict = field(default_factory=dict, repr=False)

    def decode_bias(self, sliding_window: int | None) -> torch.Tensor:
        """Additive mask [num_decodes, 1, 1, max_len]: 0 for visible keys, -inf otherwise."""
        key = ("decode", sliding_window)
        if key not in self._bias_cache:
            max_len = self.decode_block_table.shape[1] * self.block_size
            key_pos = torch.arange(max_len, device=self.decode_seq_lens.device)
            seq_lens = self.decode_seq_lens.unsqueeze(1)
            visible = key_pos < seq_lens
            if sliding_window is not None:
                visible &= key_pos >= seq_lens - sliding_window
            self._bias_cache[key] = _to_bias(visible)[:, None, None, :]
        return self._bias_cache[key]

    def prefill_bias(self, idx: int, sliding_window: int | None) -> torch.Tensor:
        """Additive causal mask [num_query_tokens, seq_len] of prefill ``idx``."""
        key = (idx, sliding_window)
        if key not in self._bias_cache:
            seq = self.prefills[idx]
            device = seq.block_ids.device
            q_pos = torch.arange(seq.seq_len - seq.num_query_tokens, seq.seq_len, device=device)
            k_pos = torch.arange(seq.seq_len, device=device)
            visible = k_pos[None, :] <= q_pos[:, None]
            if sliding_window is not None:
                visible &= k_pos[None, :] > q_pos[:, None] - sliding_window
            self._bias_cache[key] = _to_bias(visible)
        return self._bias_cache[key]


def _to_bias(visible: torch.Tensor) -> torch.Tensor:
    bias = torch.zeros(visible.shape, dtype=torch.float32, device=visible.device)
    return bias.masked_fill_(~visible, float("-inf"))


class AttentionBackend:
    """How a layer writes K/V and attends. ``TorchRefBackend`` (CPU, and the oracle) and
    ``TritonBackend`` (CUDA) implement it; ``get_attn_backend`` picks one per device."""

    name = "abstract"
    needs_packed_prefill = False  # runner must fill AttentionMetadata.prefill_* tensors

    def rope_attend(self, q, k, v, kv_cache, meta, positions, rotary, q_norm=None,
                    k_norm=None, **attend_kwargs):
        """Attention of a step whose q / k are not yet rotated, with the rotation and the KV
        write done inside, where a backend has such a kernel; None otherwise (the layer then
        calls ``rope_write_kv_cache`` and ``attend``)."""
        return None

    def write_kv_cache(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       slot_mapping: torch.Tensor, k_scale: float = 1.0,
                       v_scale: float = 1.0) -> None:
        """Store K/V at ``slot_mapping`` (an fp8 cache stores k / k_scale, v / v_scale)."""
        raise NotImplementedError

    def rope_write_kv_cache(self, kv_cache: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, slot_mapping: torch.Tensor,
                            positions: torch.Tensor, rotary, q_norm=None, k_norm=None,
                            k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """q/k norms (Qwen3), the rotary embedding, then ``write_kv_cache``; returns the
        query to attend with. q [num_tokens, num_heads, head_dim], k/v [num_tokens,
        num_kv_heads, head_dim]. A backend may do all of it in one kernel."""
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        q, k = rotary(positions, q, k)
        self.write_kv_cache(kv_cache, k, v, slot_mapping, k_scale, v_scale)
        return q

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, *,
               scale: float, sliding_window: int | None, soft_cap: float | None,
               k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        raise NotImplementedError


def get_attn_backend(device: torch.device) -> AttentionBackend:
    """Triton kernels on CUDA when Triton imports, else the plain PyTorch reference."""
    if device.type == "cuda":
        try:
            from pagedllm.attention.triton_backend import TritonBackend
            return TritonBackend()
        except ImportError:
            pass
    from pagedllm.attention.torch_ref import TorchRefBackend
    return TorchRefBackend()


@dataclass
class ForwardContext:
    """What a forward pass needs besides token ids and positions; passed down explicitly."""

    attn_metadata: AttentionMetadata
    # layer index -> [2, num_blocks * block_size, num_kv_heads, head_dim] (an MLA model's:
    # [1, slots, 1, latent_dim], see cache_spec.py): this pipeline stage's layers (a dict),
    # or a list of every layer
    kv_caches: dict[int, torch.Tensor] | list[torch.Tensor]
    backend: AttentionBackend | None = None  # None: the PyTorch reference
    kv_scales: list[tuple[float, float]] | None = None  # per layer (k, v) of an fp8 cache
    # prompt adapters: (rows [n], embeddings [n, hidden]) that replace those rows' token
    # embeddings (the first stage applies them; see pagedllm/worker/prompt_adapter.py)
    embed_overrides: tuple[torch.Tensor, torch.Tensor] | None = None
    # --enable-lora: which rows use which LoRA slot (pagedllm/worker/lora.py); the layers
    # pass it to their LoRA-capable projections. None: no row has an adapter
    lora: LoRABatch | None = None
    # out: the sends to the next pipeline stage this forward started (send_to_next_stage);
    # the runner waits for them when the step is sampled
    sends: list[PendingSend] = field(default_factory=list)
