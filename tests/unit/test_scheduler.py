"""Scheduler: token budgets, chunked prefill, preemption and policies, with exact block ids."""
import pytest

from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.scheduler_output import ModelRunnerOutput
from pagedllm.core.request import Request, RequestStatus
from pagedllm.sampling_params import SamplingParams


def make_scheduler(num_blocks=16, block_size=4, budget=64, max_seqs=8, chunked=False,
                   mode="recompute", policy="fcfs", cpu_blocks=0, caching=False, steps=1,
                   depth=1):
    kv = KVCacheManager(num_blocks, cpu_blocks, block_size, caching)
    return Scheduler(max_num_batched_tokens=budget, max_num_seqs=max_seqs,
                     enable_chunked_prefill=chunked, preemption_mode=mode, policy=policy,
                     delay_factor=0.0, max_model_len=256, kv_cache_manager=kv,
                     num_scheduler_steps=steps, pipeline_depth=depth)


def add(sched, req_id, num_prompt, max_tokens=4, priority=0, arrival=None):
    req = Request(req_id, list(range(1, num_prompt + 1)), SamplingParams(max_tokens=max_tokens),
                  priority=priority, arrival_time=arrival)
    sched.add_request(req)
    return req


def run_step(sched, token=7):
    """Schedule, then answer like a runner: a token for each request that reached its end."""
    out = sched.schedule()
    answer(sched, out, token)
    return out


def answer(sched, out, token=7):
    ids, sampled = [], []
    for req_id, n in out.num_scheduled_tokens.items():
        req = sched.requests.get(req_id)
        if req is None:  # ended while in flight: the runner still returns a token
            req = sched._free_after_step[req_id]
        ids.append(req_id)
        sampled.append([token] * out.num_steps if req.num_computed_tokens + n >= req.num_tokens
                       else [])
    sched.update_from_output(out, ModelRunnerOutput(ids, sampled))


def test_prefill_then_decode_blocks():
    sched = make_scheduler()
    add(sched, "a", 6)
    add(sched, "b", 3)
    out = run_step(sched)
    assert out.num_scheduled_tokens == {"a": 6, "b": 3}
    assert [(r.req_id, r.block_ids) for r in out.scheduled_new_reqs] == [("a", [0, 1]),
                                                                         ("b", [2])]
    out = run_step(sched)  # decode: a at 7 tokens (block 1 has room), b at 4 (block 2 full)
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}
    assert [(c.req_id, c.new_block_ids) for c in out.scheduled_cached_reqs] == [("a", []),
                                                                               ("b", [])]
    out = run_step(sched)  # a: 8 tokens fit in 2 blocks, b: 5 tokens need block 3
    assert [(c.req_id, c.new_block_ids) for c in out.scheduled_cached_reqs] == [("a", []),
                                                                               ("b", [3])]


def test_budget_blocks_whole_prompt_without_chunking():
    sched = make_scheduler(budget=8)
    add(sched, "a", 6)
    add(sched, "b", 6)
    out = run_step(sched)
    assert out.num_scheduled_tokens == {"a": 6}
    out = run_step(sched)  # a decodes (1), b's 6 tokens fit in the 7 left
    assert out.num_scheduled_tokens == {"a": 1, "b": 6}


def test_chunked_prefill_splits_prompt_and_mixes_decodes():
    sched = make_scheduler(budget=5, chunked=True)
    add(sched, "a", 3)
    add(sched, "b", 9)
    assert run_step(sched).num_scheduled_tokens == {"a": 3, "b": 2}
    assert sched.requests["b"].num_computed_tokens == 2 and not sched.requests["b"].output_token_ids
    assert run_step(sched).num_scheduled_tokens == {"a": 1, "b": 4}
    assert run_step(sched).num_scheduled_tokens == {"a": 1, "b": 3}
    assert sched.requests["b"].output_token_ids == [7]


def test_max_num_seqs_caps_admission():
    sched = make_scheduler(max_seqs=2)
    for r in "abc":
        add(sched, r, 2)
    assert set(run_step(sched).num_scheduled_tokens) == {"a", "b"}
    assert [r.req_id for r in sched.waiting] == ["c"]


def test_recompute_preemption_evicts_newest_and_requeues_it_first():
    sched = make_scheduler(num_blocks=3, block_size=2)
    add(sched, "a", 2, max_tokens=8)
    add(sched, "b", 2, max_tokens=8)
    run_step(sched)  # a: block 0, b: block 1 -> each has 3 tokens now
    out = run_step(sched)  # a needs block 2; b needs another block -> b preempted
    assert out.preempted_req_ids == {"b"} and "b" in out.finished_req_ids
    assert out.num_scheduled_tokens == {"a": 1}
    assert [c.new_block_ids for c in out.scheduled_cached_reqs] == [[2]]
    b = sched.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b] and sched.num_preemptions_total == 1
    assert sched.kv.pool.free_block_ids() == [1]


