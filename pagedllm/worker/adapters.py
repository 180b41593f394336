"""One worker's adapter weights, by the ids that requests name.

The control plane knows an adapter only by its request (``pagedllm/core/adapters.py``: id,
name, path); ``NewRequestData`` carries that request, and the runner asks this store for the
weights when the request joins its batch state. The engine asks the driver worker's store
when a request is added, so a bad adapter is a ValueError at ``add_request`` and the
weights are read once there; another rank (a prompt adapter under tensor or pipeline
parallelism) reads them when a request first brings the id.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, overload

from pagedllm.core.adapters import LoRARequest, PromptAdapterRequest
from pagedllm.worker.lora import LoadedLoRA, LoRACache, projection_shapes
from pagedllm.worker.prompt_adapter import LoadedPromptAdapter, load_prompt_adapter

if TYPE_CHECKING:
    from pagedllm.config import LoRAConfig, ModelConfig, PromptAdapterConfig


class AdapterStore:
    """LoRA adapters (``--enable-lora``; at most ``--max-cpu-loras`` on the host) and prompt
    adapters (``--enable-prompt-adapter``; each id read once) of one worker."""

    def __init__(self, model: ModelConfig, lora: LoRAConfig,
                 prompt_adapter: PromptAdapterConfig) -> None:
        self.hidden_size = model.hidden_size
        self.prompt_adapter_config = prompt_adapter
        self.loras = LoRACache(lora.max_cpu_loras or lora.max_loras, lora.max_lora_rank,
                               model.num_hidden_layers, projection_shapes(model.hf_config)) \
            if lora.enable_lora else None
        self._prompt_adapters: dict[int, tuple[PromptAdapterRequest, LoadedPromptAdapter]] = {}

    @overload
    def lora(self, request: LoRARequest) -> LoadedLoRA: ...
    @overload
    def lora(self, request: None) -> None: ...
    @overload
    def lora(self, request: LoRARequest | None) -> LoadedLoRA | None: ...

    def lora(self, request: LoRARequest | None) -> LoadedLoRA | None:
        """The loaded LoRA of a request, or None (ValueError on a bad one); a request
        always gives its LoRA (the overloads say so to the type checker)."""
        if request is None:
            return None
        if self.loras is None:
            raise ValueError("lora_request needs --enable-lora")
        if not isinstance(request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(request).__name__}")
        return self.loras.get(request)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Drop a LoRA's host weights; True if it was loaded."""
        return self.loras is not None and self.loras.remove(lora_int_id)

    def prompt_adapter(self, request: PromptAdapterRequest | None) -> LoadedPromptAdapter | None:
        """The loaded adapter of a request (loaded once per id), or None."""
        if request is None:
            return None
        pa = self.prompt_adapter_config
        if not pa.enable_prompt_adapter:
            raise ValueError("prompt_adapter_request needs --enable-prompt-adapter")
        known = self._prompt_adapters.get(request.prompt_adapter_id)
        if known is not None:
            if known[0] != request:
                raise ValueError(f"prompt_adapter_id {request.prompt_adapter_id} is already "
                                 f"in use by {known[0].prompt_adapter_name!r}")
            return known[1]
        loaded = load_prompt_adapter(request, self.hidden_size, pa.max_prompt_adapter_token)
        self._prompt_adapters[request.prompt_adapter_id] = (request, loaded)
        return loaded
