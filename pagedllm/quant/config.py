"""``--quantization`` and the checkpoint's ``quantization_config`` -> a ``QuantConfig``.

Resolved once in ``create_engine_config``, before any weight loads, so an unsupported method,
a flag that contradicts the checkpoint or a malformed config fails at start-up naming the
flag or the config key. The config comes from ``config.json``'s ``quantization_config``, else
``quant_config.json`` / ``quantize_config.json`` beside it (older AutoGPTQ / AutoAWQ saves).

The Marlin names select the same implementation as their format (vLLM picks ``*_marlin`` by
itself where its kernels run; here the Triton kernels of ``triton_wna16`` serve each format on
CUDA and the torch dequantize-then-matmul reference on CPU), and the choice is logged.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from pagedllm.quant.awq import AWQConfig
from pagedllm.quant.base import QuantConfig
from pagedllm.quant.compressed_tensors import CompressedTensorsConfig
from pagedllm.quant.fp8 import Fp8Config
from pagedllm.quant.gptq import GPTQConfig

logger = logging.getLogger(__name__)

# --quantization values that load (the Marlin names map onto their checkpoint format)
SUPPORTED = ("gptq", "gptq_marlin", "marlin", "awq", "awq_marlin", "fp8", "compressed-tensors")
FORMAT_OF = {"gptq_marlin": "gptq", "marlin": "gptq", "awq_marlin": "awq"}
SUPPORTED_DESC = ("None, gptq (2/4/8 bit), awq (4 bit, GEMM), fp8 (per-tensor; quantizes "
                  "unquantized checkpoints at load), compressed-tensors (pack-quantized "
                  "W4A16/W8A16, float-quantized fp8); gptq_marlin, marlin and awq_marlin load "
                  "gptq/awq checkpoints with the same implementation")
NOT_BUILT = ("tpu_int8 and neuron_quant need TPU / Neuron hardware; aqlm, deepspeedfp, "
             "fbgemm_fp8, modelopt, gguf, gptq_marlin_24, bitsandbytes, qqq and experts_int8 "
             "are not built yet (quantization issue)")


def read_checkpoint_quant(hf_config: Any, model_path: str | None) -> dict | None:
    """The checkpoint's quantization config as a dict, or None for an unquantized one."""
    quant = getattr(hf_config, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict()
    if quant:
        return dict(quant)
    for name in ("quant_config.json", "quantize_config.json"):
        path = os.path.join(model_path or "", name)
        if model_path and os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    return None


def checkpoint_method(quant: dict) -> str:
    """``quant_method``, or the format an old AutoGPTQ / AutoAWQ file implies."""
    method = quant.get("quant_method")
    if method:
        return str(method).lower()
    if "w_bit" in quant or "q_group_size" in quant:
        return "awq"
    if "bits" in quant:
        return "gptq"
    raise ValueError("the checkpoint's quantization config has no quant_method (and is neither "
                     "an AutoGPTQ nor an AutoAWQ file); pass --quantization")


def _skip_rules(quant: dict, *keys: str) -> list[str]:
    rules: list[str] = []
    for key in keys:
        rules += list(quant.get(key) or [])
    return rules


def _gptq(quant: dict) -> GPTQConfig:
    fmt = str(quant.get("checkpoint_format") or "gptq").lower()
    if quant.get("is_marlin_format") or fmt == "marlin":
        raise ValueError("GPTQ checkpoints saved in the Marlin layout (checkpoint_format marlin)"
                         " are not supported; supported: checkpoint_format gptq, gptq_v2")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported; supported: gptq, "
                         "gptq_v2")
    if quant.get("lm_head"):
        raise ValueError("GPTQ checkpoints with a quantized LM head (quantization_config.lm_head"
                         " true) are not supported; the LM head must be unquantized")
    if quant.get("dynamic"):
        raise ValueError("GPTQ per-module overrides (quantization_config.dynamic) are not "
                         "supported")
    return GPTQConfig(int(quant.get("bits", 4)), int(quant.get("group_size", 128)),
                      bool(quant.get("desc_act", False)), bool(quant.get("sym", True)),
                      zero_offset=0 if fmt == "gptq_v2" else 1,
                      skip_rules=_skip_rules(quant, "modules_to_not_convert"))


def _awq(quant: dict) -> AWQConfig:
    return AWQConfig(int(quant.get("bits", quant.get("w_bit", 4))),
                     int(quant.get("group_size", quant.get("q_group_size", 128))),
                     bool(quant.get("zero_point", True)), str(quant.get("version", "gemm")),
                     skip_rules=_skip_rules(quant, "modules_to_not_convert"))


def _fp8(quant: dict) -> Fp8Config:
    if quant.get("weight_block_size"):
        raise ValueError("fp8 checkpoints with block-wise weight scales (quantization_config."
                         "weight_block_size) are not supported; supported: per-tensor scales")
    return Fp8Config(True, str(quant.get("activation_scheme", "dynamic")),
                     skip_rules=_skip_rules(quant, "ignored_layers", "modules_to_not_convert"))


_BUILDERS = {"gptq": _gptq, "awq": _awq, "fp8": _fp8,
             "compressed-tensors": CompressedTensorsConfig}


def _unsupported(what: str, method: str) -> ValueError:
    return ValueError(f"{what} {method!r} is not supported ({NOT_BUILT}); supported "
                      f"--quantization: {SUPPORTED_DESC}")


def resolve_quant_config(flag: str | None, hf_config: Any, model_path: str | None,
                         model: str) -> QuantConfig | None:
    """The quant config of ``--quantization flag`` on this checkpoint (None: unquantized)."""
    quant = read_checkpoint_quant(hf_config, model_path)
    ckpt = checkpoint_method(quant) if quant else None
    if ckpt is not None and (ckpt not in SUPPORTED or ckpt == "marlin"):
        raise _unsupported(f"--model {model}: the checkpoint's quantization_config.quant_method",
                           ckpt)
    if flag is not None and flag not in SUPPORTED:
        raise _unsupported("--quantization", flag)
    if flag is None and ckpt is None:
        return None
    fmt = FORMAT_OF.get(flag or ckpt, flag or ckpt)
    if ckpt is not None and flag is not None and FORMAT_OF.get(ckpt, ckpt) != fmt:
        raise ValueError(f"--quantization {flag} does not match --model {model}, a {ckpt} "
                         f"checkpoint (quantization_config.quant_method); drop the flag or "
                         f"pass --quantization {ckpt}")
    if ckpt is None:
        if fmt != "fp8":
            raise ValueError(f"--quantization {flag} needs a {fmt} checkpoint, and --model "
                             f"{model} has no quantization_config; only --quantization fp8 "
                             "quantizes an unquantized checkpoint at load")
        config = Fp8Config(checkpoint_fp8=False, activation_scheme="dynamic")
    else:
        config = _BUILDERS[fmt](quant)
    _log_choice(flag, ckpt, config)
    return config


def _log_choice(flag: str | None, ckpt: str | None, config: QuantConfig) -> None:
    asked = flag or f"{ckpt} (from the checkpoint)"
    if config.name in ("gptq", "awq"):
        logger.info("quantization: --quantization %s -> %s; one implementation serves %s, "
                    "%s_marlin%s (torch dequantize-then-matmul)", asked, config.describe(),
                    config.name, config.name, " and marlin" if config.name == "gptq" else "")
    else:
        logger.info("quantization: --quantization %s -> %s", asked, config.describe())
