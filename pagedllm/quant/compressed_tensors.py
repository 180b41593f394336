"""compressed-tensors checkpoints (llm-compressor's format): ``pack-quantized`` int weights
(W4A16 / W8A16), ``float-quantized`` fp8 weights (W8A16, or W8A8 with static or dynamic
activations) and ``int-quantized`` int8 W8A8 (``int8.py``).

``config_groups`` map ``targets`` (``Linear``, exact names, ``re:`` prefixes) to a scheme;
``ignore`` keeps modules dense. A fused layer (q/k/v, gate/up) needs one scheme for all its
parts. Sparse (2:4) checkpoints, asymmetric int8 activations and other formats fail at
start-up.

pack-quantized tensors: ``weight_packed`` int32 [out, in*bits/32] (element i of a row at bits
i*bits, stored as q + 2**(bits-1)), ``weight_scale`` [out, in/group] (``channel``: [out, 1]),
``weight_zero_point`` int32 [out*bits/32, in/group] (asymmetric only, packed along the
output), ``weight_g_idx`` [in] (``actorder: group``, older llm-compressor saves) and
``weight_shape`` (implied by the layer, dropped).
W [out, in] = (q - zp) * scale. On CUDA the Triton kernels of ``triton_wna16`` read these
tensors as they are (transposed views); on CPU the torch reference runs (their oracle).
"""
from __future__ import annotations

import torch
from torch import nn

from pagedllm.quant.base import (FUSED_PARTS, LinearMethod, QuantConfig, make_param,
                                 module_skipped, rule_matches)
from pagedllm.quant.fp8 import Fp8LinearMethod
from pagedllm.quant.gptq import _check_sizes, matmul_dequantized
from pagedllm.quant.kernels import w4mma_apply, w4mma_for, wna16_apply, wna16_for
from pagedllm.quant.packing import unpack_int32
from pagedllm.quant.unquantized import UNQUANTIZED

KEY = "quantization_config.config_groups"


def _pack_method(group: str, weights: dict, inputs: dict | None) -> LinearMethod:
    bits, strategy = int(weights.get("num_bits", 0)), weights.get("strategy")
    if inputs:
        raise ValueError(f"compressed-tensors {KEY}.{group}: int weights with quantized "
                         "activations (W8A8 int8) are not supported; supported: W4A16, W8A16")
    if bits not in (4, 8) or strategy not in ("group", "channel"):
        raise ValueError(f"compressed-tensors {KEY}.{group}: int weights with num_bits {bits},"
                         f" strategy {strategy!r} are not supported; supported: num_bits 4 or "
                         "8, strategy group or channel")
    group_size = int(weights["group_size"]) if strategy == "group" else None
    return PackedLinearMethod(bits, group_size, bool(weights.get("symmetric", True)),
                              weights.get("actorder") == "group")


def _float_method(group: str, weights: dict, inputs: dict | None) -> LinearMethod:
    strategy = weights.get("strategy")
    if int(weights.get("num_bits", 0)) != 8 or strategy not in ("tensor", "channel"):
        raise ValueError(f"compressed-tensors {KEY}.{group}: float weights must be fp8 with "
                         f"strategy tensor or channel (got {strategy!r})")
    if not inputs:
        activations = "none"
    elif inputs.get("type") != "float" or int(inputs.get("num_bits", 0)) != 8:
        raise ValueError(f"compressed-tensors {KEY}.{group}.input_activations: only fp8 "
                         "activations are supported")
    elif inputs.get("dynamic"):
        activations = "token" if inputs.get("strategy") == "token" else "dynamic"
    elif inputs.get("strategy") == "tensor":
        activations = "static"
    else:
        raise ValueError(f"compressed-tensors {KEY}.{group}.input_activations: static scales "
                         "must be per tensor")
    return Fp8LinearMethod(activations, per_channel=strategy == "channel")


