"""What the model's Hugging Face config says, with the user's overrides applied.

`load_hf_config` reads ``config.json`` through transformers (imported here, lazily: it is the
slowest import of start-up, and `pagedllm.arg_utils` / `pagedllm.config` must stay cheap to
import) into plain data, kept in an on-disk cache (`config_cache`) so that later starts skip
transformers; `apply_rope_overrides` applies --rope-scaling / --rope-theta to transformers-4 style
(``rope_theta`` / ``rope_scaling``) and transformers-5 style (``rope_parameters``, also per
layer type) configs; `resolve_torch_dtype` and `derive_max_model_len` derive --dtype auto and
the context length from it.
"""
import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from pagedllm.models import config_cache
from pagedllm.models.plain_config import to_plain

logger = logging.getLogger(__name__)


def load_hf_config(model_path: str, *, model: str, revision: Optional[str],
                   trust_remote_code: bool, code_revision: Optional[str]) -> Any:
    """The model's config as plain data (`plain_config.PlainConfig`: what transformers' config
    class makes of ``config.json``, without the class), from the on-disk cache
    (`config_cache`) when this ``config.json`` was read before under this transformers
    version, else through transformers (``model`` is --model as given, for messages); remote
    code only with --trust-remote-code."""
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        if (Path(model_path) / "params.json").is_file():
            raise ValueError(f"--model {model}: only a Mistral params.json was found; "
                             "--config-format mistral is not supported yet; supported: hf "
                             "(config.json)")
        raise ValueError(f"--model {model}: no config.json in {model_path}; point --model at a "
                         "Hugging Face model directory")
    data = config_file.read_bytes()
    raw = json.loads(data)
    if raw.get("auto_map") and not trust_remote_code:
        raise ValueError(f"--model {model} ships its own model code (auto_map in config.json); "
                         "pass --trust-remote-code if you trust that code")
    key = None if raw.get("auto_map") else config_cache.cache_key(data, revision,
                                                                  code_revision)
    cached = config_cache.load(key) if key else None
    if cached is not None:
        logger.info("config of %s read from the config cache (PAGEDLLM_CONFIG_CACHE=0 turns "
                    "it off)", model)
        return cached
    config = to_plain(_transformers_config(model_path, raw, model=model, revision=revision,
                                           trust_remote_code=trust_remote_code,
                                           code_revision=code_revision))
    if key:
        config_cache.store(key, config)
    return config


def _transformers_config(model_path: str, raw: dict, *, model: str, revision: Optional[str],
                         trust_remote_code: bool, code_revision: Optional[str]) -> Any:
    import transformers  # lazily: the slowest import of start-up (see the module doc)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    if code_revision:
        kwargs["code_revision"] = code_revision
    try:
        return transformers.AutoConfig.from_pretrained(model_path, **kwargs)
    except (ValueError, KeyError, OSError) as exc:
        model_type = raw.get("model_type")
        if model_type not in CONFIG_MAPPING and not trust_remote_code:
            raise ValueError(
                f"--model {model}: model_type {model_type!r} is unknown to transformers "
                f"{transformers.__version__}; if the repo ships its own code, pass "
                "--trust-remote-code") from exc
        raise ValueError(f"--model {model}: could not load its config ({exc})") from exc


def _normalize_rope(scaling: Optional[dict]) -> Optional[dict]:
    if scaling is None:
        return None
    scaling = dict(scaling)
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    return scaling


def _override_rope_parameters(params: dict, scaling: Optional[dict],
                              theta: Optional[float]) -> dict:
    if params and all(isinstance(sub, dict) for sub in params.values()):  # per layer type
        return {k: _override_rope_parameters(sub, scaling, theta) for k, sub in params.items()}
    new = dict(params)
    if scaling is not None:
        new = {k: params[k] for k in ("rope_theta", "partial_rotary_factor") if k in params}
        new.update(scaling)
    if theta is not None:
        new["rope_theta"] = theta
    new.setdefault("rope_type", "default")
    return new


