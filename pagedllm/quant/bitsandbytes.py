"""bitsandbytes: pre-quantized 4-bit (NF4 / FP4) and 8-bit (LLM.int8) checkpoints as
transformers saves them, and 4-bit NF4 quantization of a dense checkpoint at load
(``--quantization bitsandbytes --load-format bitsandbytes``, as vLLM 0.6.3).

4-bit tensors of a module, as ``save_pretrained`` writes them: ``weight`` uint8 (two codes a
byte, the first in the high nibble, over the row-major flattened [out, in]),
``weight.absmax`` (one scale per ``blocksize`` = 64 elements; with double quantization uint8
codes into ``weight.nested_quant_map`` times ``weight.nested_absmax`` per 256 scales plus the
``nested_offset``), ``weight.quant_map`` (the 16-value NF4 / FP4 codebook) and
``weight.quant_state.bitsandbytes__<type>`` (JSON: type, blocksize, shape, nested fields). The
checkpoint stream (``checkpoint_stream``) turns each such group into ``weight`` [out, in/2],
``weight_absmax`` [out, in/64] float32 and ``weight_code`` [16], so rows and blocks shard and
fuse like any other tensor. W = code[q] * absmax[block].

8-bit tensors: ``weight`` int8 [out, in], ``SCB`` [out] (each row's absmax) and
``weight_format`` (0: row-major, the only layout transformers writes). ``apply`` follows
LLM.int8 as bitsandbytes runs it: activation columns holding a value >= ``llm_int8_threshold``
multiply the dequantized weight (W = q * SCB / 127) in full precision; the rest is quantized
per row to int8 (absmax / 127) and multiplied with the int8 weight.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from pagedllm.quant.base import FUSED_PARTS, LinearMethod, QuantConfig, make_param
from pagedllm.quant.gptq import epilogue, matmul_dequantized
from pagedllm.quant.kernels import triton_nf4_for
from pagedllm.quant.unquantized import new_weight, tag_dense

logger = logging.getLogger(__name__)

BLOCKSIZE = 64  # elements per absmax (transformers' and vLLM's bitsandbytes default)
_STATE = ".quant_state.bitsandbytes__"
INV_127, INV_127_SQ = 1.0 / 127.0, 1.0 / (127.0 * 127.0)
_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


class BitsAndBytesConfig(QuantConfig):
    """``bits`` 4 or 8; ``prequantized``: the checkpoint holds bitsandbytes tensors (else
    dense weights quantized to NF4 at load)."""
    name = "bitsandbytes"

    def __init__(self, bits: int, quant_type: str = "nf4", prequantized: bool = True,
                 threshold: float = 6.0, skip_rules: list[str] | None = None) -> None:
        super().__init__([_component_rule(r) for r in skip_rules or []])
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bitsandbytes bnb_4bit_quant_type {quant_type!r} is not supported "
                             "(quantization_config.bnb_4bit_quant_type); supported: nf4, fp4")
        self.bits, self.quant_type, self.prequantized = bits, quant_type, prequantized
        self.threshold = threshold

    targets: list[str] | str | None = None  # QLoRA adapter target_modules (at-load only)

    def method_for(self, prefix: str) -> LinearMethod:
        """Skip rules first; with a QLoRA adapter, modules it does not target stay dense."""
        from pagedllm.quant.unquantized import UNQUANTIZED
        method = super().method_for(prefix)
        if self.targets is None or method is UNQUANTIZED:
            return method
        head, _, leaf = prefix.rpartition(".")
        names = [f"{head}.{p}" for p in FUSED_PARTS[leaf]] if leaf in FUSED_PARTS else [prefix]
        hits = [_targeted(self.targets, n) for n in names]
        if any(hits) and not all(hits):
            raise ValueError(f"--qlora-adapter-name-or-path: the adapter's target_modules "
                             f"cover only some of {[n.rpartition('.')[2] for n in names]} in "
                             f"{head!r}; pagedllm fuses them into one layer, quantized as one: "
                             "target all of them or none")
        return method if all(hits) else UNQUANTIZED

    def quantized_method(self) -> LinearMethod:
        if self.bits == 8:
            return BnB8bitLinearMethod(self.threshold)
        if self.prequantized:
            return BnB4bitLinearMethod()
        return BnB4bitOnLoadLinearMethod()

    def describe(self) -> str:
        if self.bits == 8:
            return f"bitsandbytes 8-bit (LLM.int8, threshold {self.threshold})"
        source = "checkpoint" if self.prequantized else "quantized at load"
        targets = f", QLoRA target_modules {self.targets}" if self.targets is not None else ""
        return f"bitsandbytes 4-bit {self.quant_type} ({source}), blocksize {BLOCKSIZE}{targets}"

    def checkpoint_stream(self, weights: Iterable[tuple[str, torch.Tensor]]
                          ) -> Iterator[tuple[str, torch.Tensor]]:
        if self.bits == 8:
            return _eight_bit_stream(weights)
        if self.prequantized:
            return _four_bit_stream(weights, self.quant_type)
        return iter(weights)


def _targeted(targets: list[str] | str, name: str) -> bool:
    """PEFT's target_modules rule: a regex string must match the whole module name; a list
    entry must equal the name or its dotted suffix; ``all-linear`` targets every layer."""
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_qlora_targets(config: QuantConfig | None, adapter_dir: str, name: str) -> None:
    """Restrict at-load quantization to the adapter's ``target_modules``
    (``adapter_config.json``); a pre-quantized checkpoint keeps its own quantized modules."""
    path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--qlora-adapter-name-or-path {name}: no adapter_config.json in "
                         f"{adapter_dir}")
    with open(path) as f:
        targets = json.load(f).get("target_modules")
    if not targets:
        raise ValueError(f"--qlora-adapter-name-or-path {name}: adapter_config.json has no "
                         "target_modules")
    assert isinstance(config, BitsAndBytesConfig)
    if config.prequantized:
        logger.info("--qlora-adapter-name-or-path: the checkpoint is already quantized; its "
                    "quantized modules are used as saved")
        return
    config.targets = targets if isinstance(targets, str) else list(targets)


def _component_rule(rule: str) -> str:
    """``llm_int8_skip_modules`` entries match whole dotted components of a module name: a
    component (``mlp``, vLLM 0.6.3), a suffix (``down_proj``) or a leading path
    (``model.layers.0``, transformers 5)."""
    return rf"re:(?:.*\.)?{re.escape(rule)}(?:\..*)?$"


def from_checkpoint(quant: dict) -> BitsAndBytesConfig:
    """The config of a transformers bitsandbytes ``quantization_config``."""
    four, eight = bool(quant.get("load_in_4bit")), bool(quant.get("load_in_8bit"))
    if four == eight:
        raise ValueError("bitsandbytes quantization_config must set exactly one of load_in_4bit"
                         " and load_in_8bit")
    storage = quant.get("bnb_4bit_quant_storage", "uint8")
    if four and storage not in (None, "uint8"):
        raise ValueError(f"bitsandbytes bnb_4bit_quant_storage {storage!r} is not supported "
                         "(quantization_config.bnb_4bit_quant_storage); supported: uint8")
    if eight and quant.get("llm_int8_has_fp16_weight"):
        raise ValueError("bitsandbytes llm_int8_has_fp16_weight true (quantization_config) is "
                         "a training layout; supported: false")
    return BitsAndBytesConfig(4 if four else 8, str(quant.get("bnb_4bit_quant_type", "fp4")),
                              threshold=float(quant.get("llm_int8_threshold", 6.0)),
                              skip_rules=list(quant.get("llm_int8_skip_modules") or []))


# ---- 4 bit --------------------------------------------------------------------------------

def _state_of(tensors: dict[str, torch.Tensor]) -> dict | None:
    for key, value in tensors.items():
        if key.startswith(_STATE):
            return json.loads(bytes(value.reshape(-1).tolist()).decode())
    return None


def _absmax(state: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each block's float32 scale (double quantization decoded)."""
    absmax = tensors[".absmax"].reshape(-1)
    if "nested_blocksize" not in state:
        return absmax.float()
    nested = tensors[".nested_absmax"].reshape(-1).float()
    codes = tensors[".nested_quant_map"].float()[absmax.long()]
    index = torch.arange(absmax.numel()) // int(state["nested_blocksize"])
    return codes * nested[index] + float(state["nested_offset"])


