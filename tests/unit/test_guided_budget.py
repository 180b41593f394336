"""Issue 24 finding 2: guided-decoding compiles are bounded and never hold the engine core.

Oracles: a hostile constraint is refused with a ValueError naming its ``guided_*`` field within
the time budget (plus slack) or by the memory budget; a repeat is refused at once; a normal
constraint compiled by the worker gives the same token masks as the in-process compiler; the
guide cache evicts least recently used entries by count and by bytes; the engine core keeps
stepping (and finishes) a normal request while a hostile constraint compiles, then rejects it.
"""
import time

import pytest
import torch

from pagedllm.guided.compiler import GuidedCompiler
from pagedllm.guided.params import GuidedDecodingParams as G
from pagedllm.guided.service import GuideCache, GuideLimits, GuideService
from tests.utils.tiny_models import build_tiny_model

HOSTILE = G(regex="[ab]*a[ab]{20}")  # a DFA of 2**21 states (issue 24 finding 2)
BUDGET_S = 2.0


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("outlines_core")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(build_tiny_model("llama")))


def _service(tokenizer, **limits) -> GuideService:
    service = GuideService(tokenizer, len(tokenizer), {tokenizer.eos_token_id}, "outlines",
                           GuideLimits(**{"timeout_s": BUDGET_S, **limits}))
    service.compile(G(regex="warm"))  # the worker's start-up is not part of any budget
    return service


def _masks(guide, vocab: int, tokens: list[int]) -> list[list[int]]:
    """The bitmask rows a matcher of ``guide`` fills along ``tokens``."""
    matcher, rows = guide.new_matcher(), []
    for token in tokens:
        row = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
        matcher.fill_next_token_bitmask(row, 0)
        rows.append(row[0].tolist())
        matcher.accept_token(token)
    return rows


def test_hostile_regex_is_refused_within_the_time_budget(tokenizer):
    service = _service(tokenizer)
    try:
        start = time.monotonic()
        with pytest.raises(ValueError, match=r"guided_regex: .*time budget of 2 s"):
            service.compile(HOSTILE)
        assert time.monotonic() - start < BUDGET_S + 1.0
        start = time.monotonic()
        with pytest.raises(ValueError, match="guided_regex"):
            service.compile(HOSTILE)  # the verdict is cached
        assert time.monotonic() - start < 0.05
        assert service.worker.num_killed == 1
        # the next compile gets a fresh worker and the same guide as in-process compiling
        params = G(regex="(ab|ba){2}c")
        guide = service.compile(params)
        local = GuidedCompiler(tokenizer, len(tokenizer), {tokenizer.eos_token_id},
                               "outlines").compile(params)
        ids = tokenizer("abbac", add_special_tokens=False)["input_ids"]
        assert _masks(guide, len(tokenizer), ids) == _masks(local, len(tokenizer), ids)
    finally:
        service.close()


def test_hostile_regex_is_refused_by_the_memory_budget(tokenizer):
    service = _service(tokenizer, timeout_s=120.0, memory_mb=64.0)
    try:
        with pytest.raises(ValueError, match=r"guided_regex: .*memory"):
            service.compile(HOSTILE)
    finally:
        service.close()


def test_parser_errors_and_size_limit_name_the_field(tokenizer):
    service = _service(tokenizer, max_constraint_chars=200)
    try:
        with pytest.raises(ValueError, match=r"invalid guided_regex"):
            service.compile(G(regex="(unclosed"))
        start = time.monotonic()
        with pytest.raises(ValueError, match=r"guided_json is \d+ characters long; the most "
                                             r"is 200"):
            service.submit(G(json={"type": "object", "description": "x" * 300}))
        assert time.monotonic() - start < 0.05
    finally:
        service.close()


def test_guide_cache_is_lru_by_entries_and_bytes():
    cache = GuideCache(max_entries=3, max_bytes=100)
    for key in "abc":
        cache.put((key,), key, 10)
    assert cache.get(("a",)) == "a"  # a is now the most recent
    cache.put(("d",), "d", 10)
    assert cache.get(("b",)) is None and len(cache) == 3
    cache.put(("e",), "e", 85)  # bytes: evicts the least recent until 100 fit
    assert [cache.get((k,)) for k in "acde"] == [None, None, "d", "e"]
    assert cache.nbytes == 95
    cache.put(("huge",), "huge", 101)  # larger than the cache: not kept, nothing evicted
    assert cache.get(("huge",)) is None and cache.nbytes == 95


def test_core_keeps_stepping_while_a_constraint_compiles(monkeypatch):
    """EngineCore.submit_request: the hostile request waits outside the scheduler while a
    normal one runs to completion; finish_pending then gives its ValueError."""
    pytest.importorskip("outlines_core")
    monkeypatch.setenv("PAGEDLLM_GUIDED_COMPILE_TIMEOUT_S", str(BUDGET_S))
    from pagedllm import EngineArgs, SamplingParams
    from pagedllm.engine.engine import LLMEngine
    from pagedllm.engine.output_processor import prepare_request
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(build_tiny_model("llama")),
                                                   block_size=8, max_model_len=128))
    try:
        core = engine.core
        core._guided_compiler().compile(G(regex="warm"))
        _, hostile = prepare_request(engine.config, engine.inputs, "hostile",
                                     {"prompt_token_ids": [1, 2, 3]},
                                     SamplingParams(max_tokens=4, guided_decoding=HOSTILE),
                                     None, 0, None, None)
        assert core.submit_request(hostile) is None and core.has_pending()
        with pytest.raises(ValueError, match="already in use"):
            core.submit_request(hostile)
        engine.add_request("normal", {"prompt_token_ids": [1, 5, 9]},
                           SamplingParams(max_tokens=24, temperature=0))
        finished = None
        while finished is None:
            finished = next((o for o in engine.step() if o.finished), None)
        assert len(finished.outputs[0].token_ids) == 24 and core.has_pending()
        deadline = time.monotonic() + BUDGET_S + 5
        results = []
        while not results and time.monotonic() < deadline:
            results = core.finish_pending()
            time.sleep(0.01)
        (req, added, exc), = results
        assert req.request_id == "hostile" and added is None
        assert "guided_regex" in str(exc) and not core.has_pending()
    finally:
        engine.shutdown()
