"""Prompt inputs (text, token ids, or their dict forms) -> validated token ids.

Accepted like vLLM: a string, ``{"prompt": str}``, ``{"prompt_token_ids": [int, ...]}`` or a
list of ints. With ``--skip-tokenizer-init`` only token ids are accepted.
"""
from __future__ import annotations

import json
import os
from typing import Union

PromptInputs = Union[str, list[int], dict]


def load_tokenizer(model_config):
    from transformers import AutoTokenizer
    path, kwargs = model_config.tokenizer_path, {}
    if os.path.isfile(path):  # a GGUF file: its metadata
        path, kwargs["gguf_file"] = os.path.dirname(path), os.path.basename(path)
    try:
        return AutoTokenizer.from_pretrained(
            path, use_fast=model_config.tokenizer_mode != "slow",
            trust_remote_code=model_config.trust_remote_code,
            revision=model_config.tokenizer_revision, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised with the flag to fix
        raise ValueError(f"could not load the tokenizer from {model_config.tokenizer_path!r} "
                         f"(--tokenizer / --tokenizer-mode): {exc}") from exc


def _generation_eos_ids(model_path: str) -> set[int]:
    path = os.path.join(model_path, "generation_config.json")
    if not os.path.isfile(path):
        return set()
    with open(path) as f:
        eos = json.load(f).get("eos_token_id")
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {eos}


class PromptProcessor:
    def __init__(self, model_config, pool_config=None) -> None:
        from pagedllm.engine.tokenizer_pool import make_tokenizer_pool
        self.max_model_len = model_config.max_model_len
        self.vocab_size = model_config.vocab_size
        self.tokenizer = None if model_config.skip_tokenizer_init else \
            load_tokenizer(model_config)
        # --tokenizer-pool-size > 0: text prompts are encoded by Ray actors
        self.pool = (make_tokenizer_pool(model_config, pool_config)
                     if pool_config is not None else None)
        eos = _generation_eos_ids(model_config.model_path)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        elif not eos:
            config_eos = getattr(model_config.hf_config, "eos_token_id", None)
            if config_eos is not None:
                eos = set(config_eos) if isinstance(config_eos, list) else {config_eos}
        self.eos_token_ids = eos

    def process(self, prompt: PromptInputs) -> tuple[str | None, list[int]]:
        text, token_ids = self._split(prompt)
        if token_ids is None:
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; with --skip-tokenizer-init pass "
                                 "prompt_token_ids")
            token_ids = (self.pool or self.tokenizer).encode(text)
        self._validate(token_ids)
        return text, list(token_ids)

    @staticmethod
    def _split(prompt: PromptInputs) -> tuple[str | None, list[int] | None]:
        if isinstance(prompt, str):
            return prompt, None
        if isinstance(prompt, list):
            return None, prompt
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), prompt["prompt_token_ids"]
            if "prompt" in prompt and isinstance(prompt["prompt"], str):
                return prompt["prompt"], None
        raise ValueError("prompt must be a string, a list of token ids, {'prompt': str} or "
                         f"{{'prompt_token_ids': [int, ...]}}, got {type(prompt).__name__}")

    def _validate(self, token_ids: list[int]) -> None:
        if len(token_ids) == 0:
            raise ValueError("prompt is empty: it must contain at least one token")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in token_ids):
            raise ValueError(f"prompt_token_ids must be integers in [0, {self.vocab_size})")
        if len(token_ids) > self.max_model_len:
            raise ValueError(
                f"prompt length of {len(token_ids)} tokens is longer than the maximum model "
                f"length of {self.max_model_len} (--max-model-len)")
