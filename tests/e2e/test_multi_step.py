"""Multi-step decode (--num-scheduler-steps): same tokens, text, logprobs and stops as one
step at a time; blocks cover every step; per-token streaming of outputs. Every multi-step
test runs twice: synchronously and with the lookahead of async output processing (the next
batch launched before the last one's outputs; forced on the CPU here)."""
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.sampling_params import RequestOutputKind
from tests.utils.schedules import recorded_schedules
from tests.utils.tiny_models import E2E_PROMPTS, build_tiny_model

PROMPTS = E2E_PROMPTS


@pytest.fixture(scope="module")
def model_path():
    return str(build_tiny_model("llama"))


@pytest.fixture(scope="module")
def single(model_path):
    return LLM(model=model_path, block_size=8)


def _multi_llm(model_path, lookahead: bool, **kw):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAGEDLLM_ASYNC_OUTPUT_PROC", "1")  # on the CPU too
        llm = LLM(model=model_path, block_size=8, num_scheduler_steps=8,
                  disable_async_output_proc=not lookahead, **kw)
    assert llm.llm_engine.core._lookahead == lookahead
    return llm


@pytest.fixture(scope="module", params=["sync", "lookahead"])
def multi(model_path, request):
    return _multi_llm(model_path, request.param == "lookahead")


def _run(llm, params, prompts=PROMPTS):
    return llm.generate(prompts, params, use_tqdm=False)


def _same(a, b):
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert x.outputs[0].text == y.outputs[0].text
        assert x.outputs[0].finish_reason == y.outputs[0].finish_reason
        assert x.outputs[0].stop_reason == y.outputs[0].stop_reason


def test_multi_step_runs_several_steps_per_schedule(multi):
    with recorded_schedules(multi.llm_engine.scheduler) as record:
        _run(multi, SamplingParams(temperature=0, max_tokens=21, ignore_eos=True),
             PROMPTS[:1])
    seen = [out.num_steps for _, out in record]
    ahead = [out.num_steps for kind, out in record if kind == "ahead"]
    # one prefill step, then decode steps of 8, 8 and the last 4 tokens (capped by max_tokens);
    # with lookahead the last two are scheduled while the batch before them runs
    assert seen == [1, 8, 8, 4]
    assert ahead == ([8, 4] if multi.llm_engine.core._lookahead else [])
    assert multi.llm_engine.kv_cache_manager.num_free_blocks == \
        multi.llm_engine.kv_cache_manager.pool.num_blocks


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=3),
    SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=7, max_tokens=25, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=40),  # EOS may end requests mid-batch
])
def test_same_outputs_as_single_step(single, multi, params):
    a, b = _run(single, params), _run(multi, params)
    _same(a, b)
    if params.logprobs:
        for x, y in zip(a, b):
            for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
                assert lx.keys() == ly.keys()
                for k in lx:
                    assert abs(lx[k].logprob - ly[k].logprob) < 1e-5
            assert abs(x.outputs[0].cumulative_logprob - y.outputs[0].cumulative_logprob) < 1e-4


def test_stop_strings_and_stop_ids_inside_a_batch(single, multi):
    base = _run(single, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    # stop on text that appears in the middle of each greedy output, and on a token id
    stops = [o.outputs[0].text[5:8] for o in base if len(o.outputs[0].text) > 8]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stops)
    _same(_run(single, params), _run(multi, params))
    stop_id = base[0].outputs[0].token_ids[11]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                            stop_token_ids=[stop_id])
    a, b = _run(single, params), _run(multi, params)
    _same(a, b)
    assert b[0].outputs[0].token_ids[-1] == stop_id and b[0].outputs[0].stop_reason == stop_id


def test_host_side_sampling_falls_back_to_single_steps(single, multi):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                            repetition_penalty=1.3, min_tokens=4)
    _same(_run(single, params), _run(multi, params))


def test_stream_outputs_per_token_or_per_batch(model_path):
    params = SamplingParams(temperature=0, max_tokens=17, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    counts = {}
    for stream in (True, False):
        llm = LLM(model=model_path, block_size=8, num_scheduler_steps=8,
                  multi_step_stream_outputs=stream)
        engine = llm.llm_engine
        engine.add_request("r", "Hello", params)
        outputs, tokens = [], []
        while engine.has_unfinished_requests():
            for out in engine.step():
                outputs.append(out)
                tokens += out.outputs[0].token_ids
        counts[stream] = len(outputs)
        assert len(tokens) == 17
    assert counts == {True: 17, False: 3}  # steps of 1 (prefill), 8 and 8 tokens


def test_lookahead_with_arrivals_and_aborts(model_path, single):
    """Requests added and aborted while lookahead batches are in flight: the others' outputs
    equal one-step decoding's, the aborted one stops, and every block comes back."""
    llm = _multi_llm(model_path, True)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = {o.prompt: o.outputs[0].token_ids for o in _run(single, params, PROMPTS[:3])}
    engine.add_request("a", PROMPTS[0], params)
    engine.add_request("b", PROMPTS[1], params)
    tokens: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        if steps == 3:  # a multi-step batch and its lookahead are in flight now
            assert len(engine.core._in_flight) == 1 and engine.core._in_flight[0].num_steps > 1
            engine.add_request("c", PROMPTS[2], params)
        if steps == 5:
            engine.abort_request("b")
    assert tokens["a"] == list(expected[PROMPTS[0]])
    assert tokens["c"] == list(expected[PROMPTS[2]])
    assert 0 < len(tokens["b"]) < 40
    assert tokens["b"] == list(expected[PROMPTS[1]])[:len(tokens["b"])]
    kv = engine.kv_cache_manager
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert not engine.scheduler.in_flight and not engine.core.worker.runner._late_inputs


def test_lookahead_random_sampling_same_as_sync(model_path):
    """Unseeded random sampling draws from the engine's generator in launch order: a
    lookahead engine gives the tokens of a synchronous one with the same --seed."""
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=30, ignore_eos=True)
    outs = [_run(_multi_llm(model_path, lookahead, seed=3), params) for lookahead in (False, True)]
    _same(*outs)
