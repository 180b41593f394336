"""Per-request sampling parameters, with vLLM 0.6.3's field names, defaults and validation.

Validation raises ``ValueError`` naming the field and the accepted range; it never asserts.
Fields whose feature is not built yet are validated the same way and rejected by
``check_supported`` so that nothing is accepted and silently ignored.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any, Callable

from pagedllm.guided.params import GuidedDecodingParams

_SAMPLING_EPS = 1e-5


class SamplingType(IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


class RequestOutputKind(IntEnum):
    CUMULATIVE = 0  # every output carries the whole text so far
    DELTA = 1  # every output carries only what is new since the last one
    FINAL_ONLY = 2  # only the finished output is returned


@dataclass
class SamplingParams:
    """How to turn the model's logits into tokens for one request (see vLLM 0.6.3)."""

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logits_processors: list[Callable] | None = None
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    guided_decoding: GuidedDecodingParams | dict | None = None
    # Filled in by the engine: eos of the tokenizer / generation config.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)
    # Filled in by the engine: guided_decoding compiled for the model's tokenizer.
    compiled_guide: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.best_of is None:
            self.best_of = self.n
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.guided_decoding = GuidedDecodingParams.from_value(self.guided_decoding)
        self.all_stop_token_ids = set(self.stop_token_ids)
        if self.seed == -1:
            self.seed = None
        if 0 < self.temperature < _SAMPLING_EPS:
            self.temperature = 0.0
        self._verify()
        if self.temperature < _SAMPLING_EPS:
            # Greedy: the filters are meaningless, normalise them so batching sees one kind.
            self.top_p, self.top_k, self.min_p = 1.0, -1, 0.0

    def _verify(self) -> None:
        self._verify_finite()
        _check(self.n >= 1, "n", self.n, "must be at least 1")
        _check(self.best_of >= self.n, "best_of", self.best_of, f"must be >= n ({self.n})")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2.0 <= value <= 2.0, name, value, "must be in [-2, 2]")
        _check(self.repetition_penalty > 0.0, "repetition_penalty", self.repetition_penalty,
               "must be greater than zero")
        _check(self.temperature >= 0.0, "temperature", self.temperature, "must be non-negative")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        _check(self.top_k == -1 or self.top_k >= 1, "top_k", self.top_k,
               "must be -1 (disable) or at least 1")
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "must be in [0, 1]")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", self.max_tokens,
               "must be at least 1")
        _check(self.min_tokens >= 0, "min_tokens", self.min_tokens, "must be non-negative")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               self.min_tokens, f"must be less than or equal to max_tokens={self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or value >= 0, name, value, "must be non-negative")
        _check(self.truncate_prompt_tokens is None or self.truncate_prompt_tokens >= 1,
               "truncate_prompt_tokens", self.truncate_prompt_tokens, "must be >= 1")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "must be non-empty strings")
        _check(all(isinstance(t, int) for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "must be integers")
        _check(not (self.stop and not self.detokenize), "stop", self.stop,
               "stop strings are only supported when detokenize is True")
        if self.best_of > 1 and self.temperature < _SAMPLING_EPS:
            raise ValueError(f"best_of must be 1 when using greedy sampling, got {self.best_of}.")
        if self.allowed_token_ids is not None:
            _check(len(self.allowed_token_ids) > 0, "allowed_token_ids", self.allowed_token_ids,
                   "must not be empty")

    def _verify_finite(self) -> None:
        """NaN and infinities first: NaN fails every range check below with a misleading rule,
        and ``inf`` passes the one-sided ones (temperature, repetition_penalty)."""
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            _check(_is_finite(value), name, value, "must be a finite number")
        for token_id, bias in (self.logit_bias or {}).items():
            _check(_is_finite(bias), "logit_bias", {token_id: bias},
                   "values must be finite numbers")

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _SAMPLING_EPS:
            return SamplingType.GREEDY
        return SamplingType.RANDOM_SEED if self.seed is not None else SamplingType.RANDOM

    def update_from_generation_config(self, eos_token_ids: set[int]) -> None:
        """Record the model's EOS ids (stop unless ignore_eos) in ``all_stop_token_ids``."""
        if not self.ignore_eos:
            self.all_stop_token_ids |= set(eos_token_ids)

    def clone(self) -> "SamplingParams":
        """Deep copy, but logits processors (arbitrary callables) are shared."""
        processors = self.logits_processors
        self.logits_processors = None
        try:
            cloned = copy.deepcopy(self)
        finally:
            self.logits_processors = processors
        cloned.logits_processors = processors
        return cloned

    def unsupported_fields(self) -> list[str]:
        """Fields set to a value whose feature this build does not implement yet."""
        defaults = SamplingParams.__dataclass_fields__
        unsupported = []
        for name in _NOT_BUILT:
            value = getattr(self, name)
            default = defaults[name].default
            if name == "best_of":
                default = self.n
            if value not in (default, None) and value != []:
                unsupported.append(name)
        return unsupported

    def __repr__(self) -> str:
        shown = (f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
        return f"SamplingParams({', '.join(shown)})"


# Fields validated above whose feature is not built yet (none at the moment).
_NOT_BUILT: tuple[str, ...] = ()


_FLOAT_FIELDS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature",
                 "top_p", "min_p")


def _is_finite(value: Any) -> bool:
    """Ints (and non-numbers, which the range checks reject) count as finite."""
    return not isinstance(value, float) or math.isfinite(value)


def _check(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} {rule}, got {value!r}.")


@dataclass
class BeamSearchParams:
    """Parameters of ``LLM.beam_search`` (vLLM 0.6.3's offline beam search)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name, ok in (("beam_width", self.beam_width >= 1), ("max_tokens", self.max_tokens >= 1),
                         ("temperature", self.temperature >= 0.0)):
            if not ok:
                raise ValueError(f"BeamSearchParams.{name} must be positive (temperature: "
                                 f"non-negative), got {getattr(self, name)!r}.")