def test_swap_preemption_moves_blocks_to_cpu_and_back():
    sched = make_scheduler(num_blocks=3, block_size=2, mode="swap", cpu_blocks=4)
    add(sched, "a", 2, max_tokens=3)
    add(sched, "b", 2, max_tokens=8)
    run_step(sched)
    out = run_step(sched)
    assert out.blocks_to_swap_out == [(1, 0)]
    assert sched.requests["b"].status == RequestStatus.SWAPPED
    run_step(sched)  # a finishes (3 tokens) and frees blocks 2, 0
    assert "a" not in sched.requests
    out = run_step(sched)
    # a freed [2, 0] after the queue's [1]: b's CPU block 0 lands in block 1, then its
    # next token (position 2) needs a second block, 2.
    assert out.blocks_to_swap_in == [(0, 1)]
    assert [(r.req_id, r.block_ids) for r in out.scheduled_new_reqs] == [("b", [1, 2])]
    assert sched.requests["b"].num_computed_tokens == 3


def test_priority_policy_orders_waiting_and_picks_victim():
    sched = make_scheduler(num_blocks=3, block_size=2, policy="priority")
    add(sched, "low", 2, max_tokens=8, priority=5, arrival=1.0)
    add(sched, "high", 2, max_tokens=8, priority=0, arrival=2.0)
    assert [r.req_id for r in sched.waiting] == ["high", "low"]
    out = run_step(sched)
    assert [r.req_id for r in out.scheduled_new_reqs] == ["high", "low"]
    out = run_step(sched)
    assert out.preempted_req_ids == {"low"}


def test_prompt_larger_than_cache_is_rejected():
    sched = make_scheduler(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="KV-cache blocks"):
        add(sched, "a", 9)


def test_abort_frees_blocks_and_tells_runner():
    sched = make_scheduler()
    add(sched, "a", 6)
    run_step(sched)
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert sched.kv.num_free_blocks == 16 and not sched.has_unfinished_requests()
    assert sched.schedule().finished_req_ids == {"a"}


def test_prefix_cache_hit_counts_as_computed():
    sched = make_scheduler(caching=True)
    add(sched, "a", 9)
    run_step(sched)
    add(sched, "b", 9)
    out = run_step(sched)
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}  # b: 8 of 9 prompt tokens cached
    new_b = [r for r in out.scheduled_new_reqs if r.req_id == "b"][0]
    assert new_b.block_ids == [0, 1, 3] and new_b.num_computed_tokens == 8
    assert sched.requests["b"].num_cached_tokens == 8


def test_multi_step_allocates_blocks_for_every_step():
    sched = make_scheduler(steps=4)
    add(sched, "a", 6, max_tokens=10)
    add(sched, "b", 3, max_tokens=10)
    out = run_step(sched)  # prefill: one step
    assert out.num_steps == 1
    out = run_step(sched)  # a: tokens 7..10 need 3 blocks (one more), b: 4..7 need block 3
    assert out.num_steps == 4
    assert [(c.req_id, c.new_block_ids) for c in out.scheduled_cached_reqs] == [("a", [3]),
                                                                               ("b", [4])]
    a, b = sched.requests["a"], sched.requests["b"]
    assert (a.num_computed_tokens, a.num_tokens, b.num_computed_tokens) == (10, 11, 7)
    out = run_step(sched)  # 5 tokens left each: 4 steps, then 1
    assert out.num_steps == 4
    assert [(c.req_id, c.new_block_ids) for c in out.scheduled_cached_reqs] == [("a", [5]),
                                                                               ("b", [6])]
    out = run_step(sched)
    assert out.num_steps == 1 and not sched.running
    assert sched.kv.num_free_blocks == 16


def test_multi_step_falls_back_with_prefills_and_when_blocks_run_out():
    sched = make_scheduler(num_blocks=4, steps=4)
    add(sched, "a", 4, max_tokens=20)
    assert run_step(sched).num_steps == 1
    add(sched, "b", 3, max_tokens=20)
    out = run_step(sched)  # a decodes while b prefills: one step
    assert out.num_steps == 1 and out.num_scheduled_tokens == {"a": 1, "b": 3}
    # 4 steps: a (positions 5..8) needs block 3, the last free one; b (3..6) then finds no
    # block -> a single step; the block a did get is reported and kept
    out = run_step(sched)
    assert out.num_steps == 1
    assert [(c.req_id, c.new_block_ids) for c in out.scheduled_cached_reqs] == [("a", [3]),
                                                                               ("b", [])]


