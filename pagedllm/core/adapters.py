"""The request side of LoRA and prompt adapters: which adapter a request names.

What the control plane needs of an adapter is who it is: its id (the scheduler's
``--max-loras`` / ``--max-prompt-adapters`` budgets and the prefix-cache hash salt), its name
and where its files are. These descriptors are plain data: they cross to the compute plane in
``NewRequestData``, and each worker resolves them to weights in its ``AdapterStore``
(``pagedllm/worker/adapters.py``; loading, ``pagedllm/worker/lora.py`` and
``pagedllm/worker/prompt_adapter.py``). No tensor lives here (``pagedllm.core`` imports no
torch).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's ``LoRARequest``: a name, a positive id unique per adapter, and the PEFT
    directory (``lora_path``; ``lora_local_path`` is the older name)."""
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    lora_local_path: str | None = None
    long_lora_max_len: int | None = None
    base_model_name: str | None = None

    @property
    def path(self) -> str:
        return self.lora_path or self.lora_local_path or ""


@dataclass(frozen=True)
class PromptAdapterRequest:
    """vLLM's ``PromptAdapterRequest``: a name, a positive id, a local PEFT directory and
    its number of virtual tokens."""
    prompt_adapter_name: str
    prompt_adapter_id: int
    prompt_adapter_local_path: str
    prompt_adapter_num_virtual_tokens: int


def block_hash_salt(prompt_adapter: PromptAdapterRequest | None,
                    lora: LoRARequest | None) -> tuple | None:
    """What salts a request's prefix-cache block hashes: the same ids under another soft
    prompt or LoRA (or none) are other KV."""
    extra = ((prompt_adapter.prompt_adapter_id,) if prompt_adapter is not None else ()) + \
        (("lora", lora.lora_int_id) if lora is not None else ())
    return extra or None
