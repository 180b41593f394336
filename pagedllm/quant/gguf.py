"""GGUF files (llama.cpp): ``--model /path/model.gguf`` with ``--load-format gguf``.

As in vLLM 0.6.3, a ``--model`` that is a local ``.gguf`` file (or a file starting with the
``GGUF`` magic) selects ``--load-format gguf`` and ``--quantization gguf`` by itself. The
config and tokenizer come from the file's metadata through transformers' GGUF support
(``from_pretrained(dir, gguf_file=name)``); the tensors are read with the ``gguf`` package's
``GGUFReader`` (memory-mapped), renamed to the Hugging Face names the models load, and
handled by ``gguf_dequant`` (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, Q2_K..Q6_K, F16/BF16/F32). A linear
layer whose checkpoint parts (q/k/v, gate/up) all have one block type keeps its blocks as
they are (``GGUFLinearMethod``: uint8 [out, blocks per row, block bytes], dequantized per
call by the torch reference), so it takes the file's memory; a layer mixing types (a
Q4_K_M q/k/v: Q4_K and Q6_K), F16/BF16/F32 tensors and the embeddings / LM head are
dequantized at load into the model's dtype. llama.cpp stores Llama's q/k rows permuted for
its rotary layout; they are put back in Hugging Face order here (rows are whole blocks).

Architectures: llama (and Mistral, which llama.cpp writes as llama), qwen2.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pagedllm.quant.base import FUSED_PARTS, LinearMethod, QuantConfig, make_param
from pagedllm.quant.gguf_dequant import TYPES, dequantize
from pagedllm.quant.gptq import matmul_dequantized
from pagedllm.quant.kernels import triton_gguf_for

logger = logging.getLogger(__name__)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}
_FIXED = {"token_embd.weight": "model.embed_tokens.weight",
          "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
          "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
# llama.cpp's precomputed Llama-3 rotary factors: the rotary embedding derives them from
# the config's rope scaling, as transformers does
_DERIVED = ("rope_freqs.weight",)


def is_gguf_file(path: str | None) -> bool:
    """A local file named ``*.gguf`` or starting with the GGUF magic (vLLM 0.6.3's test)."""
    if not path or not Path(path).expanduser().is_file():
        return False
    file = Path(path).expanduser()
    if file.suffix == ".gguf":
        return True
    with open(file, "rb") as f:
        return f.read(4) == b"GGUF"


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ValueError("--load-format gguf needs the gguf package (pip install gguf, or "
                         "pip install 'pagedllm[gguf]')") from exc


def load_gguf_config(path: str, model: str) -> Any:
    """The config of the GGUF file at ``path`` from its metadata, through transformers, as
    plain data (`models.plain_config`, as ``load_hf_config`` returns it)."""
    from pagedllm.models.plain_config import to_plain
    import transformers
    _require_gguf_package()
    file = Path(path)
    try:
        config = transformers.AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"--model {model}: could not read the GGUF metadata ({exc})") from exc
    arch = config.model_type
    if arch not in ARCHITECTURES:
        raise ValueError(f"--model {model}: GGUF architecture {arch!r} is not supported; "
                         f"supported: {', '.join(ARCHITECTURES)}")
    if not getattr(config, "architectures", None):
        config.architectures = [ARCHITECTURES[arch]]
    return to_plain(config)


def hf_name(name: str) -> str | None:
    """The Hugging Face tensor name of a GGUF tensor name (None: not a known tensor)."""
    if name in _FIXED:
        return _FIXED[name]
    match = _BLOCK_RE.match(name)
    if match is None or match.group(2) not in _BLOCK:
        return None
    layer, module, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK[module]}.{kind}"


