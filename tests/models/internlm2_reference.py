"""InternLM2's oracle: transformers has no InternLM2 class (the hub checkpoints ship their
own ``modeling_internlm2.py``), so this is a small hand-written torch reference of that
published file's forward, written independently of pagedllm's model code:

- RMSNorm ``attention_norm`` -> ``attention.wqkv`` viewed as ``(kv_heads, q_per_kv + 2,
  head_dim)`` (the file's ``rearrange('b q (h gs d) -> b q h gs d')``): q = the first
  ``q_per_kv`` slots (heads ordered ``(h gs)``), k = slot -2, v = slot -1;
- neox rotary (``rotate_half``) with ``rope_theta``; KV heads repeated ``q_per_kv`` times
  (``repeat_kv``); softmax(q k^T / sqrt(head_dim) + causal mask) v; ``attention.wo``;
- residual; RMSNorm ``ffn_norm``; ``feed_forward.w2(silu(w1(x)) * w3(x))``; residual;
- final ``model.norm``; ``output`` head.
Greedy decoding recomputes the whole sequence each step (no cache: nothing to get wrong).

The tiny checkpoint carries a ``configuration_internlm2.py`` (the config fields the hub file
defines) and an ``auto_map``, as the hub repos do, so it loads with ``--trust-remote-code``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from tests.utils.tiny_models import CACHE_DIR, VOCAB_SIZE, cached_checkpoint

CONFIG = {"vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "hidden_act": "silu", "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
              "bias": True,
              "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
              "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

CONFIG_SOURCE = '''from transformers import PretrainedConfig


class InternLM2Config(PretrainedConfig):
    model_type = "internlm2"

    def __init__(self, vocab_size=103168, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                 hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
                 bias=True, rope_theta=10000, rope_scaling=None, tie_word_embeddings=False,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.bias = bias
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings,
                         **kwargs)
'''


def random_state(config: dict = CONFIG, init_std: float = 0.15) -> dict[str, torch.Tensor]:
    """Seeded weights in the hub checkpoint's names and shapes."""
    g = torch.Generator().manual_seed(0)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads

    def mat(*shape):
        return torch.randn(*shape, generator=g) * init_std

    def vec(n, base=0.0):
        return base + torch.rand(n, generator=g) * 0.4 - 0.2

    state = {"model.tok_embeddings.weight": mat(config["vocab_size"], hidden),
             "model.norm.weight": vec(hidden, 1.0),
             "output.weight": mat(config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state.update({p + "attention.wqkv.weight": mat((heads + 2 * kv) * head_dim, hidden),
                      p + "attention.wo.weight": mat(hidden, hidden),
                      p + "feed_forward.w1.weight": mat(inter, hidden),
                      p + "feed_forward.w3.weight": mat(inter, hidden),
                      p + "feed_forward.w2.weight": mat(hidden, inter),
                      p + "attention_norm.weight": vec(hidden, 1.0),
                      p + "ffn_norm.weight": vec(hidden, 1.0)})
        if config["bias"]:
            state[p + "attention.wqkv.bias"] = vec((heads + 2 * kv) * head_dim)
            state[p + "attention.wo.bias"] = vec(hidden)
    return state


def build_tiny_internlm2(root: Path = CACHE_DIR) -> Path:
    """The checkpoint directory (built once; the name carries a digest of the recipe)."""
    recipe = json.dumps(CONFIG, sort_keys=True) + CONFIG_SOURCE + "|internlm2-v1"
    return cached_checkpoint(root, "internlm2", recipe, _write_checkpoint)


def _write_checkpoint(staging: Path) -> None:
    from safetensors.torch import save_file
    save_file(random_state(), str(staging / "model.safetensors"))
    (staging / "configuration_internlm2.py").write_text(CONFIG_SOURCE)
    config = {**CONFIG, "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
              "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"}}
    (staging / "config.json").write_text(json.dumps(config, indent=1))


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [T, heads, head_dim]: neox rotation at positions 0..T-1 (tables in fp32)."""
    t, _, d = x.shape
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device).float() / d))
    freqs = torch.outer(torch.arange(t, device=x.device).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None].to(x.dtype), emb.sin()[:, None].to(x.dtype)
    rotated = torch.cat((-x[..., d // 2:], x[..., :d // 2]), dim=-1)
    return x * cos + rotated * sin


def _attention(state: dict, p: str, h: torch.Tensor, config: dict) -> torch.Tensor:
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    t, head_dim, group = h.shape[0], config["hidden_size"] // heads, heads // kv
    qkv = F.linear(h, state[p + "attention.wqkv.weight"], state.get(p + "attention.wqkv.bias"))
    qkv = qkv.view(t, kv, group + 2, head_dim)
    q = _rope(qkv[:, :, :group].reshape(t, heads, head_dim), config["rope_theta"])
    k = _rope(qkv[:, :, -2], config["rope_theta"]).repeat_interleave(group, dim=1)
    v = qkv[:, :, -1].repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
    future = torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)
    probs = scores.masked_fill(future, float("-inf")).float().softmax(-1).to(v.dtype)
    out = torch.einsum("hqk,khd->qhd", probs, v).reshape(t, heads * head_dim)
    return F.linear(out, state[p + "attention.wo.weight"], state.get(p + "attention.wo.bias"))


def reference_forward(state: dict, ids: list[int], config: dict = CONFIG) -> torch.Tensor:
    """Logits [len(ids), vocab] at every position of ``ids`` (on the state's device and in
    its dtype; norms in fp32)."""
    eps = config["rms_norm_eps"]
    emb = state["model.tok_embeddings.weight"]
    x = emb[torch.tensor(ids, device=emb.device)]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = x + _attention(state, p, _rms(x, state[p + "attention_norm.weight"], eps), config)
        h = _rms(x, state[p + "ffn_norm.weight"], eps)
        gate = F.silu(F.linear(h, state[p + "feed_forward.w1.weight"]))
        x = x + F.linear(gate * F.linear(h, state[p + "feed_forward.w3.weight"]),
                         state[p + "feed_forward.w2.weight"])
    return F.linear(_rms(x, state["model.norm.weight"], eps), state["output.weight"])


def reference_logits(state: dict, ids: list[int], config: dict = CONFIG) -> torch.Tensor:
    """Next-token logits [vocab] after ``ids``."""
    return reference_forward(state, ids, config)[-1]


def reference_greedy(state: dict, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            ids, new = list(ids), []
            for _ in range(max_tokens):
                new.append(int(reference_logits(state, ids + new).argmax()))
            outputs.append(new)
    return outputs
