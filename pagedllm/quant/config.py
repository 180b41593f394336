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

import importlib.util
import json
import logging
import os
from typing import Any

from pagedllm.quant import bitsandbytes
from pagedllm.quant.awq import AWQConfig
from pagedllm.quant.base import QuantConfig
from pagedllm.quant.compressed_tensors import CompressedTensorsConfig
from pagedllm.quant.experts_int8 import ExpertsInt8Config
from pagedllm.quant.fp8 import Fp8Config
from pagedllm.quant.fp8_formats import fbgemm_from_checkpoint, modelopt_from_checkpoint
from pagedllm.quant.gptq import GPTQConfig

logger = logging.getLogger(__name__)

# --quantization values that load (the Marlin names map onto their checkpoint format)
SUPPORTED = ("gptq", "gptq_marlin", "marlin", "awq", "awq_marlin", "fp8", "compressed-tensors",
             "experts_int8", "gguf", "bitsandbytes", "fbgemm_fp8", "modelopt")
FORMAT_OF = {"gptq_marlin": "gptq", "marlin": "gptq", "awq_marlin": "awq"}
SUPPORTED_DESC = ("None, gptq (2/4/8 bit), awq (4 bit, GEMM), fp8 (per-tensor; quantizes "
                  "unquantized checkpoints at load, MoE experts of Mixtral / Qwen2-MoE / "
                  "Qwen3-MoE per row), compressed-tensors (pack-quantized "
                  "W4A16/W8A16, float-quantized fp8, int-quantized int8 W8A8), experts_int8 "
                  "(MoE models: expert weights int8 per output channel, quantized at load), "
                  "gguf (--model a .gguf file; layers of one block type keep their blocks), "
                  "bitsandbytes (4-bit nf4/fp4 and 8-bit checkpoints; nf4 at load with "
                  "--load-format bitsandbytes), fbgemm_fp8 (per-channel fp8, dynamic per-token "
                  "activations), modelopt (fp8, static activation scales); gptq_marlin, marlin "
                  "and awq_marlin load gptq/awq checkpoints with the same implementation")
NOT_BUILT = ("tpu_int8 and neuron_quant need TPU / Neuron hardware; aqlm, deepspeedfp, "
             "gptq_marlin_24 (2:4 sparse Marlin layout) and qqq are not built yet "
             "(quantization issue)")


def read_checkpoint_quant(hf_config: Any, model_path: str | None) -> dict | None:
    """The checkpoint's quantization config as a dict, or None for an unquantized one."""
    quant = getattr(hf_config, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict()
    if quant:
        return dict(quant)
    for name in ("quant_config.json", "quantize_config.json", "hf_quant_config.json"):
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
    if isinstance(quant.get("quantization"), dict) and "quant_algo" in quant["quantization"]:
        return "modelopt"  # hf_quant_config.json
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
    if fmt == "marlin_24":
        raise ValueError("GPTQ checkpoints in the 2:4 sparse Marlin layout (checkpoint_format "
                         "marlin_24, vLLM's gptq_marlin_24) are not supported; supported: "
                         "checkpoint_format gptq, gptq_v2")
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
             "compressed-tensors": CompressedTensorsConfig,
             "bitsandbytes": bitsandbytes.from_checkpoint,
             "fbgemm_fp8": fbgemm_from_checkpoint, "modelopt": modelopt_from_checkpoint}


def _unsupported(what: str, method: str) -> ValueError:
    return ValueError(f"{what} {method!r} is not supported ({NOT_BUILT}); supported "
                      f"--quantization: {SUPPORTED_DESC}")


def resolve_quant_config(flag: str | None, hf_config: Any, model_path: str | None,
                         model: str, load_format: str = "auto") -> QuantConfig | None:
    """The quant config of ``--quantization flag`` on this checkpoint (None: unquantized)."""
    config = _resolve(flag, hf_config, model_path, model, load_format)
    if load_format == "bitsandbytes" and (config is None or config.name != "bitsandbytes"):
        raise ValueError(f"--load-format bitsandbytes quantizes with bitsandbytes: it needs "
                         f"--quantization bitsandbytes (or a bitsandbytes checkpoint); --model "
                         f"{model} has {config.name if config else 'no quantization'}")
    return config


def _resolve(flag: str | None, hf_config: Any, model_path: str | None, model: str,
             load_format: str) -> QuantConfig | None:
    if flag == "gguf":  # a .gguf --model is resolved before this (pagedllm.quant.gguf)
        raise ValueError(f"--quantization gguf needs --model to be a local .gguf file; "
                         f"{model!r} is not one")
    quant = read_checkpoint_quant(hf_config, model_path)
    ckpt = checkpoint_method(quant) if quant else None
    if ckpt is not None and (ckpt not in SUPPORTED or ckpt in ("marlin", "gguf")):
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
        config = _quantize_at_load(fmt, flag, model, load_format)
        if config.moe_only:
            _require_experts(hf_config, config.name)
    else:
        config = _BUILDERS[fmt](quant)
    _log_choice(flag, ckpt, config)
    return config


def _require_experts(hf_config: Any, method: str) -> None:
    """experts_int8 on a model without experts: refused before any weight loads."""
    from pagedllm.models.loader import require_expert_quantization
    from pagedllm.models.registry import resolve_model_class
    require_expert_quantization(resolve_model_class(getattr(hf_config, "architectures", None)),
                                method)


def _quantize_at_load(fmt: str, flag: str, model: str, load_format: str) -> QuantConfig:
    """``--quantization`` on an unquantized checkpoint: fp8, or bitsandbytes NF4 with
    ``--load-format bitsandbytes`` (vLLM 0.6.3 asks for both flags)."""
    if fmt == "fp8":
        return Fp8Config(checkpoint_fp8=False, activation_scheme="dynamic")
    if fmt == "experts_int8":
        return ExpertsInt8Config()
    if fmt == "bitsandbytes":
        if load_format != "bitsandbytes":
            raise ValueError(f"--quantization bitsandbytes on --model {model}, an unquantized "
                             "checkpoint, quantizes it at load: pass --load-format "
                             "bitsandbytes too")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("--quantization bitsandbytes --load-format bitsandbytes quantizes "
                             "with the bitsandbytes package: pip install bitsandbytes")
        return bitsandbytes.BitsAndBytesConfig(4, "nf4", prequantized=False)
    raise ValueError(f"--quantization {flag} needs a {fmt} checkpoint, and --model {model} has "
                     "no quantization_config; only --quantization fp8, experts_int8 and "
                     "bitsandbytes (with --load-format bitsandbytes) quantize an unquantized "
                     "checkpoint at load")


def _log_choice(flag: str | None, ckpt: str | None, config: QuantConfig) -> None:
    asked = flag or f"{ckpt} (from the checkpoint)"
    if config.name in ("gptq", "awq"):
        logger.info("quantization: --quantization %s -> %s; one implementation serves %s, "
                    "%s_marlin%s (torch dequantize-then-matmul)", asked, config.describe(),
                    config.name, config.name, " and marlin" if config.name == "gptq" else "")
    else:
        logger.info("quantization: --quantization %s -> %s", asked, config.describe())