def _int8_method(group: str, weights: dict, inputs: dict | None) -> LinearMethod:
    """int-quantized W8A8: symmetric int8 weights (channel or tensor scales), symmetric int8
    activations (static per tensor or dynamic per token)."""
    from pagedllm.quant.int8 import Int8LinearMethod
    strategy = weights.get("strategy")
    if int(weights.get("num_bits", 0)) != 8 or strategy not in ("tensor", "channel") or \
            not weights.get("symmetric", True):
        raise ValueError(f"compressed-tensors {KEY}.{group}: int-quantized weights must be "
                         f"symmetric int8 with strategy tensor or channel (got {weights})")
    if not inputs or inputs.get("type", "int") != "int" or \
            int(inputs.get("num_bits", 0)) != 8 or not inputs.get("symmetric", True):
        raise ValueError(f"compressed-tensors {KEY}.{group}.input_activations: int-quantized "
                         "checkpoints are served as W8A8 with symmetric int8 activations "
                         f"(got {inputs}); weight-only int8 is pack-quantized")
    dynamic = bool(inputs.get("dynamic"))
    if dynamic and inputs.get("strategy") != "token" or \
            not dynamic and inputs.get("strategy") != "tensor":
        raise ValueError(f"compressed-tensors {KEY}.{group}.input_activations: supported: "
                         "dynamic per-token or static per-tensor int8 scales")
    return Int8LinearMethod(per_channel=strategy == "channel", static=not dynamic)


def _group_method(group: str, scheme: dict, default_format: str | None) -> LinearMethod:
    fmt = scheme.get("format") or default_format
    weights, inputs = scheme.get("weights") or {}, scheme.get("input_activations")
    if fmt == "pack-quantized" and weights.get("type", "int") == "int":
        return _pack_method(group, weights, inputs)
    if fmt in ("float-quantized", "naive-quantized") and weights.get("type") == "float":
        return _float_method(group, weights, inputs)
    if fmt in ("int-quantized", "naive-quantized") and weights.get("type", "int") == "int":
        return _int8_method(group, weights, inputs)
    raise ValueError(f"compressed-tensors format {fmt!r} with {weights.get('type')} weights "
                     f"({KEY}.{group}) is not supported; supported: pack-quantized int "
                     "(W4A16/W8A16), float-quantized fp8, int-quantized int8 W8A8")


class CompressedTensorsConfig(QuantConfig):
    name = "compressed-tensors"

    def __init__(self, quant: dict) -> None:
        super().__init__(quant.get("ignore") or [])
        sparsity = quant.get("sparsity_config") or {}
        if sparsity and sparsity.get("format", "dense") != "dense":
            raise ValueError("compressed-tensors sparse checkpoints (quantization_config."
                             f"sparsity_config format {sparsity.get('format')!r}) are not "
                             "supported")
        groups = quant.get("config_groups") or {}
        if not groups:
            raise ValueError(f"compressed-tensors checkpoint without {KEY}")
        self.groups = [(name, list(g.get("targets") or []),
                        _group_method(name, g, quant.get("format"))) for name, g in groups.items()]

    def _group_of(self, name: str) -> int | None:
        for i, (_, targets, _) in enumerate(self.groups):
            if any(t == "Linear" or rule_matches(t, name, False) for t in targets):
                return i
        return None

    def method_for(self, prefix: str) -> LinearMethod:
        """The scheme whose targets match the module (every fused part the same one)."""
        if module_skipped(prefix, self.skip_rules):
            return UNQUANTIZED
        head, _, leaf = prefix.rpartition(".")
        names = [f"{head}.{p}" for p in FUSED_PARTS[leaf]] if leaf in FUSED_PARTS else [prefix]
        found = {self._group_of(n) for n in names}
        if len(found) > 1:
            raise ValueError(f"compressed-tensors {KEY} give the parts of {prefix!r} different "
                             "schemes; pagedllm fuses them into one layer")
        index = found.pop()
        return UNQUANTIZED if index is None else self.groups[index][2]

    def quantized_method(self) -> LinearMethod:
        return self.groups[0][2]

    def describe(self) -> str:
        return "compressed-tensors " + ", ".join(
            f"{name}: {type(method).__name__}" for name, _, method in self.groups)


