"""GGUF files of the tiny test models, written with the ``gguf`` package's ``GGUFWriter``.

Legacy types (Q4_0 .. Q8_0) and F16/BF16/F32 are quantized by ``gguf.quants.quantize``. The
python package cannot quantize K-quants, so ``pack_k`` builds their blocks by hand following
llama.cpp's ``block_q*_K`` layouts (a plain min/max quantizer per sub-block, not llama.cpp's
search); the tests check that ``gguf.quants.dequantize`` reads them back close to the
original weights. Llama's q/k rows are permuted as llama.cpp's converter does (its rotary
pairs adjacent dims); Qwen2 is stored unpermuted.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.utils.tiny_models import VOCAB_SIZE, build_tiny_model

# HF module suffix -> GGUF tensor name part
BLOCK_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _super_scale(sub: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """(fp16-rounded super-scale [n], integer sub-scales [n, subs]) with sub ~= d * code."""
    d = (np.abs(sub).max(-1) / top).astype(np.float16).astype(np.float32)
    d = np.where(d == 0, np.float32(1e-4), d).astype(np.float16).astype(np.float32)
    codes = np.clip(np.rint(sub / d[:, None]), -top, top)
    return d, codes


def _affine(x: np.ndarray, levels: int, top: int):
    """Asymmetric sub-blocks (Q2_K, Q4_K, Q5_K): value = d*sc*q - dmin*m, m >= 0."""
    lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
    d, sc = _super_scale((hi - lo) / levels, top)
    dmin, m = _super_scale(-lo, top)
    step = d[:, None, None] * np.maximum(sc, 1)[..., None]
    offset = (dmin[:, None] * m)[..., None]
    q = np.clip(np.rint((x + offset) / step), 0, levels)
    return d, dmin, np.maximum(sc, 1).astype(np.uint8), m.astype(np.uint8), q.astype(np.uint8)


def _symmetric(x: np.ndarray, low: int, high: int, top: int):
    """Symmetric sub-blocks (Q3_K, Q6_K): value = d*sc*q, q in [low, high]."""
    d, sc = _super_scale(np.abs(x).max(-1) / high, top)
    sc = np.maximum(sc, 1)
    q = np.clip(np.rint(x / (d[:, None, None] * sc[..., None])), low, high)
    return d, sc.astype(np.int8), q.astype(np.int16)


def _planes(q: np.ndarray, width: int, bits: int) -> np.ndarray:
    """[n, k*width*(8/bits)] codes -> [n, k*width] bytes: chunk c of ``width`` bytes holds
    element c*width*(8/bits) + j*width + l at shift j*bits of byte l."""
    per = 8 // bits
    q = q.reshape(q.shape[0], -1, per, width).astype(np.uint8)
    out = np.zeros((q.shape[0], q.shape[1], width), dtype=np.uint8)
    for j in range(per):
        out |= (q[:, :, j] & ((1 << bits) - 1)) << (j * bits)
    return out.reshape(q.shape[0], -1)


def _k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> the 12-byte Q4_K / Q5_K field."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return out


def _high_bits(q: np.ndarray, shift: int) -> np.ndarray:
    """Bit ``shift`` of each of 256 codes -> 32 bytes: element e at bit e // 32 of byte e % 32."""
    bits = ((q.reshape(q.shape[0], 8, 32) >> shift) & 1).astype(np.uint8)
    return np.bitwise_or.reduce(bits << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)