def unpermute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: within each head, its adjacent row pairs
    (2i, 2i + 1) go back to (i, i + head_dim / 2)."""
    rows = weight.shape[0]
    return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def _torch_shape(tensor: Any) -> tuple[int, ...]:
    """GGUF lists dims innermost first; torch wants rows first."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _tensor(tensor: Any, keep: bool) -> torch.Tensor:
    """One ``ReaderTensor``: float32 values, or with ``keep`` its blocks as uint8 [rows,
    blocks per row, block bytes]."""
    type_id = int(tensor.tensor_type)
    raw = torch.from_numpy(tensor.data.reshape(-1).view("uint8").copy())
    shape = _torch_shape(tensor)
    if keep:
        _, elements, size = TYPES[type_id]
        return raw.reshape(shape[0], shape[-1] // elements, size)
    return dequantize(raw, type_id, shape, tensor.name)


def iterate_gguf_weights(path: str, hf_config: Any, quant_config: QuantConfig | None = None
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) of every tensor of the GGUF file: float32, or raw blocks
    for the modules ``quant_config`` (a ``GGUFConfig``) keeps quantized."""
    from gguf import GGUFReader
    _require_gguf_package()
    reader = GGUFReader(path)
    permuted = hf_config.model_type in ("llama", "mistral")
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            if tensor.name in _DERIVED:
                logger.info("gguf: %s skipped (derived from the config's rope scaling)",
                            tensor.name)
                continue
            raise ValueError(f"GGUF tensor {tensor.name!r} of {path} has no counterpart in "
                             f"{hf_config.model_type} models; this file cannot be loaded")
        keep = isinstance(quant_config, GGUFConfig) and quant_config.kept(name)
        weight = _tensor(tensor, keep)
        if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = hf_config.num_attention_heads if "q_proj" in name \
                else hf_config.num_key_value_heads
            weight = unpermute_rotary(weight, heads)
        yield name, weight


# block types a linear layer keeps as they are (the float types are dequantized at load)
_BLOCK_TYPES = {k for k, (_, elements, _) in TYPES.items() if elements > 1}


class GGUFConfig(QuantConfig):
    """Which linear layers keep their GGUF blocks: ``types`` maps each 2-D weight's module
    name (Hugging Face) to its GGML type."""
    name = "gguf"

    def __init__(self, types: dict[str, int]) -> None:
        super().__init__()
        self.types = types

    @classmethod
    def from_file(cls, path: str) -> GGUFConfig:
        from gguf import GGUFReader
        types = {}
        for tensor in GGUFReader(path).tensors:
            name = hf_name(tensor.name)
            if name is not None and name.endswith(".weight") and len(tensor.shape) == 2:
                types[name[:-len(".weight")]] = int(tensor.tensor_type)
        config = cls(types)
        logger.info("quantization: gguf %s (%s): %s", path, type_summary(path),
                    config.describe())
        return config

    def _type_of(self, prefix: str) -> int | None:
        """The block type every checkpoint part of decoder module ``prefix`` shares, else
        None (the embeddings and LM head are not linear layers here: dequantized)."""
        if ".layers." not in prefix:
            return None
        head, _, leaf = prefix.rpartition(".")
        names = [f"{head}.{p}" for p in FUSED_PARTS[leaf]] if leaf in FUSED_PARTS else [prefix]
        found = {self.types.get(n) for n in names}
        kind = found.pop() if len(found) == 1 else None
        return kind if kind in _BLOCK_TYPES else None

    def kept(self, tensor_name: str) -> bool:
        """Whether the checkpoint weight ``tensor_name`` loads as raw blocks."""
        if not tensor_name.endswith(".weight"):
            return False
        module = tensor_name[:-len(".weight")]
        head, _, leaf = module.rpartition(".")
        fused = next((f for f, parts in FUSED_PARTS.items() if leaf in parts), None)
        return self._type_of(f"{head}.{fused}" if fused else module) is not None

    def method_for(self, prefix: str) -> LinearMethod:
        from pagedllm.quant.unquantized import UNQUANTIZED
        kind = self._type_of(prefix)
        return UNQUANTIZED if kind is None else GGUFLinearMethod(kind)

    def quantized_method(self) -> LinearMethod:
        raise NotImplementedError("GGUF picks a method per module (method_for)")

    def describe(self) -> str:
        kept = sum(1 for k in self.types.values() if k in _BLOCK_TYPES)
        return f"gguf ({kept} block-quantized weights; mixed-type fused layers dequantized)"


class GGUFLinearMethod(LinearMethod):
    """A linear layer holding GGML blocks of one type. On CUDA, for Q4_K / Q5_K / Q6_K / Q8_0
    (``triton_gguf``): one row through the GEMV, more dequantized by one launch then cuBLAS;
    else dequantized per call by the torch reference."""
    name = "gguf"

    def __init__(self, type_id: int) -> None:
        self.type_id = type_id
        self.kind, self.elements, self.size = TYPES[type_id]

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       dtype: torch.dtype) -> None:
        if input_size % self.elements:
            raise ValueError(f"GGUF layer {layer.prefix!r} ({self.kind}): this rank's input size "
                             f"{input_size} does not fill whole blocks of {self.elements} "
                             "(--tensor-parallel-size)")
        layer.weight = make_param(
            torch.empty(sum(output_sizes), input_size // self.elements, self.size,
                        dtype=torch.uint8),
            output_dim=0, input_dim=1, input_div=self.elements)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
              gated_silu: bool = False) -> torch.Tensor:
        kernels = triton_gguf_for(x, self.kind)
        if kernels is not None and x.dim() == 2 and x.shape[0] == 1:
            return kernels.gemv(x, layer.weight, self.kind, bias, gated_silu)
        if kernels is not None:
            weight = kernels.dequantize(layer.weight, self.kind, x.dtype)
        else:
            rows, blocks, _ = layer.weight.shape
            weight = dequantize(layer.weight, self.type_id, (rows, blocks * self.elements))
        return matmul_dequantized(x, weight.t(), bias, gated_silu)


def type_summary(path: str) -> str:
    """``Q4_K x 12, Q6_K x 2, ...``: the file's tensor types, for the start-up log."""
    from gguf import GGUFReader
    counts: dict[str, int] = {}
    for tensor in GGUFReader(path).tensors:
        kind = TYPES.get(int(tensor.tensor_type), (f"type {int(tensor.tensor_type)}",))[0]
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{k} x {n}" for k, n in sorted(counts.items()))


def resolve_gguf_flags(v: dict[str, Any]) -> str | None:
    """The GGUF file ``--model`` names (None: not a GGUF model), after checking the flags
    that go with it: ``--load-format`` auto or gguf, ``--quantization`` unset or gguf.
    Sets both to gguf, as vLLM 0.6.3 does."""
    model = v["model"]
    if not is_gguf_file(model):
        if v["load_format"] == "gguf":
            raise ValueError(f"--load-format gguf needs --model to be a local .gguf file; "
                             f"{model!r} is not one")
        return None
    if v["load_format"] not in ("auto", "gguf"):
        raise ValueError(f"--model {model} is a GGUF file; --load-format {v['load_format']} "
                         "cannot read it: drop the flag or pass --load-format gguf")
    if v["quantization"] not in (None, "gguf"):
        raise ValueError(f"--model {model} is a GGUF file; --quantization {v['quantization']} "
                         "does not apply to it: drop the flag or pass --quantization gguf")
    _require_gguf_package()
    v["load_format"], v["quantization"] = "gguf", "gguf"
    return str(Path(model).expanduser().resolve())