def test_micro_batches_take_disjoint_balanced_requests():
    """pipeline depth 2: a second batch is scheduled while the first is in flight; it takes
    only requests not in flight, each batch at most ceil(unfinished / 2) sequences."""
    sched = make_scheduler(depth=2)
    for name in "abcde":
        add(sched, name, 3)
    first = sched.schedule()
    assert list(first.num_scheduled_tokens) == ["a", "b", "c"]  # ceil(5 / 2)
    assert [r.block_ids for r in first.scheduled_new_reqs] == [[0], [1], [2]]
    second = sched.schedule()
    assert list(second.num_scheduled_tokens) == ["d", "e"]
    assert [r.block_ids for r in second.scheduled_new_reqs] == [[3], [4]]
    assert not sched.has_schedulable_requests() and sched.schedule().is_empty
    answer(sched, first)  # a, b, c come back: they may run again, d and e may not
    third = sched.schedule()
    assert third.num_scheduled_tokens == {"a": 1, "b": 1, "c": 1}
    assert [c.new_block_ids for c in third.scheduled_cached_reqs] == [[], [], []]  # 4 fit
    answer(sched, second)
    assert sched.schedule().num_scheduled_tokens == {"d": 1, "e": 1}


def test_in_flight_requests_are_never_preempted():
    sched = make_scheduler(num_blocks=2, block_size=2, depth=2)
    add(sched, "a", 2, max_tokens=8)
    add(sched, "b", 1, max_tokens=8)
    first, second = sched.schedule(), sched.schedule()  # one request each: ceil(2 / 2)
    assert (first.num_scheduled_tokens, second.num_scheduled_tokens) == ({"a": 2}, {"b": 1})
    answer(sched, first)
    answer(sched, second)
    assert [sched.kv.get_block_ids(r) for r in "ab"] == [[0], [1]]
    # a's third token needs a block and none is free; fcfs would preempt b, the newest,
    # but b's next batch is in flight (as if launched just now), so a gives way instead
    sched.in_flight["b"] += 1
    out = sched.schedule()
    assert out.preempted_req_ids == {"a"} and out.is_empty
    assert sched.kv.get_block_ids("b") == [1] and sched.kv.pool.free_block_ids() == [0]
    assert list(sched.waiting) == [sched.requests["a"]]


def test_request_ended_in_flight_frees_its_blocks_after_its_batch():
    sched = make_scheduler(depth=2)
    add(sched, "a", 6)
    add(sched, "b", 3)
    first = sched.schedule()
    assert first.num_scheduled_tokens == {"a": 6}
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)  # while its batch runs
    assert sched.kv.get_block_ids("a") == [0, 1]  # still written by the batch in flight
    second = sched.schedule()
    assert second.num_scheduled_tokens == {"b": 3}
    assert [r.block_ids for r in second.scheduled_new_reqs] == [[2]]  # not a's blocks
    assert "a" not in second.finished_req_ids
    answer(sched, second)
    assert sched.has_schedulable_requests()  # b is back although a is still in flight
    second = sched.schedule()
    assert second.num_scheduled_tokens == {"b": 1}
    answer(sched, first)  # a's late token is dropped, its blocks free now
    assert sorted(sched.kv.pool.free_block_ids())[:2] == [0, 1]
    answer(sched, second)
    assert sched.schedule().finished_req_ids == {"a"}


