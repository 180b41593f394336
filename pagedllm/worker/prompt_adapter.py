"""Prompt adapters (PEFT prompt tuning, "soft prompts"): ``--enable-prompt-adapter``.

A prompt adapter is ``num_virtual_tokens`` learned embedding rows. A request that names one
gets that many placeholder tokens (id 0) in front of its prompt, as vLLM 0.6.3 does; in the
forward the embeddings of those positions are replaced by the adapter's rows (the runner
passes them in ``ForwardContext.embed_overrides``), so the model sees
``[soft prompt; prompt]`` exactly as Hugging Face's ``inputs_embeds`` would feed it. The
adapter's id salts the request's prefix-cache block hashes: the same prompt under another
adapter (or none) never shares KV blocks.

A request names its adapter by ``PromptAdapterRequest`` (``pagedllm/core/adapters.py``); the
worker reads the embeddings once per id into its ``AdapterStore``
(``pagedllm/worker/adapters.py``); the engine asks the driver worker's store at
``add_request``, so a bad directory is a ValueError there.

Checkpoints are PEFT's: ``adapter_config.json`` with ``"peft_type": "PROMPT_TUNING"`` and
``num_virtual_tokens``, and ``adapter_model.safetensors`` (or ``adapter_model.bin``) holding
``prompt_embeddings`` [num_virtual_tokens, hidden_size].
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from pagedllm.core.adapters import PromptAdapterRequest


@dataclass(frozen=True)
class LoadedPromptAdapter:
    adapter_id: int
    embeddings: torch.Tensor  # [num_virtual_tokens, hidden_size] fp32, on the host

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]


def read_num_virtual_tokens(path: str, name: str) -> int:
    """num_virtual_tokens of a PEFT prompt-tuning directory (the server's --prompt-adapters)."""
    config = _read_config(path, name)
    if not isinstance(config.get("num_virtual_tokens"), int):
        raise ValueError(f"prompt adapter {name!r}: adapter_config.json has no "
                         "num_virtual_tokens")
    return config["num_virtual_tokens"]


def _read_config(path: str, name: str) -> dict:
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"prompt adapter {name!r}: no adapter_config.json in {path!r}")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type") != "PROMPT_TUNING":
        raise ValueError(f"prompt adapter {name!r}: peft_type {config.get('peft_type')!r} is "
                         "not a prompt adapter; supported: PROMPT_TUNING")
    return config


def load_prompt_adapter(request: PromptAdapterRequest, hidden_size: int,
                        max_tokens: int) -> LoadedPromptAdapter:
    """Read and check a PEFT prompt-tuning directory; ValueError naming what is wrong."""
    name, path = request.prompt_adapter_name, request.prompt_adapter_local_path
    if not isinstance(request.prompt_adapter_id, int) or request.prompt_adapter_id < 1:
        raise ValueError(f"prompt adapter {name!r}: prompt_adapter_id must be an int >= 1, got "
                         f"{request.prompt_adapter_id!r}")
    config = _read_config(path, name)
    embeddings = _read_embeddings(path, name)
    num = request.prompt_adapter_num_virtual_tokens
    if embeddings.dim() != 2 or embeddings.shape[1] != hidden_size:
        raise ValueError(f"prompt adapter {name!r}: prompt_embeddings has shape "
                         f"{tuple(embeddings.shape)}, the model needs [n, {hidden_size}]")
    if num != embeddings.shape[0] or num != config.get("num_virtual_tokens", num):
        raise ValueError(f"prompt adapter {name!r}: prompt_adapter_num_virtual_tokens {num} "
                         f"does not match the checkpoint's {embeddings.shape[0]}")
    if num > max_tokens:
        raise ValueError(f"prompt adapter {name!r} has {num} virtual tokens; "
                         f"--max-prompt-adapter-token is {max_tokens}")
    return LoadedPromptAdapter(request.prompt_adapter_id, embeddings.float())


def _read_embeddings(path: str, name: str) -> torch.Tensor:
    st = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file
        tensors = load_file(st)
    elif os.path.isfile(os.path.join(path, "adapter_model.bin")):
        tensors = torch.load(os.path.join(path, "adapter_model.bin"), map_location="cpu",
                             weights_only=True)
    else:
        raise ValueError(f"prompt adapter {name!r}: no adapter_model.safetensors or "
                         f"adapter_model.bin in {path!r}")
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"prompt adapter {name!r}: the checkpoint has no prompt_embeddings "
                         f"(keys: {sorted(tensors)[:5]})")
    return tensors["prompt_embeddings"]


def check_prompt_adapter_support(hf_config) -> None:
    """--enable-prompt-adapter needs a model whose embeddings the runner can replace
    (``supports_prompt_adapters``): the Llama family."""
    from pagedllm.models.registry import architectures_supporting, resolve_model_class
    model_class = resolve_model_class(getattr(hf_config, "architectures", None))
    if not getattr(model_class, "supports_prompt_adapters", False):
        raise ValueError(f"--enable-prompt-adapter: {model_class.__name__} does not support "
                         f"prompt adapters yet; supported: "
                         f"{', '.join(architectures_supporting('prompt_adapters'))}")
