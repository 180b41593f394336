"""Async output processing: the next step is launched on the device before step t's outputs
are made, and a decode step of the same requests is scheduled ahead (with projected counts)
and launched before step t's ids reach the host (the single-step lookahead). Same tokens,
text, logprobs, finish and stop reasons as the synchronous engine; a stop string seen one
step late drops the extra token; no block leaks; aborts and the server's engine loop keep
working."""
import dataclasses

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine.engine import use_async_output_proc
from tests.utils.schedules import recorded_schedules
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
    engine = llm.llm_engine
    assert engine.core._lookahead and engine.scheduler.lookahead
    assert engine.core._ahead and engine.core._depth == 2
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
    assert not llm.llm_engine.core._in_flight


def test_default_only_on_cuda(sync_llm, monkeypatch):
    assert not sync_llm.llm_engine.core._lookahead  # the flag turns it off
    assert not sync_llm.llm_engine.scheduler.lookahead
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


def test_next_step_runs_while_outputs_are_made_and_abort(async_llm):
    engine = async_llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request("a", PROMPTS[0], params)
    engine.add_request("b", PROMPTS[1], params)
    first = engine.step()  # the prompts' step, made while the first decode step runs
    assert sorted(o.request_id for o in first) == ["a", "b"]
    assert [so.num_scheduled_tokens for so in engine.core._in_flight] == [{"a": 1, "b": 1}]
    second = engine.step()  # a decode step: the next one was scheduled ahead and launched
    assert sorted(o.request_id for o in second) == ["a", "b"]
    assert len(engine.core._in_flight) == 1 and engine.core._in_flight[0].multi_step
    engine.abort_request("a")  # its tokens of the step in flight are dropped
    seen = []
    while engine.has_unfinished_requests():
        seen += engine.step()
    assert {o.request_id for o in seen} == {"b"}
    assert seen[-1].finished and len(seen[-1].outputs[0].token_ids) == 8
    _no_leak(async_llm)


def test_decode_steps_are_scheduled_ahead(async_llm):
    """Greedy decodes of running requests: every decode step after the first is scheduled
    by the lookahead, as a one-step multi-step batch; the last token of a request whose
    max_tokens ends inside the running step is not scheduled again."""
    with recorded_schedules(async_llm.llm_engine.scheduler) as seen:
        _outputs(async_llm, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                 PROMPTS[:2])
    seen = [(kind, out.num_steps, out.multi_step) for kind, out in seen]
    # the prompts, the first decode step, then 4 decode steps scheduled ahead
    assert seen == [("schedule", 1, False), ("schedule", 1, True)] + [("ahead", 1, True)] * 4
    _no_leak(async_llm)
