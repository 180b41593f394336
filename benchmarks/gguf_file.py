"""A GGUF file of a Llama config's shape with random blocks, typed as llama.cpp's Q4_K_M
(for ``quant_bench.py --formats gguf``; decode speed only, the weights are noise).

Q4_K_M's recipe for Llama (llama.cpp ``llama_tensor_get_type``): Q6_K for ``output.weight``
and for ``attn_v`` / ``ffn_down`` in the layers that get more bits (the first and last
eighth, and every third layer between), Q4_K for every other 2-D tensor (``token_embd``
included), F32 for the norms. Blocks are random bytes with their fp16 scales overwritten by
small positive values (random bytes there could be inf or NaN).

    python benchmarks/gguf_file.py benchmarks/configs/llama-3-8b /tmp/llama-q4km.gguf
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

# name -> (elements per block, bytes per block, byte offsets of the fp16 fields)
BLOCKS = {"Q4_K": (256, 144, (0, 2)), "Q6_K": (256, 210, (208,))}


def more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth, and every third in between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_type(name: str, layers: int) -> str:
    if name == "output.weight":
        return "Q6_K"
    if ".attn_v." in name or ".ffn_down." in name:
        return "Q6_K" if more_bits(int(name.split(".")[1]), layers) else "Q4_K"
    return "Q4_K"


def random_blocks(rows: int, cols: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    elements, size, halves = BLOCKS[kind]
    raw = rng.integers(0, 256, (rows, cols // elements, size), dtype=np.uint8)
    for offset in halves:
        scale = (rng.random((rows, cols // elements), dtype=np.float32) * 0.002 + 1e-4)
        raw[:, :, offset:offset + 2] = scale.astype(np.float16).view(np.uint8).reshape(
            rows, cols // elements, 2)
    return raw.reshape(rows, -1)


def shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head = hidden // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head
    out = [("token_embd.weight", (cfg["vocab_size"], hidden)),
           ("output_norm.weight", (hidden,)), ("output.weight", (cfg["vocab_size"], hidden))]
    for i in range(cfg["num_hidden_layers"]):
        out += [(f"blk.{i}.attn_norm.weight", (hidden,)), (f"blk.{i}.ffn_norm.weight", (hidden,)),
                (f"blk.{i}.attn_q.weight", (hidden, hidden)),
                (f"blk.{i}.attn_k.weight", (kv, hidden)), (f"blk.{i}.attn_v.weight", (kv, hidden)),
                (f"blk.{i}.attn_output.weight", (hidden, hidden)),
                (f"blk.{i}.ffn_gate.weight", (inter, hidden)),
                (f"blk.{i}.ffn_up.weight", (inter, hidden)),
                (f"blk.{i}.ffn_down.weight", (hidden, inter))]
    return out


def write(config_dir: str, path: str, seed: int = 0) -> str:
    import gguf
    with open(os.path.join(config_dir, "config.json")) as f:
        cfg = json.load(f)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
    writer.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    layers = cfg["num_hidden_layers"]
    for name, shape in shapes(cfg):
        if len(shape) == 1:
            writer.add_tensor(name, np.ones(shape, dtype=np.float32))
            continue
        kind = tensor_type(name, layers)
        raw = random_blocks(shape[0], shape[1], kind, rng)
        writer.add_tensor(name, raw, raw_shape=raw.shape,
                          raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":
    print(write(sys.argv[1], sys.argv[2]))