def pack_k(weight: np.ndarray, kind: str) -> np.ndarray:
    """float32 [rows, cols] -> uint8 [rows, cols / 256 * bytes] blocks of ``kind``."""
    rows = weight.shape[0]
    x = weight.reshape(-1, 256).astype(np.float32)
    if kind == "Q2_K":
        d, dmin, sc, m, q = _affine(x.reshape(-1, 16, 16), 3, 15)
        blocks = [(sc & 15) | (m << 4), _planes(q.reshape(-1, 256), 32, 2), _f16(d), _f16(dmin)]
    elif kind in ("Q4_K", "Q5_K"):
        levels = 15 if kind == "Q4_K" else 31
        d, dmin, sc, m, q = _affine(x.reshape(-1, 8, 32), levels, 63)
        q = q.reshape(-1, 256)
        high = [_high_bits(q, 4)] if kind == "Q5_K" else []
        blocks = [_f16(d), _f16(dmin), _k4_scales(sc, m), *high, _planes(q & 15, 32, 4)]
    elif kind == "Q3_K":
        d, sc, q = _symmetric(x.reshape(-1, 16, 16), -4, 3, 31)
        u = (q + 4).reshape(-1, 256).astype(np.uint8)
        v = (sc.astype(np.int16) + 32).astype(np.uint8)                    # 6-bit, offset 32
        low = (v[:, :8] & 15) | ((v[:, 8:] & 15) << 4)
        high = np.zeros((v.shape[0], 4), dtype=np.uint8)
        for i in range(16):
            high[:, i % 4] |= (v[:, i] >> 4) << (2 * (i // 4))
        blocks = [_high_bits(u, 2), _planes(u & 3, 32, 2), low, high, _f16(d)]
    elif kind == "Q6_K":
        d, sc, q = _symmetric(x.reshape(-1, 16, 16), -32, 31, 127)
        u = (q + 32).reshape(-1, 2, 128).astype(np.uint8)
        ql = ((u[:, :, :64] & 15) | ((u[:, :, 64:] & 15) << 4)).reshape(-1, 128)
        qh = _planes((u >> 4).reshape(-1, 256), 32, 2)
        blocks = [ql, qh, sc.view(np.uint8), _f16(d)]
    else:
        raise ValueError(kind)
    return np.concatenate(blocks, axis=1).reshape(rows, -1)


def quantize(weight: np.ndarray, kind: str) -> tuple[np.ndarray, int]:
    """(data for GGUFWriter.add_tensor, GGMLQuantizationType) of a float32 [rows, cols]."""
    import gguf
    qtype = gguf.GGMLQuantizationType[kind]
    if kind.endswith("_K"):
        return pack_k(weight, kind), qtype
    return gguf.quants.quantize(weight.astype(np.float32), qtype), qtype


def permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: within each head, row pairs (i, i + d/2) become adjacent."""
    rest = weight.shape[1:]
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *rest)
            .swapaxes(1, 2).reshape(weight.shape))


def _gguf_name(hf_name: str) -> str | None:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    parts = hf_name.split(".")          # model.layers.N.<module>.<weight|bias>
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{BLOCK_NAMES[module]}.{parts[-1]}" if module in BLOCK_NAMES else None


def _tensor_type(gguf_name: str, types: dict[str, str]) -> str:
    """The type for a tensor: the first ``types`` key that is a substring of its name, else
    ``types['*']``; 1-D tensors (norms, biases) stay F32 as llama.cpp keeps them."""
    for key, kind in types.items():
        if key != "*" and key in gguf_name:
            return kind
    return types["*"]


def _add_metadata(writer, config, tokenizer_dir: Path) -> None:
    import gguf
    from transformers import AutoTokenizer
    arch = config.model_type
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    if arch == "llama":
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    special = set(tok.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for _, i in vocab])
    import json
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_add_bos_token(False)


def tiny_state(arch: str, seed: int = 0):
    """(config, fp32 state dict) of a tiny random ``arch`` 256 wide, so that rows fill the
    K-quants' 256-element blocks; its tokenizer is the tiny models' (``build_tiny_model``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
    base = build_tiny_model(arch)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = cls(vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=512,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                 tie_word_embeddings=arch == "qwen2")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.08)
            else:
                param.add_(torch.randn_like(param) * 0.05)
    state = {k: v for k, v in model.state_dict().items() if "rotary" not in k}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return config, state, base


def write_gguf(arch: str, path: Path, types: dict[str, str]) -> Path:
    """A tiny ``arch`` ("llama" or "qwen2") as a GGUF file; ``types`` maps a substring of
    GGUF tensor names to a type (``"*"``: the rest of the 2-D tensors)."""
    import gguf
    config, state, tokenizer_dir = tiny_state(arch)
    writer = gguf.GGUFWriter(str(path), arch)
    _add_metadata(writer, config, tokenizer_dir)
    for hf_name, tensor in state.items():
        name = _gguf_name(hf_name)
        assert name is not None, hf_name
        data = tensor.to(torch.float32).numpy()
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = config.num_attention_heads if ".attn_q." in name \
                else config.num_key_value_heads
            data = permute_rotary(data, heads)
        if data.ndim == 1:
            writer.add_tensor(name, data)
            continue
        raw, qtype = quantize(data, _tensor_type(name, types))
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
