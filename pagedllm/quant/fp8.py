"""fp8 (e4m3) weights with per-tensor scales: fp8 checkpoints, or bf16/fp16/fp32 checkpoints
quantized at load (``--quantization fp8``).

Checkpoint tensors per linear layer: ``weight`` float8_e4m3fn [out, in], ``weight_scale``
(one fp32 value per checkpoint tensor, so a fused q/k/v layer keeps three) and, with
``activation_scheme: static``, ``input_scale`` (fused parts take the largest, as one
activation feeds them). ``dynamic`` computes the activation scale per call (max |x| / 448).

On CUDA with fp8 tensor cores (compute capability >= 8.9) W8A8 layers run ``torch._scaled_mm``:
activations are quantized to e4m3 with their scale (static, dynamic per tensor, or per token;
dynamic scales and the cast in one Triton launch, ``triton_fp8``),
the product accumulates in fp32 and is scaled on the way out, per tensor when the weight has
one scale and the activation scale is a scalar, else per row and column (bf16 activations;
fp16 ones then take the reference, logged once). One-row steps (batch-1 decode) there, and
weight-only (W8A16) ones, run the Triton fp8 GEMV instead (``triton_fp8.fp8_gemv``: x
quantized inside it as here, fp32 sums: the float64 W8A8 result rounded, within one ulp,
where cuBLASLt's coarser fp8 accumulation can differ by more; ``PAGEDLLM_GEMV=off`` keeps
the other paths). Elsewhere ``apply`` runs the torch emulation
and reference: activations are rounded through fp8 with their scale, weights are dequantized
(fp8 value x its tensor's scale) and the product runs in the activation dtype. A layer
quantized at load gets one scale for its whole (rank-local, fused) weight.
"""
from __future__ import annotations

import torch
from torch import nn

