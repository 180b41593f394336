"""Prompt tokenization in a pool of Ray actors (``--tokenizer-pool-size N``, type ``ray``).

Each of the N actors loads its own copy of the tokenizer (``load_tokenizer``, so the same
files and flags as the in-process one) and encodes prompts. ``encode`` is the blocking call
used by ``PromptProcessor`` (``LLM.generate``); ``encode_async`` awaits the actor from the
asyncio loop, so the server's front end tokenizes concurrently in N processes and the engine
thread never tokenizes text. Each call goes to the actor with the fewest calls in flight (ties:
fewest calls so far).
``--tokenizer-pool-extra-config`` holds Ray actor options (default ``{"num_cpus": 0}``: the
actors reserve no CPU from the cluster's placement groups).
"""
from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedllm.config import ModelConfig, TokenizerPoolConfig


class TokenizerActor:
    """One tokenizer in a Ray actor (wrapped with ``ray.remote`` by the pool)."""

    def __init__(self, model_config: ModelConfig) -> None:
        from pagedllm.engine.inputs import load_tokenizer
        self.tokenizer = load_tokenizer(model_config)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)


def make_tokenizer_pool(model_config: ModelConfig, pool_config: TokenizerPoolConfig,
                        ) -> "RayTokenizerPool | None":
    """The pool the flags ask for, or None (tokenize in process)."""
    size, extra = pool_config.tokenizer_pool_size, pool_config.tokenizer_pool_extra_config
    if size == 0:
        if extra:
            raise ValueError("--tokenizer-pool-extra-config needs --tokenizer-pool-size > 0")
        return None
    if model_config.skip_tokenizer_init:
        raise ValueError("--tokenizer-pool-size needs a tokenizer; drop "
                         "--skip-tokenizer-init")
    return RayTokenizerPool(model_config, size, extra)


def _kill(actors) -> None:
    import ray
    if not ray.is_initialized():  # the cluster is gone (ray.kill would start a new one)
        return
    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - the cluster is already gone
            pass


class RayTokenizerPool:
    def __init__(self, model_config: ModelConfig, size: int, actor_options: dict | None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ValueError("--tokenizer-pool-type ray needs the ray package: pip install "
                             "'pagedllm[ray]'") from exc
        from pagedllm.ray_utils import connect_ray
        options = dict(actor_options or {"num_cpus": 0})
        connect_ray()
        actor_class = ray.remote(TokenizerActor)
        try:
            actor_class = actor_class.options(**options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--tokenizer-pool-extra-config {actor_options!r} is not a valid "
                             f"set of Ray actor options: {exc}") from exc
        self.actors: list[Any] = [actor_class.remote(model_config) for _ in range(size)]
        self._finalizer = weakref.finalize(self, _kill, list(self.actors))
        self._in_flight = [0] * size
        self.num_calls = [0] * size  # per actor, for tests and stats
        self._lock = threading.Lock()
        try:  # surface a tokenizer that fails to load now, not on the first request
            ray.get([a.encode.remote("") for a in self.actors])
        except Exception as exc:  # noqa: BLE001 - RayTaskError wrapping the loader's error
            self.shutdown()
            raise ValueError(f"the tokenizer pool failed to start: {exc}") from exc

    def _acquire(self) -> int:
        with self._lock:
            index = min(range(len(self.actors)),
                        key=lambda i: (self._in_flight[i], self.num_calls[i]))
            self._in_flight[index] += 1
            self.num_calls[index] += 1
            return index

    def _release(self, index: int) -> None:
        with self._lock:
            self._in_flight[index] -= 1

    def encode(self, text: str) -> list[int]:
        import ray
        index = self._acquire()
        try:
            return ray.get(self.actors[index].encode.remote(text))
        finally:
            self._release(index)

    async def encode_async(self, text: str) -> list[int]:
        index = self._acquire()
        try:
            return await self.actors[index].encode.remote(text)
        finally:
            self._release(index)

    def shutdown(self) -> None:
        self._finalizer()


async def pretokenize(pool: RayTokenizerPool | None, prompt: Any) -> Any:
    """A text prompt as ``{"prompt": text, "prompt_token_ids": ids}`` tokenized by the pool
    (other prompt forms, or no pool: unchanged)."""
    if pool is None:
        return prompt
    if isinstance(prompt, str):
        return {"prompt": prompt, "prompt_token_ids": await pool.encode_async(prompt)}
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str) \
            and "prompt_token_ids" not in prompt:
        return {**prompt, "prompt_token_ids": await pool.encode_async(prompt["prompt"])}
    return prompt
