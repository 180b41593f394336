"""pagedllm: an LLM inference and serving engine with a paged KV cache."""
from pagedllm.outputs import (CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, Logprob,
                              RequestOutput)
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM and EngineArgs import torch and transformers: load them on first use only.
    if name == "LLM":
        from pagedllm.entrypoints.llm import LLM
        return LLM
    if name == "EngineArgs":
        from pagedllm.arg_utils import EngineArgs
        return EngineArgs
    if name == "LoRARequest":
        from pagedllm.core.adapters import LoRARequest
        return LoRARequest
    if name == "PromptAdapterRequest":
        from pagedllm.core.adapters import PromptAdapterRequest
        return PromptAdapterRequest
    raise AttributeError(f"module 'pagedllm' has no attribute {name!r}")


__all__ = ["LLM", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput",
           "Logprob", "RequestOutputKind", "PromptAdapterRequest", "LoRARequest",
           "PoolingParams", "EmbeddingOutput", "EmbeddingRequestOutput"]
