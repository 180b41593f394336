"""EXAONE 3.0 / 3.5 (LGAI-EXAONE/EXAONE-3.*): Llama's decoder under GPT-2-style names.

The computation is Llama's (RMSNorm, GQA, SwiGLU MLP, rotary with llama3 scaling in 3.5);
what differs is the checkpoint and config vocabulary, mapped on load:
- ``transformer.wte`` / ``transformer.h.N`` / ``transformer.ln_f`` are the embedding,
  layers and final norm; ``ln_1`` / ``ln_2`` the norms before attention / the MLP;
- ``attn.attention.{q,k,v,out}_proj`` the attention projections;
- ``mlp.c_fc_0`` (gate), ``mlp.c_fc_1`` (up), ``mlp.c_proj`` (down);
- the hub's remote-code config names ``layer_norm_epsilon`` and ``activation_function``
  (transformers' own ``ExaoneConfig`` maps them to ``rms_norm_eps`` / ``hidden_act``).
Checkpoints already in Llama names (transformers' in-memory layout) load too. Quantized
checkpoints' per-module rules are matched against the Llama names of the fused layers.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Iterable

import torch

from pagedllm.models.llama import STACKED, LlamaForCausalLM
from pagedllm.models.utils import load_weights, tie_or_skip

_RENAMES = [(re.compile(pattern), new) for pattern, new in (
    (r"^transformer\.wte\.", "model.embed_tokens."),
    (r"^transformer\.h\.", "model.layers."),
    (r"^transformer\.ln_f\.", "model.norm."),
    (r"\.attn\.attention\.", ".self_attn."),
    (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."),
    (r"\.ln_1\.", ".input_layernorm."),
    (r"\.ln_2\.", ".post_attention_layernorm."),
    (r"\.mlp\.c_fc_0\.", ".mlp.gate_proj."),
    (r"\.mlp\.c_fc_1\.", ".mlp.up_proj."),
    (r"\.mlp\.c_proj\.", ".mlp.down_proj."))]


def _rename(name: str) -> str:
    for pattern, new in _RENAMES:
        name = pattern.sub(new, name)
    return name


def _llama_config(config):
    """A copy of ``config`` with the Llama attribute names the layers read."""
    config = copy.copy(config)
    for llama_name, exaone_name in (("rms_norm_eps", "layer_norm_epsilon"),
                                    ("hidden_act", "activation_function")):
        if getattr(config, llama_name, None) is None:
            setattr(config, llama_name, getattr(config, exaone_name))
    return config


class ExaoneForCausalLM(LlamaForCausalLM):
    supports_quantization = True

    def __init__(self, config, max_position: int, quant_config=None) -> None:
        super().__init__(_llama_config(config), max_position, quant_config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_weights(self, weights, STACKED, tie_or_skip(self.tie_word_embeddings),
                            rename=_rename)
