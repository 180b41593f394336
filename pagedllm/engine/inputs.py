"""Prompt inputs (text, token ids, or their dict forms) -> validated token ids.

Accepted like vLLM: a string, ``{"prompt": str}``, ``{"prompt_token_ids": [int, ...]}`` or a
list of ints. With ``--skip-tokenizer-init`` only token ids are accepted.
"""
from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any, Union

logger = logging.getLogger("pagedllm.engine.inputs")

if TYPE_CHECKING:
    from pagedllm.config import ModelConfig, TokenizerPoolConfig

PromptInputs = Union[str, list[int], dict]


def load_tokenizer(model_config: ModelConfig):
    from transformers import AutoTokenizer
    path, kwargs = model_config.tokenizer_path, {}
    assert path is not None  # resolved by create_engine_config; None only with no tokenizer
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


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_lora_tokenizer(model_config, lora_path: str) -> Any | None:
    """The tokenizer a LoRA adapter directory ships (e.g. with added tokens), loaded as the
    base one is; None when it has none or it does not load (vLLM 0.6.3's
    ``get_lora_tokenizer``: the base tokenizer serves then, with a warning)."""
    if not any(os.path.isfile(os.path.join(lora_path, f)) for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(
            lora_path, use_fast=model_config.tokenizer_mode != "slow",
            trust_remote_code=model_config.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - vLLM falls back to the base tokenizer
        logger.warning("No tokenizer found in %s, using base model tokenizer instead. "
                       "(Exception: %s)", lora_path, exc)
        return None


class LoRATokenizers:
    """Which tokenizer serves a request: its LoRA adapter's own (loaded once per adapter id)
    or the base model's. Every user (front-end prompt encoding, detokenization, the server's
    /tokenize) keeps its own instance: fast tokenizers are not safe across threads."""

    MAX_CACHED = 32  # adapters whose tokenizer stays loaded (least recently used go first)

    def __init__(self, model_config, base) -> None:
        self.model_config, self.base = model_config, base
        self._loaded: dict[int, Any] = {}  # adapter id -> tokenizer, least recent first

    def get(self, lora_request=None):
        if lora_request is None or self.base is None:
            return self.base
        key = lora_request.lora_int_id
        tokenizer = self._loaded.pop(key, None)
        if tokenizer is None:
            tokenizer = load_lora_tokenizer(self.model_config, lora_request.path) or self.base
            if len(self._loaded) >= self.MAX_CACHED:
                del self._loaded[next(iter(self._loaded))]
        self._loaded[key] = tokenizer
        return tokenizer


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
    def __init__(self, model_config: ModelConfig,
                 pool_config: TokenizerPoolConfig | None = None) -> None:
        from pagedllm.engine.tokenizer_pool import make_tokenizer_pool
        # None in these fields means "derive it"; create_engine_config has derived them
        assert model_config.max_model_len is not None and model_config.model_path is not None
        self.max_model_len: int = model_config.max_model_len
        self.vocab_size = model_config.vocab_size
        self.tokenizer = None if model_config.skip_tokenizer_init else \
            load_tokenizer(model_config)
        self.lora_tokenizers = LoRATokenizers(model_config, self.tokenizer)
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

    def process(self, prompt: PromptInputs,
                lora_request=None) -> tuple[str | None, list[int]]:
        """(text, validated ids); text is encoded by the LoRA adapter's own tokenizer when
        ``lora_request`` ships one, else by the base tokenizer (or the pool)."""
        text, token_ids = self._split(prompt)
        if token_ids is None:
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; with --skip-tokenizer-init pass "
                                 "prompt_token_ids")
            tokenizer = self.lora_tokenizers.get(lora_request)
            encoder = self.pool if self.pool is not None and tokenizer is self.tokenizer \
                else tokenizer
            assert text is not None  # _split gives the text whenever it gives no ids
            token_ids = encoder.encode(text)
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
