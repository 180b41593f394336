"""``GuidedMatchers``: the per-request grammar matchers of the model runner (compute plane).

Owned by ``ModelRunner``. Lifecycle of one guided request's matcher:
1. ``add`` when the request arrives in ``scheduled_new_reqs`` (first schedule, or again after
   a recompute preemption): a fresh matcher from the compiled guide, then the request's output
   tokens so far are replayed, so a recomputed request resumes exactly where it was;
2. ``fill`` each step the request samples (on a helper thread, during the forward): one
   bitmask row of allowed tokens (a terminated matcher, which has accepted EOS, allows only
   the stop tokens), expanded to an additive logits mask;
3. ``accept`` after sampling, with the sampled token;
4. ``remove`` when the request finishes or is preempted.
The sampler applies the masks of the whole batch in one op (``sample/ops/guided.py``).
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from pagedllm.guided.compiler import CompiledGuide
from pagedllm.sample.ops.guided import additive_mask

_MIN_BATCH_FILL = 8  # rows from which xgrammar's multi-threaded batch fill is used ...
_MIN_CPUS_BATCH_FILL = 4  # ... on machines with more cores than this


@dataclass
class GuidedInputs:
    rows: torch.Tensor  # [num_guided] sampling rows that are constrained
    mask: torch.Tensor  # [num_guided, vocab] fp32 additive: 0 allowed, -inf disallowed


class GuidedMatchers:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.num_words = (vocab_size + 31) // 32
        self.device = device
        self._matchers: dict[str, object] = {}
        self._guides: dict[str, CompiledGuide] = {}
        self._batch_filler = None
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self._matchers)

    def add(self, req_id: str, guide: CompiledGuide, output_token_ids: list[int]) -> None:
        matcher = guide.new_matcher()
        for token_id in output_token_ids:
            matcher.accept_token(token_id)
        self._matchers[req_id] = matcher
        self._guides[req_id] = guide

    def remove(self, req_id: str) -> None:
        self._matchers.pop(req_id, None)
        self._guides.pop(req_id, None)

    def fill_async(self, req_ids: list[str]) -> Future | None:
        """Start ``fill`` on a helper thread (it overlaps the model forward); None if no row
        of ``req_ids`` is guided."""
        if not self._matchers or not any(r in self._matchers for r in req_ids):
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="guided-fill")
        return self._pool.submit(self.fill, req_ids)

    def fill(self, req_ids: list[str]) -> GuidedInputs | None:
        """Masks for the guided requests among ``req_ids`` (the sampling rows): each matcher
        fills one bitmask row (bit j of word w: token 32w + j allowed), expanded at the end."""
        rows = [i for i, r in enumerate(req_ids) if r in self._matchers]
        if not rows:
            return None
        bitmask = torch.zeros((len(rows), self.num_words), dtype=torch.int32)
        live, live_idx = [], []
        for local, row in enumerate(rows):
            req_id = req_ids[row]
            matcher = self._matchers[req_id]
            if matcher.is_terminated():
                _set_bits(bitmask[local], self._guides[req_id].stop_token_ids)
            else:
                live.append(matcher)
                live_idx.append(local)
        self._fill_rows(live, live_idx, bitmask)
        # Expanded here, on the helper thread, so the sampler only adds it to the logits.
        mask = additive_mask(bitmask.to(self.device, non_blocking=True), self.vocab_size)
        return GuidedInputs(torch.tensor(rows, dtype=torch.long, device=self.device), mask)

    def _fill_rows(self, matchers: list, indices: list[int], bitmask: torch.Tensor) -> None:
        """xgrammar's multi-threaded batch fill for many xgrammar rows on a many-core host;
        otherwise (few rows or cores, other backends) one matcher at a time."""
        batched = [i for i, m in enumerate(matchers) if type(m).__name__ == "GrammarMatcher"]
        if len(batched) < _MIN_BATCH_FILL or (os.cpu_count() or 1) <= _MIN_CPUS_BATCH_FILL:
            batched = []
        if batched:
            self._batch().batch_fill_next_token_bitmask(
                [matchers[i] for i in batched], bitmask, [indices[i] for i in batched])
        done = set(batched)
        for i, (matcher, local) in enumerate(zip(matchers, indices)):
            if i not in done:
                matcher.fill_next_token_bitmask(bitmask, local)

    def accept(self, req_ids: list[str], token_ids: list[int]) -> None:
        for req_id, token_id in zip(req_ids, token_ids):
            matcher = self._matchers.get(req_id)
            if matcher is not None and not matcher.is_terminated():
                matcher.accept_token(token_id)

    def _batch(self):
        if self._batch_filler is None:
            import xgrammar as xgr
            self._batch_filler = xgr.BatchGrammarMatcher()
        return self._batch_filler


def _set_bits(row: torch.Tensor, token_ids: tuple[int, ...]) -> None:
    for t in token_ids:
        word, bit = divmod(t, 32)
        row[word] |= (1 << bit) if bit < 31 else -(1 << 31)
