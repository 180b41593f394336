"""``GuidedDecodingParams``: one output constraint of a request (vLLM 0.6.3 field names).

Exactly one of ``json``, ``regex``, ``choice``, ``grammar``, ``json_object`` is set;
``backend`` overrides ``--guided-decoding-backend`` for this request and
``whitespace_pattern`` is the regex of whitespace allowed between JSON tokens.
"""
from __future__ import annotations

import json as _json
from dataclasses import asdict, dataclass
from typing import Any

BACKENDS = ("outlines", "lm-format-enforcer", "xgrammar")
IMPLEMENTED_BACKENDS = ("xgrammar", "outlines", "lm-format-enforcer")
_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class GuidedDecodingParams:
    json: str | dict | None = None  # JSON schema (dict or JSON text; a pydantic model class)
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # EBNF (GBNF) or Lark grammar text
    json_object: bool | None = None  # any JSON object
    backend: str | None = None
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        if self.json is not None and not isinstance(self.json, (str, dict)):
            schema = getattr(self.json, "model_json_schema", None)
            if schema is None:
                raise ValueError("GuidedDecodingParams.json must be a JSON schema (dict or "
                                 f"string) or a pydantic model, got {type(self.json).__name__}")
            object.__setattr__(self, "json", schema())
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice) \
                    or not self.choice:
                raise ValueError("GuidedDecodingParams.choice must be a non-empty list of "
                                 f"strings, got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))
        kinds = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError("GuidedDecodingParams needs exactly one of json, regex, choice, "
                             f"grammar, json_object; got {kinds or 'none'}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"guided_decoding_backend {self.backend!r} is not one of "
                             f"{', '.join(BACKENDS)}")

    @classmethod
    def from_value(cls, value: Any) -> "GuidedDecodingParams | None":
        """Accept the dataclass, a dict of its fields (the server's form) or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"GuidedDecodingParams has no field(s) {sorted(unknown)}")
            return cls(**value)
        raise ValueError("SamplingParams.guided_decoding must be GuidedDecodingParams or a "
                         f"dict, got {type(value).__name__}")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def cache_key(self) -> str:
        """Stable text naming the constraint (backend resolved by the caller)."""
        fields = asdict(self)
        fields.pop("backend")
        return _json.dumps(fields, sort_keys=True, default=str)
