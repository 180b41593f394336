"""Hugging Face ``architectures`` name -> native model class (imported lazily)."""
from __future__ import annotations

import importlib

_MODELS = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "Qwen3ForCausalLM"),
    "GemmaForCausalLM": ("gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("gemma", "Gemma2ForCausalLM"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
    "OPTForCausalLM": ("opt", "OPTForCausalLM"),
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen_moe", "Qwen3MoeForCausalLM"),
    "DeepseekV2ForCausalLM": ("deepseek_v2", "DeepseekV2ForCausalLM"),
    "DeepseekV3ForCausalLM": ("deepseek_v2", "DeepseekV3ForCausalLM"),
    "GPTNeoXForCausalLM": ("gpt_neox", "GPTNeoXForCausalLM"),
    "Starcoder2ForCausalLM": ("starcoder2", "Starcoder2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "FalconForCausalLM": ("falcon", "FalconForCausalLM"),
    "GPTJForCausalLM": ("gptj", "GPTJForCausalLM"),
    "OlmoForCausalLM": ("olmo", "OlmoForCausalLM"),
    "Olmo2ForCausalLM": ("olmo", "Olmo2ForCausalLM"),
    "InternLM2ForCausalLM": ("internlm2", "InternLM2ForCausalLM"),
    "CohereForCausalLM": ("cohere", "CohereForCausalLM"),
    "ExaoneForCausalLM": ("exaone", "ExaoneForCausalLM"),
    # pooling models (LLM.encode, /v1/embeddings): pagedllm/models/embedding.py
    "MistralModel": ("embedding", "LlamaEmbeddingModel"),
    "LlamaModel": ("embedding", "LlamaEmbeddingModel"),
    "Gemma2Model": ("embedding", "Gemma2EmbeddingModel"),
    "Qwen2ForRewardModel": ("embedding", "Qwen2ForRewardModel"),
}


def register_model(architecture: str, module: str, class_name: str) -> None:
    _MODELS[architecture] = (module, class_name)


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def _model_class(architecture: str):
    module, class_name = _MODELS[architecture]
    return getattr(importlib.import_module(f"pagedllm.models.{module}"), class_name)


def architectures_supporting(capability: str) -> list[str]:
    """The registered architectures whose class sets ``supports_<capability>`` (e.g.
    ``tensor_parallel``, ``pipeline_parallel``)."""
    return [arch for arch in supported_architectures()
            if getattr(_model_class(arch), f"supports_{capability}", False)]


def require_support(model_class, capability: str, flag: str) -> None:
    """Raise, naming ``flag``, unless ``model_class`` sets ``supports_<capability>``."""
    if not getattr(model_class, f"supports_{capability}", False):
        raise ValueError(f"{model_class.__name__} does not support {flag} > 1 yet (issue #7); "
                         f"supported: {', '.join(architectures_supporting(capability))}")


def model_pooler(architectures: list[str] | None):
    """The ``Pooler`` of an embedding / reward model (whose requests pool, never generate),
    None for a generative model."""
    known = [a for a in architectures or [] if a in _MODELS]
    return getattr(_model_class(known[0]), "pooler", None) if known else None


def resolve_model_class(architectures: list[str] | None):
    for arch in architectures or []:
        if arch in _MODELS:
            return _model_class(arch)
    raise ValueError(f"model architecture(s) {architectures} not supported; supported: "
                     f"{', '.join(supported_architectures())}")
