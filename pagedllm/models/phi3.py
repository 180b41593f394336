"""Phi-3 (microsoft/Phi-3-*): Llama's module tree with projections fused in the checkpoint.

What differs from Llama:
- the checkpoint already stores ``qkv_proj`` (q|k|v) and ``gate_up_proj`` (gate|up) fused,
  so they load whole through the fused layers' loaders (no stacked mapping is needed, but
  llama.py's is harmless and also accepts split checkpoints);
- rotary may be partial (``partial_rotary_factor``) and may use ``longrope`` scaling with
  ``original_max_position_embeddings``; both are handled by ``layers/rotary.get_rope``;
- ``sliding_window`` from the config applies to every layer (Phi-3-mini-4k has one).
"""
from __future__ import annotations

from pagedllm.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    supports_quantization = True
