"""Model resolution: from the model flags to local files and a Hugging Face config.

`resolve_model` turns --model / --tokenizer / --revision / --download-dir ... into local
directories (a directory as given, else the Hugging Face cache, else a download; a .gguf
--model is its own config, tokenizer and weights), loads the config (`hf_config`), applies the
RoPE overrides and derives the dtype and the context length. `pagedllm.arg_utils` calls it
once, from `EngineArgs.create_engine_config`, before any weight is loaded; the result fills the
derived fields of `ModelConfig`.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from pagedllm.models.hf_config import (apply_rope_overrides, derive_max_model_len,
                                       load_hf_config, resolve_torch_dtype)
from pagedllm.quant.base import QuantConfig
from pagedllm.quant.config import resolve_quant_config
from pagedllm.quant.gguf import GGUFConfig, is_gguf_file, load_gguf_config, resolve_gguf_flags

_CONFIG_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
_WEIGHT_PATTERNS = {"safetensors": ["*.safetensors"], "pt": ["*.bin", "*.pt"]}


@dataclass(frozen=True)
class ResolvedModel:
    """What resolution derives: the `ModelConfig` derived fields, and the context length."""

    model_path: str
    tokenizer_path: Optional[str]  # None with --skip-tokenizer-init
    hf_config: Any  # transformers PretrainedConfig (or the GGUF file's), overrides applied
    quant_config: Optional[QuantConfig]
    torch_dtype: torch.dtype
    max_model_len: int

    def model_config_fields(self) -> dict[str, Any]:
        """The derived fields of `ModelConfig` (max_model_len is an option, set apart)."""
        return {"model_path": self.model_path, "tokenizer_path": self.tokenizer_path,
                "hf_config": self.hf_config, "quant_config": self.quant_config,
                "torch_dtype": self.torch_dtype}


def resolve_model(v: dict[str, Any]) -> ResolvedModel:
    """Local paths, HF config (with RoPE overrides), dtype and context length of the model.

    ``v`` holds the engine options by name; a .gguf --model sets its --load-format and
    --quantization to gguf in it (`resolve_gguf_flags`), as vLLM 0.6.3 does.
    """
    gguf_file = resolve_gguf_flags(v)  # a .gguf --model: its config, tokenizer, weights
    model_path = gguf_file or resolve_model_dir(v)
    tokenizer_path = None if v["skip_tokenizer_init"] else resolve_tokenizer_dir(
        v, model_path)
    quant_config: QuantConfig | None
    if gguf_file:
        hf_config = load_gguf_config(gguf_file, v["model"])
        quant_config = GGUFConfig.from_file(gguf_file)
    else:
        hf_config = load_hf_config(model_path, model=v["model"], revision=v["revision"],
                                   trust_remote_code=v["trust_remote_code"],
                                   code_revision=v["code_revision"])
        quant_config = resolve_quant_config(v["quantization"], hf_config, model_path,
                                            v["model"], v["load_format"])
    if v["qlora_adapter_name_or_path"]:
        _apply_qlora_adapter(v, quant_config)
    apply_rope_overrides(hf_config, v["rope_scaling"], v["rope_theta"])
    return ResolvedModel(
        model_path=model_path, tokenizer_path=tokenizer_path, hf_config=hf_config,
        quant_config=quant_config,
        torch_dtype=resolve_torch_dtype(v["dtype"], hf_config, v["device"]),
        max_model_len=derive_max_model_len(hf_config, v["max_model_len"],
                                           v["disable_sliding_window"]))


def _apply_qlora_adapter(v: dict[str, Any], quant_config: Any) -> None:
    """--qlora-adapter-name-or-path: bitsandbytes quantization at load of the adapter's
    target modules (both bitsandbytes flags are required, as in vLLM 0.6.3)."""
    from pagedllm.quant.bitsandbytes import apply_qlora_targets
    if v["quantization"] != "bitsandbytes" or v["load_format"] != "bitsandbytes":
        raise ValueError("--qlora-adapter-name-or-path needs --quantization bitsandbytes and "
                         "--load-format bitsandbytes (got --quantization "
                         f"{v['quantization']}, --load-format {v['load_format']})")
    name = v["qlora_adapter_name_or_path"]
    adapter_dir = _snapshot_dir(name, "--qlora-adapter-name-or-path", revision=None,
                                cache_dir=v["download_dir"], ignore=[], extra=[], weights=[])
    apply_qlora_targets(quant_config, adapter_dir, name)


def _looks_like_path(name: str) -> bool:
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


def _has_files(path: str, patterns: list[str]) -> bool:
    return any(next(Path(path).rglob(p), None) is not None for p in patterns)


def _weight_alternatives(load_format: str) -> list[list[str]]:
    """Weight file patterns to try in order; [] when no weights are needed."""
    if load_format == "dummy":
        return []
    if load_format in _WEIGHT_PATTERNS:
        return [_WEIGHT_PATTERNS[load_format]]
    return [_WEIGHT_PATTERNS["safetensors"], _WEIGHT_PATTERNS["pt"]]  # auto


def _snapshot_dir(name: str, flag: str, *, revision: Optional[str], cache_dir: Optional[str],
                  ignore: list[str], extra: list[str], weights: list[list[str]]) -> str:
    """A local directory for `name`: the directory itself, else the HF cache, else a download.

    Each alternative of `weights` (e.g. safetensors, then .bin) is tried against the cache
    first, then online, so a cached checkpoint never touches the network.
    """
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local.resolve())
    if _looks_like_path(name):
        raise ValueError(f"{flag} {name!r}: no such directory; pass an existing model directory "
                         "or a Hugging Face repo id")
    from huggingface_hub import constants, snapshot_download
    attempts = [_CONFIG_PATTERNS + extra + w for w in weights] or [_CONFIG_PATTERNS + extra]
    needed = weights or [["*.json"]]
    reason = "no usable files"
    for local_only in (True, False):
        if not local_only and constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE is set"
            break
        for allow, need in zip(attempts, needed):
            try:
                path = snapshot_download(name, revision=revision, cache_dir=cache_dir,
                                         allow_patterns=allow, ignore_patterns=ignore,
                                         local_files_only=local_only)
            except Exception as exc:  # hub errors vary (offline, HTTP, validation): report them
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
                continue
            if _has_files(path, need):
                return path
    raise ValueError(
        f"{flag} {name!r} was not found locally (not a directory, not in the Hugging Face cache"
        f"{' at ' + cache_dir if cache_dir else ''}) and could not be downloaded: the network is "
        f"unavailable or the repo has no matching files ({reason}). Pass a local model directory "
        f"instead, e.g. {flag} /path/to/model")


def resolve_model_dir(v: dict[str, Any]) -> str:
    """A local directory with the config, tokenizer files and weights of --model."""
    extra = ["*.py"] if v["trust_remote_code"] else []
    return _snapshot_dir(v["model"], "--model", revision=v["revision"], cache_dir=v["download_dir"],
                         ignore=v["ignore_patterns"], extra=extra,
                         weights=_weight_alternatives(v["load_format"]))


def resolve_tokenizer_dir(v: dict[str, Any], model_path: str) -> str:
    """The model directory, unless another tokenizer repo or revision is asked for."""
    revision = v["tokenizer_revision"]
    if v["tokenizer"] is None and revision in (None, v["revision"]):
        return model_path
    if is_gguf_file(v["tokenizer"]):  # the tokenizer in a GGUF file's metadata
        return str(Path(v["tokenizer"]).expanduser().resolve())
    name = v["tokenizer"] or v["model"]
    flag = "--tokenizer" if v["tokenizer"] else "--tokenizer-revision"
    return _snapshot_dir(name, flag, revision=revision, cache_dir=v["download_dir"],
                         ignore=v["ignore_patterns"], extra=[], weights=[])