def test_lookahead_schedules_the_next_multi_step_batch_ahead():
    """schedule_lookahead: the same request again, counts projected one batch ahead, blocks
    for both batches; a stop inside the running batch frees its blocks only when the
    lookahead batch is over."""
    sched = make_scheduler(steps=4)
    req = Request("a", [1, 2, 3], SamplingParams(max_tokens=12, stop_token_ids=[9]))
    sched.add_request(req)
    run_step(sched)  # prefill: block 0, one output token
    first = sched.schedule()
    assert first.num_steps == 4 and first.scheduled_cached_reqs[0].new_block_ids == [1]
    ahead = sched.schedule_lookahead(first)
    assert ahead.num_steps == 4 and ahead.num_scheduled_tokens == {"a": 1}
    # positions 7..10: block 2; the runner is told the count after the first batch
    assert [(c.req_id, c.new_block_ids, c.num_computed_tokens)
            for c in ahead.scheduled_cached_reqs] == [("a", [2], 7)]
    assert sched.in_flight["a"] == 2
    answer(sched, first)  # four tokens: a at 5 outputs, 7 computed
    assert (req.num_output_tokens, req.num_computed_tokens) == (5, 7)
    second = sched.schedule_lookahead(ahead)  # 12 - 5 - 4 = 3 tokens left: 3 steps
    assert second.num_steps == 3
    assert [(c.new_block_ids, c.num_computed_tokens)
            for c in second.scheduled_cached_reqs] == [([3], 11)]
    answer(sched, ahead, token=9)  # stops at its first token: the next batch still runs
    assert req.status == RequestStatus.FINISHED_STOPPED and "a" not in sched.requests
    assert sched.kv.get_block_ids("a") == [0, 1, 2, 3] and sched.kv.num_free_blocks == 12
    assert sched.schedule_lookahead(second) is None  # nothing left to run
    answer(sched, second)
    assert sched.kv.num_free_blocks == 16 and not sched.in_flight
    assert "a" in sched.schedule().finished_req_ids


def test_lookahead_only_in_the_steady_state():
    sched = make_scheduler(steps=4, max_seqs=2)
    add(sched, "a", 3, max_tokens=12)
    add(sched, "b", 3, max_tokens=4)
    run_step(sched)
    running = sched.schedule()
    assert running.num_steps == 4
    # b ends by length inside the running batch (1 + 4 tokens >= 4): left out of the next
    ahead = sched.schedule_lookahead(running)
    assert ahead.num_scheduled_tokens == {"a": 1} and ahead.num_steps == 4
    answer(sched, running)
    assert sched.kv.get_block_ids("b") == [] and [r.req_id for r in sched.running] == ["a"]
    add(sched, "c", 3)  # a waiting prompt and a free seat: it goes first, no lookahead
    assert sched.schedule_lookahead(ahead) is None
    answer(sched, ahead)
    out = sched.schedule()
    assert set(out.num_scheduled_tokens) == {"a", "c"}


def test_lookahead_stops_at_max_model_len():
    """A request near max_model_len caps the lookahead batch's steps (tokens past a request's
    max_tokens are dropped, but its KV may never pass max_model_len)."""
    kv = KVCacheManager(32, 0, 4, False)
    sched = Scheduler(max_num_batched_tokens=64, max_num_seqs=8, enable_chunked_prefill=False,
                      preemption_mode="recompute", policy="fcfs", delay_factor=0.0,
                      max_model_len=32, kv_cache_manager=kv, num_scheduler_steps=8)
    for req_id, n in (("a", 3), ("b", 20)):
        sched.add_request(Request(req_id, list(range(1, n + 1)), SamplingParams(max_tokens=None),
                                  max_model_len=32))
    run_step(sched)
    running = sched.schedule()
    assert running.num_steps == 8  # b: 21 tokens, room for 11 more
    ahead = sched.schedule_lookahead(running)
    # b at 29 tokens after the running batch: positions 28..31 at most, so 4 steps
    assert ahead.num_steps == 4
    assert max(len(kv.get_block_ids(r)) for r in "ab") * 4 <= 32


def test_an_id_still_in_flight_cannot_be_reused():
    sched = make_scheduler(steps=4)
    req = Request("a", [1, 2, 3], SamplingParams(max_tokens=12, stop_token_ids=[9]))
    sched.add_request(req)
    run_step(sched)
    first = sched.schedule()
    ahead = sched.schedule_lookahead(first)
    answer(sched, first, token=9)  # ends; the lookahead batch still holds "a"
    assert req.is_finished()
    with pytest.raises(ValueError, match="still finishing"):
        add(sched, "a", 3)
    answer(sched, ahead)
    add(sched, "a", 3)  # free again


def test_request_output_bound():
    """A Request's max_tokens is always an int: max_tokens capped by the room max_model_len
    leaves after the prompt (at least 1); unbounded output (max_tokens=None) without a
    context length is refused at construction instead of failing at its first token."""
    params = SamplingParams(max_tokens=None)
    assert Request("a", [1, 2, 3], params, max_model_len=10).max_tokens == 7
    assert Request("b", [1] * 12, params, max_model_len=10).max_tokens == 1
    assert Request("c", [1, 2, 3], SamplingParams(max_tokens=5), max_model_len=10).max_tokens == 5
    assert Request("d", [1, 2, 3], SamplingParams(max_tokens=5)).max_tokens == 5
    with pytest.raises(ValueError, match="max_model_len"):
        Request("e", [1, 2, 3], params)
