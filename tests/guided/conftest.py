import pytest

from tests.utils.tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def model_path():
    return str(build_tiny_model("llama"))


@pytest.fixture(scope="session")
def guided_llm(model_path):
    pytest.importorskip("xgrammar")
    from pagedllm import LLM
    return LLM(model=model_path, block_size=8, guided_decoding_backend="xgrammar", seed=0)


@pytest.fixture(scope="session")
def outlines_llm(model_path):
    pytest.importorskip("outlines_core")
    from pagedllm import LLM
    return LLM(model=model_path, block_size=8, seed=0)  # default --guided-decoding-backend


@pytest.fixture(scope="session")
def lmfe_llm(model_path):
    pytest.importorskip("lmformatenforcer")
    from pagedllm import LLM
    return LLM(model=model_path, block_size=8, guided_decoding_backend="lm-format-enforcer",
               seed=0)
