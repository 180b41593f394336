"""Per-request parameters of a pooling (embedding) request: vLLM 0.6.3's ``PoolingParams``.

A pooling request runs its prompt once (prefill only) and answers the model's pooled hidden
state instead of sampled tokens; ``LLM.encode`` and ``/v1/embeddings`` send one. 0.6.3 has a
single field, ``additional_data``: opaque data for a model that reads it. None of the built-in
poolers does (there or here), so it is accepted and stays with the caller's request; the
engine core runs every pooling request the same way.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any


@dataclass
class PoolingParams:
    additional_data: Any | None = None

    def clone(self) -> "PoolingParams":
        return copy.deepcopy(self)