class PackedLinearMethod(LinearMethod):
    """pack-quantized int4 / int8 weights (module docstring): Triton kernels on CUDA, the
    torch reference elsewhere."""
    name = "compressed-tensors-pack"

    def __init__(self, bits: int, group_size: int | None, symmetric: bool,
                 actorder: bool) -> None:
        self.bits, self.group_size = bits, group_size
        self.symmetric, self.actorder = symmetric, actorder

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       dtype: torch.dtype) -> None:
        pack, out = 32 // self.bits, sum(output_sizes)
        split_input = getattr(layer, "input_shards", 1) > 1
        whole = self.group_size is None or (self.actorder and split_input)
        group = self.group_size or input_size
        _check_sizes(layer.prefix, input_size, output_sizes, pack,
                     1 if self.symmetric else pack, None if whole else group,
                     "compressed-tensors")
        full_in = input_size * getattr(layer, "input_shards", 1)
        groups = 1 if self.group_size is None else (full_in if whole else input_size) // group
        scale_in = dict(input_dim=None) if whole else dict(input_dim=1, input_div=group)
        layer.weight_packed = make_param(torch.empty(out, input_size // pack, dtype=torch.int32),
                                         output_dim=0, input_dim=1, input_div=pack)
        layer.weight_scale = make_param(torch.empty(out, groups, dtype=dtype), output_dim=0,
                                        **scale_in)
        layer.weight_shape = make_param(torch.empty(2, dtype=torch.int64), discard=True,
                                        optional=True)
        if not self.symmetric:
            layer.weight_zero_point = make_param(
                torch.empty(out // pack, groups, dtype=torch.int32), output_dim=0,
                output_div=pack, **scale_in)
        if self.actorder:
            layer.weight_g_idx = make_param(torch.empty(input_size, dtype=torch.int32),
                                            input_dim=0, same_per_shard=True)

    def process_after_loading(self, layer: nn.Module) -> None:
        """Where the Triton kernels serve the layer: the packed words, scales and zero points
        keep their shapes but are laid out transposed in memory (GPTQ's [in/pack, out]
        order), so the kernels read them with 16-byte loads along the output."""
        if wna16_for(layer.weight_packed) is None:
            return
        n, k = layer.weight_packed.shape[0], layer.weight_packed.shape[1] * (32 // self.bits)
        mma = w4mma_for(layer.weight_packed, self.bits, self.actorder, k, n,
                        self.group_size or -1, "compressed-tensors pack-quantized")
        if mma is not None:  # the tensor-core kernel's layout (triton_w4mma): words, [G, N]
            # scales and GPTQ-packed [G, N/8] zero points (stored like the codes, + 8)
            layer.weight_packed = make_param(mma.repack(layer.weight_packed.data.t()))
            layer.weight_scale = make_param(layer.weight_scale.data.t().contiguous())
            zp = getattr(layer, "weight_zero_point", None)
            if zp is not None:
                layer.weight_zero_point = make_param(zp.data.t().contiguous())
            layer.w4mma = True
            return
        for name in ("weight_packed", "weight_scale", "weight_zero_point"):
            param = getattr(layer, name, None)
            if param is not None:
                setattr(layer, name, make_param(param.data.t().contiguous().t()))

    def _w4mma_tensors(self, layer: nn.Module) -> tuple:
        """(words, zeros [G, N/8] or None, scales [G, N]) and the zero offset of a layer in
        the tensor-core kernel's layout."""
        zp = getattr(layer, "weight_zero_point", None)
        return (layer.weight_packed, zp, layer.weight_scale), 0 if zp is not None else 8

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """W [out, in] = (q - zp) * scale, the scale and zero of each input's group."""
        if getattr(layer, "w4mma", False):
            from pagedllm.quant.triton_w4mma import dequantize_reference
            (words, zp, scale), offset = self._w4mma_tensors(layer)
            return dequantize_reference(words, zp, scale, self.group_size or -1,
                                        offset).t().to(scale.dtype)
        offset = 1 << (self.bits - 1)
        q = unpack_int32(layer.weight_packed, self.bits, 1) - offset          # [out, in]
        scale = layer.weight_scale
        zp = (unpack_int32(layer.weight_zero_point, self.bits, 0) - offset
              if not self.symmetric else torch.zeros_like(scale, dtype=torch.int32))
        if self.actorder:
            index = layer.weight_g_idx.long()
        else:
            index = torch.arange(q.shape[1], device=q.device) // (self.group_size or q.shape[1])
        return (q - zp[:, index]).to(scale.dtype) * scale[:, index]

    def _kernel_weight(self, module, layer: nn.Module):
        return module.compressed_weight(
            layer.weight_packed, layer.weight_scale, getattr(layer, "weight_zero_point", None),
            layer.weight_g_idx if self.actorder else None, self.bits, self.group_size)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
              gated_silu: bool = False) -> torch.Tensor:
        if getattr(layer, "w4mma", False):
            tensors, offset = self._w4mma_tensors(layer)
            return w4mma_apply(x, tensors, self.group_size or -1, offset, bias,
                               gated_silu)
        out = wna16_apply(layer, x, layer.weight_packed,
                          lambda module: self._kernel_weight(module, layer),
                          "compressed-tensors pack-quantized", bias, gated_silu)
        if out is not None:
            return out
        return matmul_dequantized(x, self.dequantize(layer).t(), bias, gated_silu)