def _unpack_4bit(module: str, tensors: dict[str, torch.Tensor], quant_type: str
                 ) -> list[tuple[str, torch.Tensor]]:
    """One module's bitsandbytes 4-bit tensors -> weight / weight_absmax / weight_code."""
    state = _state_of(tensors)
    needed = ["", ".absmax", ".quant_map"]
    if state and "nested_blocksize" in state:
        needed += [".nested_absmax", ".nested_quant_map"]
    missing = [module + ".weight" + s for s in needed if s not in tensors]
    if state is None or missing:
        raise ValueError(f"bitsandbytes 4-bit checkpoint: {module}.weight is incomplete, "
                         f"missing {missing or [module + '.weight' + _STATE + quant_type]}")
    out, inp = (int(d) for d in state["shape"])
    if state.get("quant_type") != quant_type or int(state["blocksize"]) != BLOCKSIZE \
            or inp % BLOCKSIZE:
        raise ValueError(f"bitsandbytes tensor {module}.weight: quant_type "
                         f"{state.get('quant_type')!r}, blocksize {state['blocksize']}, shape "
                         f"{state['shape']}; supported: the config's {quant_type}, blocksize "
                         f"{BLOCKSIZE}, rows a multiple of {BLOCKSIZE}")
    packed = tensors[""].reshape(out, inp // 2)
    absmax = _absmax(state, tensors).reshape(out, inp // BLOCKSIZE)
    return [(module + ".weight", packed), (module + ".weight_absmax", absmax),
            (module + ".weight_code", tensors[".quant_map"].float().reshape(16))]


def _split_4bit_name(name: str) -> tuple[str, str] | None:
    """(module, suffix after ``.weight``) of a bitsandbytes 4-bit tensor name, else None."""
    head, sep, tail = name.rpartition(".weight")
    if not sep or (tail and not (tail in _SUFFIXES or tail.startswith(_STATE))):
        return None
    return head, tail


def _four_bit_stream(weights: Iterable[tuple[str, torch.Tensor]], quant_type: str
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Dense tensors pass through; each module's 4-bit group is emitted once complete."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        split = _split_4bit_name(name)
        if split is None or (split[1] == "" and tensor.dtype != torch.uint8):
            yield name, tensor
            continue
        module, suffix = split
        group = groups.setdefault(module, {})
        group[suffix] = tensor
        state = _state_of(group)
        nested = state is not None and "nested_blocksize" in state
        if state is not None and all(s in group for s in ("", ".absmax", ".quant_map")) and (
                not nested or all(s in group for s in _SUFFIXES[2:])):
            yield from _unpack_4bit(module, groups.pop(module), quant_type)
    for module, group in groups.items():
        yield from _unpack_4bit(module, group, quant_type)  # raises, naming what is missing


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor,
                    code: torch.Tensor) -> torch.Tensor:
    """W [out, in] = code[q] * absmax[block] of packed [out, in/2] (high nibble first)."""
    out = packed.shape[0]
    q = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(out, -1).long()
    return code[q] * absmax.repeat_interleave(BLOCKSIZE, dim=1)


class BnB4bitLinearMethod(LinearMethod):
    """Pre-quantized NF4 / FP4 weights (the checkpoint stream's layout): the Triton kernels
    on CUDA (``triton_nf4``), else the torch reference."""
    name = "bitsandbytes-4bit"

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       dtype: torch.dtype) -> None:
        if input_size % BLOCKSIZE:
            raise ValueError(f"bitsandbytes layer {layer.prefix!r}: input size {input_size} "
                             f"does not divide by the blocksize {BLOCKSIZE} (this rank's "
                             "share, --tensor-parallel-size)")
        out = sum(output_sizes)
        layer.weight = make_param(torch.empty(out, input_size // 2, dtype=torch.uint8),
                                  output_dim=0, input_dim=1, input_div=2)
        layer.weight_absmax = make_param(torch.empty(out, input_size // BLOCKSIZE,
                                                     dtype=torch.float32),
                                         output_dim=0, input_dim=1, input_div=BLOCKSIZE)
        layer.weight_code = make_param(torch.empty(16, dtype=torch.float32),
                                       same_per_shard=True)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return dequantize_4bit(layer.weight, layer.weight_absmax, layer.weight_code)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
              gated_silu: bool = False) -> torch.Tensor:
        kernels = triton_nf4_for(x)
        if kernels is not None:
            return kernels.nf4_matmul(x, layer.weight, layer.weight_absmax, layer.weight_code,
                                      bias=bias, gated=gated_silu)
        return matmul_dequantized(x, self.dequantize(layer).t(), bias, gated_silu)


def _bnb_functional():
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as exc:
        raise ValueError("--quantization bitsandbytes on an unquantized checkpoint quantizes "
                         "with the bitsandbytes package: pip install bitsandbytes") from exc
    return bnb_functional


class BnB4bitOnLoadLinearMethod(BnB4bitLinearMethod):
    """Loads the dense weight, then quantizes each checkpoint part (q, k, v ... separately,
    as transformers and vLLM quantize each module) with bitsandbytes' NF4 ``quantize_4bit``
    (blocksize 64, double-quantized scales), keeping the decoded scales."""

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       dtype: torch.dtype) -> None:
        if input_size % BLOCKSIZE:
            raise ValueError(f"bitsandbytes layer {layer.prefix!r}: input size {input_size} "
                             f"does not divide by the blocksize {BLOCKSIZE}")
        layer.part_sizes = list(output_sizes)
        layer.weight = tag_dense(new_weight(sum(output_sizes), input_size))

    def process_after_loading(self, layer: nn.Module) -> None:
        functional = _bnb_functional()
        packed, absmax = [], []
        for part in layer.weight.data.split(layer.part_sizes, dim=0):
            q, state = functional.quantize_4bit(part.contiguous(), blocksize=BLOCKSIZE,
                                                compress_statistics=True, quant_type="nf4")
            codes = state.state2.code[state.absmax.long()]
            index = torch.arange(state.absmax.numel(), device=codes.device) // \
                state.state2.blocksize
            scales = codes * state.state2.absmax[index] + state.offset
            packed.append(q.reshape(part.shape[0], -1))
            absmax.append(scales.float().reshape(part.shape[0], -1))
            code = state.code.float()
        layer.weight = make_param(torch.cat(packed))
        layer.weight_absmax = make_param(torch.cat(absmax))
        layer.weight_code = make_param(code)


