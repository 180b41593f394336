"""The periodic stats log line (turned off by --disable-log-stats)."""
from __future__ import annotations

import logging
import time

logger = logging.getLogger("pagedllm.engine")
_INTERVAL_S = 5.0


class StatLogger:
    def __init__(self, engine) -> None:
        self.engine = engine
        self._last_log = time.monotonic()
        self._prompt_tokens = 0
        self._generation_tokens = 0

    def record(self, scheduler_output, updated_requests) -> None:
        self._generation_tokens += sum(n for _, n in updated_requests)
        spec = scheduler_output.spec_token_ids  # a decode with its draft is no prompt
        self._prompt_tokens += sum(n for r, n in scheduler_output.num_scheduled_tokens.items()
                                   if n > 1 and r not in spec)
        now = time.monotonic()
        if now - self._last_log < _INTERVAL_S:
            return
        elapsed = now - self._last_log
        sched, kv = self.engine.scheduler, self.engine.kv_cache_manager
        logger.info(
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
            "Running: %d reqs, Swapped: %d reqs, Pending: %d reqs, GPU KV cache usage: %.1f%%, "
            "CPU KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
            self._prompt_tokens / elapsed, self._generation_tokens / elapsed, len(sched.running),
            len(sched.swapped), len(sched.waiting), kv.usage() * 100, kv.cpu_usage() * 100,
            kv.prefix_cache_hit_rate() * 100)
        if sched.spec is not None:
            acceptance, efficiency = sched.spec_rates()
            logger.info("Speculative metrics: Draft acceptance rate: %.3f, System efficiency: "
                        "%.3f, Number of speculative tokens: %d, Number of accepted tokens: %d, "
                        "Number of draft tokens: %d, Number of emitted tokens: %d.",
                        acceptance, efficiency, sched.spec.num_tokens,
                        sched.spec_accepted_tokens_total, sched.spec_draft_tokens_total,
                        sched.spec_emitted_tokens_total)
        self._last_log, self._prompt_tokens, self._generation_tokens = now, 0, 0