from pagedllm.quant.base import LinearMethod, MoEMethod, QuantConfig, make_param
from pagedllm.quant.gptq import epilogue, matmul_dequantized
from pagedllm.quant.kernels import fp8_scaled_mm_supported, log_once
from pagedllm.quant.unquantized import new_weight, tag_dense
from pagedllm.switches import switches

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to e4m3 (saturating at +-448)."""
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def activation_scale(x: torch.Tensor, scale: torch.Tensor | None,
                     per_token: bool = False) -> torch.Tensor:
    """The given static scale, or the dynamic one: max|x| / 448 of the tensor or of each row
    (computed on the device: no host sync)."""
    if scale is not None:
        return scale.float()
    peak = x.detach().abs().amax(-1, keepdim=True) if per_token else x.detach().abs().max()
    return (peak.float() / FP8_MAX).clamp(min=1e-12)


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor | None,
                      per_token: bool = False) -> torch.Tensor:
    """x through fp8 and back; ``scale`` None: the dynamic scale max|x| / 448 of the whole
    tensor, or of each row (token) with ``per_token``."""
    scale = activation_scale(x, scale, per_token)
    return (quantize_fp8(x, scale).float() * scale.float()).to(x.dtype)


def _scaled_mm_mode(layer: nn.Module, x: torch.Tensor, activations: str) -> str | None:
    """"tensor" or "row" (``torch._scaled_mm``'s scaling) for this call, or None: the
    reference runs (CPU, no fp8 tensor cores, weight-only, shapes or dtypes it cannot take)."""
    if activations == "none" or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    if not getattr(layer, "fp8_scaled_mm", False) or x.device != layer.weight.device:
        return None
    if activations != "token" and layer.fp8_uniform:
        return "tensor"
    if x.dtype == torch.bfloat16:
        return "row"
    log_once("fp8 W8A8 with fp16 activations and per-row scales: torch._scaled_mm's row-wise "
             "scaling takes bf16 only, the torch reference runs")
    return None


def _quantize_fused(x2: torch.Tensor, per_token: bool):
    """(x in fp8, scale) from the one-launch Triton quantizer on CUDA, else None."""
    if not x2.is_cuda:
        return None
    from pagedllm.layers import fused
    if fused.ops() is None:
        return None
    from pagedllm.quant.triton_fp8 import quantize_fp8_dynamic
    return quantize_fp8_dynamic(x2, per_token, FP8)


def scaled_mm_fp8(x: torch.Tensor, weight: torch.Tensor, row_scale: torch.Tensor,
                  x_scale: torch.Tensor | None, per_token: bool, mode: str) -> torch.Tensor:
    """x [..., K] @ (weight [N, K] fp8 * row_scale[:, None])^T with x quantized to fp8 by
    ``x_scale`` (None: dynamic), through ``torch._scaled_mm`` (fp32 accumulation)."""
    x2 = x.reshape(-1, x.shape[-1])
    fused = _quantize_fused(x2, per_token) if x_scale is None else None
    if fused is not None:
        xq, scale_a = fused
    else:
        scale_a = activation_scale(x2, x_scale, per_token)
        xq = quantize_fp8(x2, scale_a)
    if mode == "tensor":
        scale_a, scale_b = scale_a.reshape(()), row_scale[0].reshape(())
    else:
        scale_a = scale_a.reshape(-1, 1).expand(x2.shape[0], 1).contiguous()
        scale_b = row_scale.reshape(1, -1)
    out = torch._scaled_mm(xq, weight.t(), scale_a=scale_a, scale_b=scale_b,
                           out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _fp8_gemv_module(layer: nn.Module, x: torch.Tensor, activations: str):
    """``triton_fp8`` when this call runs its batch-1 GEMV, else None: one bf16/fp16 row on
    the layer's CUDA device (compute capability >= 8.9, Triton's e4m3 casts), where the
    layer would otherwise run ``torch._scaled_mm`` (W8A8) or the torch reference (W8A16,
    activations "none"); under the switches the bf16 GEMV obeys (``PAGEDLLM_GEMV=off`` and
    ``PAGEDLLM_DISABLE_FUSED_OPS`` keep the other paths). Every shape: no per-shape gate,
    as the one-row ``_scaled_mm`` also needs a second launch to quantize x."""
    if not (getattr(layer, "fp8_gemv", False) and x.dim() == 2 and x.shape[0] == 1
            and x.stride(1) == 1 and x.device == layer.weight.device):
        return None
    if activations != "none" and _scaled_mm_mode(layer, x, activations) is None:
        return None
    if activations == "none" and x.dtype not in (torch.bfloat16, torch.float16):
        return None
    from pagedllm.layers import fused
    if switches().gemv == "off" or fused.ops() is None:
        return None
    from pagedllm.quant import triton_fp8
    return triton_fp8


def _enable_gemv(layer: nn.Module) -> None:
    """After loading: whether the batch-1 fp8 GEMV can serve this layer (its weight on a
    CUDA device with e4m3 support, row-major)."""
    layer.fp8_gemv = (fp8_scaled_mm_supported(layer.weight.device)
                      and layer.weight.stride(1) == 1)
    if layer.fp8_gemv:
        log_once("fp8: one-row steps (batch-1 decode) on the Triton fp8 GEMV "
                 "(triton_fp8.fp8_gemv)")


def _enable_scaled_mm(layer: nn.Module) -> None:
    """After loading: whether this layer's W8A8 product can use ``torch._scaled_mm`` (fp8
    tensor cores, K and N multiples of 16), and whether its weight has a single scale."""
    n, k = layer.weight.shape
    layer.fp8_scaled_mm = (fp8_scaled_mm_supported(layer.weight.device)
                           and n % 16 == 0 and k % 16 == 0)
    if layer.fp8_scaled_mm:
        layer.fp8_uniform = bool(layer.row_scale.min() == layer.row_scale.max())
        log_once("fp8 W8A8: torch._scaled_mm (fp8 tensor cores)")


class Fp8Config(QuantConfig):
    name = "fp8"

    def __init__(self, checkpoint_fp8: bool, activation_scheme: str,
                 skip_rules: list[str] | None = None) -> None:
        super().__init__(skip_rules)
        if activation_scheme not in ("static", "dynamic"):
            raise ValueError(f"fp8 activation_scheme {activation_scheme!r} is not supported "
                             "(quantization_config.activation_scheme); supported: static, dynamic")
        if activation_scheme == "static" and not checkpoint_fp8:
            raise ValueError("--quantization fp8 on an unquantized checkpoint has no activation "
                             "scales: it uses activation_scheme dynamic")
        self.checkpoint_fp8, self.activation_scheme = checkpoint_fp8, activation_scheme

    def quantized_method(self) -> LinearMethod:
        if self.checkpoint_fp8:
            return Fp8LinearMethod(self.activation_scheme)
        return Fp8OnLoadLinearMethod()

    def moe_method_for(self, prefix: str) -> MoEMethod:
        """MoE experts of an unquantized checkpoint: e4m3 codes with a scale per row,
        quantized at load (W8A16, read by the fused MoE kernels as they are). An fp8
        checkpoint's expert scales are not read yet: refused, naming the layer."""
        if self.checkpoint_fp8:
            raise ValueError(f"fp8 checkpoints of mixture-of-experts models are not supported "
                             f"yet ({prefix}: per-expert weight scales); --quantization fp8 on "
                             "the unquantized checkpoint quantizes the experts at load")
        from pagedllm.quant.experts_int8 import FP8_EXPERTS
        return FP8_EXPERTS

    def describe(self) -> str:
        source = "fp8 checkpoint" if self.checkpoint_fp8 else "weights quantized at load"
        return (f"fp8 per-tensor ({source}), {self.activation_scheme} activation scales; MoE "
                "experts (if any): fp8 per row, activations unquantized")


