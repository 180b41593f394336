"""Async output processing: step t+1 runs on the executor thread while step t's outputs are
made. Same tokens, text, logprobs, finish and stop reasons as the synchronous engine; a stop
string seen one step late drops the extra token; no block leaks; aborts and the server's
engine loop keep working."""
import dataclasses

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine.engine import use_async_output_proc
from tests.utils.tiny_models import E2E_PROMPTS, build_tiny_model

PROMPTS = E2E_PROMPTS


@pytest.fixture(scope="module")
def model_path():
    return str(build_tiny_model("llama"))


@pytest.fixture(scope="module")
def sync_llm(model_path):
    return LLM(model=model_path, block_size=8, enable_prefix_caching=True,
               disable_async_output_proc=True)


@pytest.fixture(scope="module")
def async_llm(model_path):
    mp = pytest.MonkeyPatch()
    mp.setenv("PAGEDLLM_ASYNC_OUTPUT_PROC", "1")
    try:
        llm = LLM(model=model_path, block_size=8, enable_prefix_caching=True)
    finally:
        mp.undo()
    assert llm.llm_engine._exec_thread is not None
    return llm


def _outputs(llm, params, prompts=PROMPTS):
    return llm.generate(prompts, params, use_tqdm=False)


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x.outputs) == len(y.outputs)
        for p, q in zip(x.outputs, y.outputs):
            assert p.token_ids == q.token_ids
            assert p.text == q.text
            assert p.finish_reason == q.finish_reason
            assert p.stop_reason == q.stop_reason
            assert p.cumulative_logprob == pytest.approx(q.cumulative_logprob, abs=1e-5) \
                if p.cumulative_logprob is not None else q.cumulative_logprob is None


def _no_leak(llm):
    kv = llm.llm_engine.kv_cache_manager
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine._pending is None


def test_default_only_on_cuda(sync_llm, monkeypatch):
    assert sync_llm.llm_engine._exec_thread is None  # the flag turns it off
    config = sync_llm.llm_engine.config
    monkeypatch.delenv("PAGEDLLM_ASYNC_OUTPUT_PROC", raising=False)

    def variant(device, disable):
        return dataclasses.replace(
            config, device=dataclasses.replace(config.device, device=device),
            scheduler=dataclasses.replace(config.scheduler, disable_async_output_proc=disable))
    assert use_async_output_proc(variant("cuda", False))
    assert not use_async_output_proc(variant("cpu", False))  # CPU: off unless asked for
    assert not use_async_output_proc(variant("cuda", True))
    monkeypatch.setenv("PAGEDLLM_ASYNC_OUTPUT_PROC", "1")
    assert use_async_output_proc(variant("cpu", False))
    assert not use_async_output_proc(variant("cpu", True))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=20, n=2),
    SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[5, 9, 11, 17]),
    SamplingParams(temperature=0, max_tokens=16, prompt_logprobs=1),
])
def test_same_as_sync(sync_llm, async_llm, params):
    _same(_outputs(async_llm, params), _outputs(sync_llm, params))
    _no_leak(async_llm)


def test_stop_string_one_step_late(sync_llm, async_llm):
    """Pick stop strings from the greedy text so requests end mid-run by a stop string."""
    base = _outputs(sync_llm, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    stops = [o.outputs[0].text[6:9] for o in base if len(o.outputs[0].text) > 9]
    assert stops
    for include in (False, True):
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stops,
                                include_stop_str_in_output=include)
        want = _outputs(sync_llm, params)
        assert any(o.outputs[0].finish_reason == "stop" for o in want)
        _same(_outputs(async_llm, params), want)
        _no_leak(async_llm)


def test_outputs_lag_one_step_and_abort(async_llm):
    engine = async_llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request("a", PROMPTS[0], params)
    engine.add_request("b", PROMPTS[1], params)
    assert engine.step() == []  # the first step's outputs come with the second step
    first = engine.step()
    assert sorted(o.request_id for o in first) == ["a", "b"]
    engine.abort_request("a")  # its tokens of the step in flight are dropped
    seen = []
    while engine.has_unfinished_requests():
        seen += engine.step()
    assert {o.request_id for o in seen} == {"b"}
    assert seen[-1].finished and len(seen[-1].outputs[0].token_ids) == 8
    _no_leak(async_llm)
