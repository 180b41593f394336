"""One step loop: speculative decoding and --collect-detailed-traces run through the engine
core's in-flight queue of launched batches, one batch at a time (depth 1), with async output
processing on (the next batch launched before a step's deltas are returned). Oracles: the
plain engine's greedy tokens through ``EngineCore.step`` (no speculation, no async output);
the batches actually launched (never two in flight); a request's model execute seconds,
which batches in flight together would count twice, never exceed its wall time."""
from __future__ import annotations

import time

import pytest
import torch

from pagedllm import SamplingParams
from pagedllm.arg_utils import EngineArgs
from pagedllm.engine.core import CoreRequest, EngineCore
from tests.utils.tiny_models import VOCAB_SIZE, build_tiny_model

SPEC = dict(speculative_model="[ngram]", num_speculative_tokens=4, ngram_prompt_lookup_max=3)
TRACES = dict(otlp_traces_endpoint="http://127.0.0.1:9", collect_detailed_traces="all")


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(build_tiny_model("llama"))


def _prompts() -> list[list[int]]:
    """Prompts with repeats (the n-gram lookup finds drafts) and one without."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(3, VOCAB_SIZE, (12,), generator=gen).tolist()
    return [base * 3, base[:5] * 4 + [7, 8], torch.randint(3, VOCAB_SIZE, (20,),
                                                            generator=gen).tolist()]


def _core(model_path: str, monkeypatch, async_output: bool, **kw) -> EngineCore:
    """An engine core; ``async_output`` on the CPU too (the switch is read at construction),
    off on CUDA too (--disable-async-output-proc: the plain path on every device)."""
    if async_output:
        monkeypatch.setenv("PAGEDLLM_ASYNC_OUTPUT_PROC", "1")
    else:
        monkeypatch.delenv("PAGEDLLM_ASYNC_OUTPUT_PROC", raising=False)
        kw["disable_async_output_proc"] = True
    config = EngineArgs(model=model_path, dtype="float32", block_size=8,
                        disable_log_stats=True, **kw).create_engine_config()
    core = EngineCore(config)
    monkeypatch.delenv("PAGEDLLM_ASYNC_OUTPUT_PROC", raising=False)
    return core


def _record_launches(core: EngineCore) -> list[int]:
    """The number of batches already in flight at each launch."""
    seen: list[int] = []
    launch = core.executor.launch

    def recording(scheduler_output) -> None:
        seen.append(len(core._in_flight))
        launch(scheduler_output)
    core.executor.launch = recording  # type: ignore[method-assign]
    return seen


def _run(core: EngineCore, params: SamplingParams, after_step=None,
         finished: dict | None = None) -> dict[str, list[int]]:
    """Every prompt to the end through ``EngineCore.step``: the tokens of each. ``finished``
    gets (trace times, wall time) of each request's last delta."""
    for i, prompt in enumerate(_prompts()):
        core.add_request(CoreRequest(str(i), prompt, params.clone(), time.time()))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(_prompts()))}
    while core.has_unfinished_requests():
        for delta in core.step():
            tokens[delta.seq_id] += delta.new_token_ids
            if delta.trace_times is not None and finished is not None:
                finished[delta.seq_id] = (delta.trace_times, time.time())
        if after_step is not None:
            after_step(core)
    kv = core.kv_cache_manager
    assert kv.num_free_blocks == kv.pool.num_blocks and not core._in_flight
    return tokens


def _launched_ahead(core: EngineCore) -> None:
    """After a step with requests left, the next batch is already running."""
    if core.scheduler.has_unfinished_requests():
        assert len(core._in_flight) == 1


def test_speculation_through_the_step_loop_gives_the_plain_tokens(model_path, monkeypatch):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = _core(model_path, monkeypatch, async_output=False)
    assert plain._depth == 1 and not plain._ahead
    want = _run(plain, params)
    plain.shutdown()
    spec = _core(model_path, monkeypatch, async_output=True, **SPEC)
    assert spec._depth == 1 and spec._ahead and not spec._lookahead
    launches = _record_launches(spec)
    got = _run(spec, params, _launched_ahead)
    assert got == want and all(len(t) == 40 for t in got.values())
    assert spec.scheduler.spec_accepted_tokens_total > 0  # drafts verified, some accepted
    assert launches and set(launches) == {0}  # one batch at a time
    spec.shutdown()


def test_speculation_abort_while_a_batch_runs(model_path, monkeypatch):
    """A request aborted while its next batch is in flight: its tokens of that batch are
    dropped, its blocks freed when the batch is over; the others keep the plain tokens."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = _run(_core(model_path, monkeypatch, async_output=False), params)
    spec = _core(model_path, monkeypatch, async_output=True, **SPEC)
    aborted = []

    def abort_once(core: EngineCore) -> None:
        if not aborted and len(core.scheduler.requests["1"].output_token_ids) >= 5:
            assert len(core._in_flight) == 1 and "1" in core._in_flight[0].num_scheduled_tokens
            aborted.append(len(core.scheduler.requests["1"].output_token_ids))
            core.abort(["1"])
    got = _run(spec, params, abort_once)
    assert aborted and got["1"] == want["1"][:aborted[0]]
    assert got["0"] == want["0"] and got["2"] == want["2"]
    spec.shutdown()


def test_detailed_traces_time_one_batch_at_a_time(model_path, monkeypatch):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = _core(model_path, monkeypatch, async_output=False)
    want = _run(plain, params)
    traced = _core(model_path, monkeypatch, async_output=True, **TRACES)
    assert traced._depth == 1 and traced._ahead and not traced._lookahead
    assert traced.worker.runner.collect_forward and traced.worker.runner.collect_execute
    launches = _record_launches(traced)
    start = time.time()

    def front_end_work(core: EngineCore) -> None:
        _launched_ahead(core)
        time.sleep(0.01)  # the next batch runs meanwhile
    finished: dict = {}
    assert _run(traced, params, front_end_work, finished) == want
    assert launches and set(launches) == {0}
    assert sorted(finished) == sorted(want)
    for (scheduler_time, forward, execute), end in finished.values():
        assert scheduler_time > 0 and 0 < forward <= execute
        # spans of batches in flight together would add up to more than the run lasted
        assert execute <= end - start
