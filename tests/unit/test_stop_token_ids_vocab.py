"""stop_token_ids outside the vocabulary are a ValueError naming the field (the schemathesis
fuzz found a chat request whose out-of-vocabulary stop id crashed an engine step: a 500)."""
import pytest

from pagedllm import LLM, SamplingParams
from tests.utils.tiny_models import build_tiny_model


def test_out_of_vocabulary_stop_token_id_is_rejected():
    llm = LLM(model=str(build_tiny_model("llama")))
    bad = SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[997132610])
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate(["x"], bad, use_tqdm=False)
    ok = SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[5], ignore_eos=True)
    assert len(llm.generate(["x"], ok, use_tqdm=False)[0].outputs[0].token_ids) == 4
