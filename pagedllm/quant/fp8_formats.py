"""fp8 checkpoints of other producers: ``fbgemm_fp8`` (Meta's FP8 releases, transformers'
FbgemmFp8 quantizer) and ``modelopt`` (NVIDIA TensorRT Model Optimizer).

fbgemm_fp8 (``quantization_config``: ``activation_scale_ub``, ``modules_to_not_convert``):
``weight`` float8_e4m3fn [out, in] with ``weight_scale`` [out, 1] (per output channel);
activations are quantized per token at run time with scale min(max|x_row|, ub) / 448 (never
below 1 / (448 * 512)), as vLLM's ``scaled_fp8_quant`` with ``scale_ub``.

modelopt (``hf_quant_config.json``: ``{"quantization": {"quant_algo": "FP8",
"kv_cache_quant_algo": ..., "exclude_modules": [...]}}``, or the same keys in config.json's
``quantization_config`` with ``quant_method: modelopt``): the ``fp8`` layout with static
activation scales (per-tensor ``weight_scale`` and ``input_scale``). Its K/V cache scales
(``k_proj.k_scale``, ``v_proj.v_scale``) are dropped at load with a log line: the KV cache
follows ``--kv-cache-dtype`` and its scales ``--quantization-param-path``.
"""
from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from pagedllm.quant.base import LinearMethod
from pagedllm.quant.fp8 import FP8_MAX, Fp8Config, Fp8LinearMethod, quantize_fp8
from pagedllm.quant.gptq import matmul_dequantized

logger = logging.getLogger(__name__)

MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # vLLM's floor of a dynamic fp8 activation scale


class FbgemmFp8Config(Fp8Config):
    name = "fbgemm_fp8"

    def __init__(self, activation_scale_ub: float, skip_rules: list[str]) -> None:
        super().__init__(True, "dynamic", skip_rules)
        if not activation_scale_ub > 0:
            raise ValueError(f"fbgemm_fp8 activation_scale_ub {activation_scale_ub} "
                             "(quantization_config.activation_scale_ub) must be > 0")
        self.scale_ub = float(activation_scale_ub)

    def quantized_method(self) -> LinearMethod:
        return FbgemmFp8LinearMethod(self.scale_ub)

    def describe(self) -> str:
        return (f"fbgemm_fp8: per-channel fp8 weights, dynamic per-token activations (scale "
                f"upper bound {self.scale_ub})")


def fbgemm_from_checkpoint(quant: dict) -> FbgemmFp8Config:
    for key in ("activation_scale_ub", "modules_to_not_convert"):
        if key not in quant:
            raise ValueError(f"fbgemm_fp8 checkpoint without quantization_config.{key}")
    return FbgemmFp8Config(float(quant["activation_scale_ub"]),
                           list(quant["modules_to_not_convert"] or []))


class FbgemmFp8LinearMethod(Fp8LinearMethod):
    """Per-channel fp8 weights, per-token dynamic activation scales with an upper bound."""
    name = "fbgemm_fp8"

    def __init__(self, scale_ub: float) -> None:
        super().__init__("token", per_channel=True)
        self.scale_ub = scale_ub

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
              gated_silu: bool = False) -> torch.Tensor:
        peak = x.detach().abs().amax(-1, keepdim=True).float().clamp(max=self.scale_ub)
        scale = (peak / FP8_MAX).clamp(min=MIN_SCALE)
        xq = (quantize_fp8(x, scale).float() * scale).to(x.dtype)
        weight = layer.weight.to(torch.float32) * layer.row_scale.unsqueeze(1)  # [out, in]
        return matmul_dequantized(xq, weight.t(), bias, gated_silu)


class ModelOptFp8Config(Fp8Config):
    name = "modelopt"

    def __init__(self, skip_rules: list[str], kv_cache_algo: str | None) -> None:
        super().__init__(True, "static", skip_rules)
        self.kv_cache_algo = kv_cache_algo

    def describe(self) -> str:
        return "modelopt fp8: per-tensor weight and static activation scales"

    def checkpoint_stream(self, weights: Iterable[tuple[str, torch.Tensor]]
                          ) -> Iterator[tuple[str, torch.Tensor]]:
        dropped = 0
        for name, tensor in weights:
            if name.endswith((".k_scale", ".v_scale")):
                dropped += 1
                continue
            yield name, tensor
        if dropped:
            logger.warning("modelopt: %d K/V cache scales of the checkpoint are not used; the "
                           "KV cache follows --kv-cache-dtype (fp8 scales come from "
                           "--quantization-param-path)", dropped)


def _pattern_rule(pattern: str) -> str:
    """A ModelOpt ``exclude_modules`` entry (a name or an fnmatch pattern) as a skip rule."""
    if any(c in pattern for c in "*?["):
        return "re:" + fnmatch.translate(pattern)
    return pattern


def modelopt_from_checkpoint(quant: dict) -> ModelOptFp8Config:
    """``quant``: hf_quant_config.json (keys under ``quantization``) or config.json's
    ``quantization_config`` (the same keys at the top)."""
    inner = quant.get("quantization") if isinstance(quant.get("quantization"), dict) else quant
    algo = str(inner.get("quant_algo") or "")
    if algo.upper() != "FP8":
        raise ValueError(f"modelopt quant_algo {algo!r} is not supported (hf_quant_config.json "
                         "quantization.quant_algo); supported: FP8")
    rules = [_pattern_rule(p) for p in inner.get("exclude_modules") or []]
    return ModelOptFp8Config(rules, inner.get("kv_cache_quant_algo"))
