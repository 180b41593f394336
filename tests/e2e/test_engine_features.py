"""Features give the same greedy tokens as the plain path: prefix caching, chunked prefill,
every block size, and preemption (recompute and swap) forced by a tiny KV cache."""
import pytest

from pagedllm import LLM, SamplingParams
from tests.utils.tiny_models import build_tiny_model

PREFIX = "The for statement is used to iterate over the elements of a sequence such as a "
PROMPTS = [PREFIX + "string", PREFIX + "tuple or list", "Hello", PREFIX * 2 + "x",
           "def f(x):\n    return x", PREFIX]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def token_ids(llm, prompts=PROMPTS, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def model_path():
    return str(build_tiny_model("llama"))


@pytest.fixture(scope="module")
def reference(model_path):
    return token_ids(LLM(model=model_path))


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_block_sizes(model_path, reference, block_size):
    assert token_ids(LLM(model=model_path, block_size=block_size)) == reference


def test_prefix_caching(model_path, reference):
    llm = LLM(model=model_path, enable_prefix_caching=True, block_size=8)
    assert token_ids(llm) == reference
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)  # second pass: prompts are cached
    assert [o.outputs[0].token_ids for o in outputs] == reference
    assert all(o.num_cached_tokens > 0 for o, p in zip(outputs, PROMPTS) if len(p) > 20)
    assert llm.llm_engine.kv_cache_manager.prefix_cache_hit_rate() > 0


def test_chunked_prefill_small_budget(model_path, reference):
    llm = LLM(model=model_path, enable_chunked_prefill=True, max_num_batched_tokens=16,
              max_num_seqs=4)
    assert token_ids(llm) == reference


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption(model_path, reference, mode):
    llm = LLM(model=model_path, block_size=8, num_gpu_blocks_override=24, preemption_mode=mode,
              swap_space=0.01)
    assert token_ids(llm) == reference
    assert llm.llm_engine.scheduler.num_preemptions_total > 0
    assert llm.llm_engine.kv_cache_manager.num_free_blocks == 24


def test_preemption_with_prefix_caching_and_chunking(model_path, reference):
    llm = LLM(model=model_path, block_size=8, num_gpu_blocks_override=24,
              enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=32,
              max_num_seqs=8)
    assert token_ids(llm) == reference
    assert llm.llm_engine.scheduler.num_preemptions_total > 0


def test_priority_policy_same_tokens(model_path, reference):
    llm = LLM(model=model_path, scheduling_policy="priority", max_num_seqs=2)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False, priority=[5, 4, 3, 2, 1, 0])
    assert [o.outputs[0].token_ids for o in outputs] == reference


def test_seeded_sampling_is_batch_independent(model_path):
    llm = LLM(model=model_path)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=16,
                            ignore_eos=True)
    alone = token_ids(llm, [PROMPTS[1]], seeded)[0]
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    mixed = llm.generate(PROMPTS * 3 + [PROMPTS[1]], [others] * 18 + [seeded], use_tqdm=False)
    assert mixed[-1].outputs[0].token_ids == alone
    chunked = LLM(model=model_path, enable_chunked_prefill=True, max_num_batched_tokens=8,
                  max_num_seqs=4)
    assert token_ids(chunked, [PROMPTS[1]], seeded)[0] == alone


def test_stop_strings_and_stop_tokens(model_path, reference):
    llm = LLM(model=model_path)
    full = llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0].outputs[0]
    stop = full.text[5:8]
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=24,
                                                   ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert full.text.startswith(out.text) and stop not in out.text
    assert len(out.text) == full.text.find(stop)
    kept = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=24, stop=[stop],
                                                    include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text.endswith(stop)
    stop_id = reference[0][3]
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=24,
                                                   stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == reference[0][:4] and out.stop_reason == stop_id
    assert out.finish_reason == "stop"


def test_max_tokens_finish_reason(model_path, reference):
    out = LLM(model=model_path).generate([PROMPTS[2]], SamplingParams(
        temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == reference[2][:5]
    assert out.outputs[0].finish_reason == "length" and out.finished


def test_bad_inputs_raise_value_errors(model_path):
    llm = LLM(model=model_path, max_model_len=64)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="maximum model length"):
        llm.generate(["word " * 200], use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([{"prompt_token_ids": []}], use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([{"prompt_token_ids": [10**6]}], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.generate(["Hello"], use_tqdm=False)[0].finished  # still serves after errors


def test_token_id_prompts_and_chat(model_path):
    llm = LLM(model=model_path)
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode(PROMPTS[0])
    by_text = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0]
    by_ids = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0]
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_text.prompt_token_ids == ids and by_text.prompt == PROMPTS[0]
    chat = llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False)[0]
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True,
                                             add_generation_prompt=True)
    if not isinstance(expected, list):
        expected = expected["input_ids"]
    assert chat.prompt_token_ids == list(expected)
    assert len(chat.outputs[0].token_ids) == 24
