"""AsyncMPLLMEngine (the engine core in a child process) against the in-process LLM.

Oracle: ``LLM.generate`` on the same tiny model: the same texts, token ids, logprobs and
finish reasons through the process split (stop strings found in the front end included);
a step that raises fails only the requests in flight, and the next request is served; a
rejected request is a ValueError; an abandoned stream is aborted in the core (KV freed).
"""
import asyncio
import os

import pytest

from pagedllm import LLM
from pagedllm.engine.async_engine import EngineStepError
from pagedllm.engine.async_mp_engine import AsyncMPLLMEngine
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from tests.utils.tiny_models import build_tiny_model

PROMPTS = ["The for statement", "Hello", "A class definition", "import os"]


def fail_always(token_ids, logits):
    """A logits processor that raises: its step fails (module level: it crosses processes)."""
    raise RuntimeError("processor failed")


@pytest.fixture(scope="module")
def model_path():
    return str(build_tiny_model("llama"))


def _params(**kw):
    kw.setdefault("max_tokens", 12)
    return SamplingParams(temperature=0, output_kind=RequestOutputKind.DELTA, **kw)


async def _run(engine, prompt, params, req_id):
    outputs = [o async for o in engine.generate(prompt, params, req_id)]
    c = outputs[-1].outputs[0]
    return ("".join(o.outputs[0].text for o in outputs),
            [t for o in outputs for t in o.outputs[0].token_ids],
            [lp for o in outputs for lp in (o.outputs[0].logprobs or [])],
            c.finish_reason, c.stop_reason)


def test_same_outputs_as_llm_and_faults(model_path):
    llm = LLM(model=model_path)
    plain = SamplingParams(temperature=0, max_tokens=12, logprobs=2)
    texts = [o.outputs[0].text for o in llm.generate(PROMPTS, plain, use_tqdm=False)]
    stop = next(t[2:5] for t in texts if len(t) > 6)  # a stop string that occurs
    stopped = SamplingParams(temperature=0, max_tokens=12, stop=[stop])
    expected = [(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].logprobs,
                 o.outputs[0].finish_reason, o.outputs[0].stop_reason)
                for params in (plain, stopped)
                for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    engine = AsyncMPLLMEngine(llm.llm_engine.config, log_requests=False)

    async def main():
        try:
            jobs = [_run(engine, p, _params(logprobs=2), f"a{i}") for i, p in enumerate(PROMPTS)]
            jobs += [_run(engine, p, _params(stop=[stop]), f"s{i}")
                     for i, p in enumerate(PROMPTS)]
            got = await asyncio.gather(*jobs)
            with pytest.raises(ValueError, match="max_logprobs|greater than"):
                await _run(engine, "x", _params(logprobs=10 ** 6), "bad")
            with pytest.raises(EngineStepError):
                await _run(engine, "x", _params(logits_processors=[fail_always]), "fail")
            after = await _run(engine, PROMPTS[0], _params(logprobs=2), "after")
            # utility calls run in the core process between steps
            assert await engine.call_core("get_num_unfinished_requests") == 0
            assert (await engine.call_core("cache_info")) == engine.cache_info()
            with pytest.raises(RuntimeError, match="AttributeError"):
                await engine.call_core("no_such_method")
            gen = engine.generate(PROMPTS[1], _params(max_tokens=10 ** 4, ignore_eos=True),
                                  "gone")
            await gen.__anext__()
            await gen.aclose()  # the client went away: aborted in the core
            for _ in range(100):
                stats = engine.get_stats()
                if stats["num_requests_running"] == 0 and stats["gpu_cache_usage_perc"] == 0:
                    break
                await asyncio.sleep(0.05)
            return got, after, stats
        finally:
            engine.shutdown()
    got, after, stats = asyncio.run(main())
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert [g[1] for g in got] == [list(e[1]) for e in expected]
    assert [g[3:] for g in got] == [e[3:] for e in expected]
    for g, e in zip(got[:len(PROMPTS)], expected):  # batches differ: fp32 rounding only
        assert [list(d) for d in g[2]] == [list(d) for d in e[2]]
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-4
                   for a, b in zip(g[2], e[2]) for t in a)
    assert any(g[4] == stop for g in got[len(PROMPTS):])  # a stop string did end one
    assert after[0] == expected[0][0]
    assert stats["num_requests_running"] == 0 and stats["gpu_cache_usage_perc"] == 0
    assert not engine.client.is_alive()


def test_core_takes_the_front_ends_configuration():
    """After ("args", ...) the core waits for the front end's resolved configuration, or for
    ("resolve",) when it was too large for the pipe or did not pickle (the core then resolves
    the arguments); a stop or a closed pipe ends the start."""
    import multiprocessing
    import threading

    from pagedllm.engine import core_client
    front, core = multiprocessing.Pipe(duplex=True)
    client = object.__new__(core_client.MPCoreClient)
    client._ready = front

    class Alive:
        exitcode = None
    client.proc = Alive()
    front.send(("args", "engine args", True))
    threading.Timer(0.05, client.offer_config, ({"model": "m"},)).start()  # comes later
    assert core_client._wait_config(core, os.getppid()) \
        == ("config", {"model": "m"}, True)
    for unsendable in ({"big": "x" * core_client._OFFER_MAX_BYTES}, {"f": lambda: 0}):
        front.send(("args", "engine args", False))
        assert not client.offer_config(unsendable)
        assert core_client._wait_config(core, os.getppid()) == ("args", "engine args", False)
    client.configure("resolved first", True)
    assert core_client._wait_config(core, os.getppid()) == ("config", "resolved first", True)
    front.send(("args", "engine args", False))
    front.send(("stop",))
    assert core_client._wait_config(core, os.getppid()) is None
    front.close()
    assert core_client._wait_config(core, os.getppid()) is None  # the front end is gone