def apply_rope_overrides(hf_config: Any, rope_scaling: Optional[dict],
                         rope_theta: Optional[float]) -> None:
    """Apply --rope-scaling / --rope-theta to the HF config.

    transformers 5 keeps RoPE settings in ``rope_parameters`` (rope_type, rope_theta, factor,
    ...) and converts old ``rope_theta``/``rope_scaling`` keys into it on load; configs without
    that attribute get the old-style attributes.
    """
    scaling = _normalize_rope(rope_scaling)
    if scaling is None and rope_theta is None:
        return
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict):
        hf_config.rope_parameters = _override_rope_parameters(params, scaling, rope_theta)
        return
    if not any(hasattr(hf_config, key) for key in ("rope_theta", "rope_scaling")):
        flag = "--rope-scaling" if scaling is not None else "--rope-theta"
        raise ValueError(f"{flag}: model type {getattr(hf_config, 'model_type', '?')!r} has no "
                         "rotary position embedding to override; drop the flag")
    if scaling is not None:
        hf_config.rope_scaling = scaling
    if rope_theta is not None:
        hf_config.rope_theta = rope_theta


_DTYPES = {"half": torch.float16, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float": torch.float32, "float32": torch.float32}


def resolve_torch_dtype(dtype: str, hf_config: Any, device: str) -> torch.dtype:
    """Explicit dtypes map directly. auto: float32 on CPU (bf16 matmuls are ~300x slower than
    fp32 on AVX2 CPUs, fp16 slower still); elsewhere the checkpoint dtype, fp32 -> fp16 (vLLM)."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device == "cpu":
        return torch.float32
    checkpoint = getattr(hf_config, "dtype", None)  # transformers 5 name of torch_dtype
    if isinstance(checkpoint, str):
        checkpoint = getattr(torch, checkpoint, None)
    if not isinstance(checkpoint, torch.dtype) or checkpoint == torch.float32:
        return torch.float16
    return checkpoint


_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                 "model_max_length", "max_sequence_length", "max_seq_length", "seq_len")
_NON_EXTENDING_ROPE = ("default", "su", "longrope", "llama3", "mrope")


def _rope_scaling_of(hf_config: Any) -> Optional[dict]:
    params = getattr(hf_config, "rope_parameters", None)
    if not isinstance(params, dict):
        params = getattr(hf_config, "rope_scaling", None)
    if not isinstance(params, dict) or not params:
        return None
    if all(isinstance(sub, dict) for sub in params.values()):
        params = params.get("full_attention") or next(iter(params.values()))
    return _normalize_rope(params)


def derive_max_model_len(hf_config: Any, user_value: Optional[int],
                         disable_sliding_window: bool) -> int:
    """Context length: the smallest length key of the config, times the RoPE factor where the
    rope type extends the context, capped by the sliding window if that is disabled."""
    given = {k: getattr(hf_config, k, None) for k in _MAX_LEN_KEYS}
    found: dict[str, int] = {k: v for k, v in given.items() if isinstance(v, int) and v > 0}
    source = min(found, key=found.__getitem__) if found else None
    derived = found[source] if source else None
    if derived is None:
        derived = user_value or 2048
        logger.warning("the model config gives no context length; using %d", derived)
    scaling = _rope_scaling_of(hf_config)
    if scaling and scaling.get("rope_type", "default") not in _NON_EXTENDING_ROPE:
        if scaling["rope_type"] == "yarn":
            derived = scaling.get("original_max_position_embeddings", derived)
        derived = int(derived * scaling.get("factor", 1.0))
    window = getattr(hf_config, "sliding_window", None)
    if disable_sliding_window and isinstance(window, int) and window > 0:
        derived = min(derived, window)
    if user_value is None:
        return derived
    if user_value > derived:
        notes = [f"{source} in config.json" if source else "no length key in config.json"]
        notes += ["RoPE scaling applied"] if scaling else []
        notes += ["capped by the sliding window"] if disable_sliding_window and window else []
        from pagedllm import envs
        if envs.allow_long_max_model_len():  # vLLM 0.6.3: a warning instead of the error
            logger.warning("--max-model-len %d is larger than the model supports (%d: %s); "
                           "allowed by VLLM_ALLOW_LONG_MAX_MODEL_LEN: outputs past %d tokens "
                           "may be wrong", user_value, derived, ", ".join(notes), derived)
            return user_value
        raise ValueError(
            f"--max-model-len {user_value} is larger than the model supports ({derived}: "
            f"{', '.join(notes)}); use --max-model-len <= {derived}, or extend the context with "
            "--rope-scaling")
    return user_value