# ---- 8 bit --------------------------------------------------------------------------------

def _eight_bit_stream(weights: Iterable[tuple[str, torch.Tensor]]
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """``weight_format`` is checked (row-major only) and dropped; the rest pass through."""
    for name, tensor in weights:
        if name.endswith(".weight_format"):
            if int(tensor.reshape(-1)[0]) != 0:
                raise ValueError(f"bitsandbytes tensor {name!r} = {int(tensor.reshape(-1)[0])}:"
                                 " only the row-major 8-bit layout (0) is supported")
            continue
        yield name, tensor


def _int8_part(inlier: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor,
               outlier_cols: torch.Tensor | None) -> torch.Tensor:
    """The int8 x int8 product of the rows (outlier values already zeroed), per-row absmax
    scales; the outlier columns' codes are zeroed. fp32 holds the int8 sums exactly up to
    2**24 / 127**2 = 1040 inputs; past that the float matmul rounds them (a reference)."""
    row_max = inlier.abs().amax(dim=1, keepdim=True).float()
    q = torch.round(inlier.float() * (127.0 / row_max)).nan_to_num(0.0)
    if outlier_cols is not None:
        q = q.masked_fill(outlier_cols, 0)
    return (q @ weight.float().t()) * (row_max * scb.float().unsqueeze(0)) * INV_127_SQ


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor,
                threshold: float) -> torch.Tensor:
    """x @ W^T the LLM.int8 way (module docstring); ``weight`` int8 [out, in]. The outlier
    values leave the int8 part (and its row scales); their whole columns go through the
    dequantized weight in full precision."""
    rows = x.reshape(-1, x.shape[-1])
    outliers = rows.abs() >= threshold if threshold > 0 else None
    if outliers is None:
        out = _int8_part(rows, weight, scb, None)
    elif rows.is_cuda:  # no host sync (CUDA graphs): the outlier product over masked columns
        cols = outliers.any(dim=0)
        out = _int8_part(rows.masked_fill(outliers, 0), weight, scb, cols)
        dequant = weight.float() * scb.float().unsqueeze(1) * INV_127
        out = out.addmm(rows.float().masked_fill(~cols, 0), dequant.t())
    elif bool(outliers.any()):  # CPU: only the outlier columns, as bitsandbytes does
        cols = outliers.any(dim=0)
        out = _int8_part(rows.masked_fill(outliers, 0), weight, scb, cols)
        dequant = weight[:, cols].float() * scb.float().unsqueeze(1) * INV_127
        out = out.addmm(rows[:, cols].float(), dequant.t())
    else:
        out = _int8_part(rows, weight, scb, None)
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


class BnB8bitLinearMethod(LinearMethod):
    name = "bitsandbytes-8bit"

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       dtype: torch.dtype) -> None:
        out = sum(output_sizes)
        layer.weight = make_param(torch.empty(out, input_size, dtype=torch.int8),
                                  output_dim=0, input_dim=1)
        layer.SCB = make_param(torch.empty(out, dtype=torch.float32), output_dim=0)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
              gated_silu: bool = False) -> torch.Tensor:
        out = int8_matmul(x, layer.weight, layer.SCB, self.threshold)
        return epilogue(out, bias, gated_silu)
