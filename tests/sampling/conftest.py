import pytest

from tests.utils.tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def model_path():
    return str(build_tiny_model("llama"))


@pytest.fixture(scope="session")
def llm(model_path):
    from pagedllm import LLM
    return LLM(model=model_path, dtype="float32", block_size=8)