class Fp8LinearMethod(LinearMethod):
    """An fp8 checkpoint's weight and scales: per-tensor (one per fused part) or, with
    ``per_channel``, per output row ([out, 1], compressed-tensors ``channel``). Activations:
    ``static`` (checkpoint ``input_scale``), ``dynamic`` (per tensor), ``token`` (dynamic per
    row) or ``none`` (weight-only W8A16)."""
    name = "fp8"

    def __init__(self, activations: str, per_channel: bool = False) -> None:
        self.activations, self.per_channel = activations, per_channel
        self.static_input = activations == "static"

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       dtype: torch.dtype) -> None:
        unset = torch.full((len(output_sizes),), float("nan"), dtype=torch.float32)
        layer.part_sizes = list(output_sizes)
        layer.weight = make_param(torch.empty(sum(output_sizes), input_size, dtype=FP8),
                                  output_dim=0, input_dim=1)
        if self.per_channel:
            layer.weight_scale = make_param(torch.full((sum(output_sizes), 1), float("nan"),
                                                       dtype=torch.float32), output_dim=0)
        else:
            layer.weight_scale = make_param(unset.clone(), per_shard=True)
        if self.static_input:
            layer.input_scale = make_param(unset.clone(), per_shard=True)

    def process_after_loading(self, layer: nn.Module) -> None:
        """Each output row gets its part's scale; a scale the checkpoint lacked stays NaN."""
        for scale in ("weight_scale", "input_scale"):
            values = getattr(layer, scale, None)
            if values is not None and (torch.isnan(values).any() or (values <= 0).any()):
                raise ValueError(f"fp8 layer {layer.prefix!r}: checkpoint {scale} missing or not "
                                 f"positive for a fused part ({values.tolist()})")
        if self.per_channel:
            layer.row_scale = make_param(layer.weight_scale.data[:, 0].clone())
        else:
            sizes = torch.tensor(layer.part_sizes, device=layer.weight_scale.device)
            layer.row_scale = make_param(layer.weight_scale.data.repeat_interleave(sizes))
        if self.static_input:
            layer.input_scale.data = layer.input_scale.data.max().reshape(1)
        if self.activations != "none":
            _enable_scaled_mm(layer)
        _enable_gemv(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
              gated_silu: bool = False) -> torch.Tensor:
        gemv = _fp8_gemv_module(layer, x, self.activations)
        if gemv is not None:
            return gemv.fp8_gemv(x, layer.weight, layer.row_scale,
                                 layer.input_scale if self.static_input else None,
                                 self.activations, bias=bias, gated=gated_silu)
        mode = _scaled_mm_mode(layer, x, self.activations)
        if mode is not None:
            scale = layer.input_scale[0] if self.static_input else None
            out = scaled_mm_fp8(x, layer.weight, layer.row_scale, scale,
                                self.activations == "token", mode)
            return epilogue(out, bias, gated_silu)
        if self.activations != "none":
            scale = layer.input_scale[0] if self.static_input else None
            x = fake_quantize_fp8(x, scale, per_token=self.activations == "token")
        weight = layer.weight.to(torch.float32) * layer.row_scale.unsqueeze(1)  # [out, in]
        return matmul_dequantized(x, weight.t(), bias, gated_silu)


class Fp8OnLoadLinearMethod(Fp8LinearMethod):
    """Loads the dense weight, then replaces it with fp8 and one per-tensor scale."""

    def __init__(self) -> None:
        super().__init__("dynamic")

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       dtype: torch.dtype) -> None:
        layer.part_sizes = list(output_sizes)
        layer.weight = tag_dense(new_weight(sum(output_sizes), input_size))

    def process_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight.data
        scale = (weight.abs().max().float() / FP8_MAX).clamp(min=1e-12)
        layer.weight = make_param(quantize_fp8(weight, scale).contiguous())
        layer.row_scale = make_param(scale.repeat(weight.shape[0]))
        _enable_scaled_mm(layer)
        _enable_gemv(layer)
