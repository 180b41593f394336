"""AsyncLLMEngine over a scripted fake engine: outputs stream in order, add errors come back as
ValueError without stopping the loop, a failing step fails the in-flight requests (no hang),
and abort reaches the engine. Then once over the real engine with a tiny model."""
import asyncio

import pytest

from pagedllm.engine.async_engine import AsyncLLMEngine, EngineStepError
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


class _Req:
    def __init__(self, num_prompt_tokens):
        self.num_prompt_tokens = num_prompt_tokens


class FakeEngine:
    """Each request emits one token per step until it has ``max_tokens``."""

    def __init__(self):
        self.requests, self.aborted, self.fail_next_step = {}, [], False

    def add_request(self, req_id, prompt, params, arrival_time=None, priority=0,
                    prompt_adapter_request=None, trace_headers=None, lora_request=None):
        if prompt == "bad":
            raise ValueError("prompt 'bad' is invalid")
        self.requests[req_id] = [params.max_tokens, 0]
        return _Req(len(prompt))

    def abort_request(self, req_ids):
        for req_id in [req_ids] if isinstance(req_ids, str) else req_ids:
            self.aborted.append(req_id)
            self.requests.pop(req_id, None)

    def has_unfinished_requests(self):
        return bool(self.requests)

    def request_ids(self):
        return list(self.requests)

    def step(self):
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("boom")
        outputs = []
        for req_id, state in list(self.requests.items()):
            state[1] += 1
            done = state[1] >= state[0]
            outputs.append(RequestOutput(
                req_id, None, [1], None,
                [CompletionOutput(0, "x", [7], None, None, "length" if done else None)], done))
            if done:
                del self.requests[req_id]
        return outputs


def _params(max_tokens):
    return SamplingParams(max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA)


async def _collect(engine, prompt, req_id, max_tokens=3):
    return [o async for o in engine.generate(prompt, _params(max_tokens), req_id)]


def test_streams_errors_and_abort():
    async def main():
        fake = FakeEngine()
        engine = AsyncLLMEngine(fake, log_requests=False)
        outs = await asyncio.gather(_collect(engine, "ab", "a", 3), _collect(engine, "c", "b", 2))
        # a reader that lags gets its pending DELTA outputs coalesced into one
        assert [sum(len(x.outputs[0].token_ids) for x in o) for o in outs] == [3, 2]
        assert ["".join(x.outputs[0].text for x in o) for o in outs] == ["xxx", "xx"]
        assert outs[0][-1].finished and outs[0][-1].outputs[0].finish_reason == "length"
        with pytest.raises(ValueError, match="bad"):
            await _collect(engine, "bad", "c")
        assert len(await _collect(engine, "ok", "d", 1)) == 1  # the loop survived
        # a failing step fails the in-flight request instead of hanging it
        fake.fail_next_step = True
        stream = await engine.add_request("e", "x", _params(100))
        with pytest.raises(EngineStepError):
            await asyncio.wait_for(_drain(stream), 5)
        assert "e" in fake.aborted and engine.num_step_errors == 1
        # leaving a stream early aborts the request in the engine
        gen = engine.generate("x", _params(10 ** 6), "f")
        await gen.__anext__()
        await gen.aclose()
        for _ in range(50):
            if "f" in fake.aborted:
                break
            await asyncio.sleep(0.01)
        assert "f" in fake.aborted
        engine.shutdown()
    asyncio.run(main())


async def _drain(stream):
    async for _ in stream:
        pass


def test_real_engine_matches_llm():
    from pagedllm import LLM
    from tests.utils.tiny_models import build_tiny_model
    llm = LLM(model=str(build_tiny_model("llama")))
    prompts = ["The for statement", "Hello", "A class definition"]
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = [o.outputs[0].text for o in llm.generate(prompts, greedy, use_tqdm=False)]

    async def main():
        engine = AsyncLLMEngine(llm.llm_engine, log_requests=False)
        delta = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                               output_kind=RequestOutputKind.DELTA)
        texts = await asyncio.gather(*(_text(engine, p, delta, str(i))
                                       for i, p in enumerate(prompts)))
        stats = engine.get_stats()
        assert await engine.call_core("get_num_unfinished_requests") == 0
        with pytest.raises(AttributeError):
            await engine.call_core("no_such_method")
        engine.shutdown()
        return texts, stats
    texts, stats = asyncio.run(main())
    assert texts == expected
    assert stats["gpu_cache_usage_perc"] == 0 and stats["num_requests_running"] == 0


async def _text(engine, prompt, params, req_id):
    return "".join([o.outputs[0].text async for o in engine.generate(prompt, params, req_id)])
