"""--cpu-offload-gb: linear layers kept in host memory and streamed in each forward give the
same tokens as a model held on the device (CUDA tests skip without a GPU; the streaming
wrapper itself also runs on CPU)."""
import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.layers.linear import Linear
from pagedllm.models.cpu_offload import offload_linear_weights
from tests.utils.tiny_models import E2E_PROMPTS, build_tiny_model

PROMPTS = E2E_PROMPTS[:4]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_streamed_layers_compute_the_same_on_cpu():
    from pagedllm.models.llama import LlamaForCausalLM  # noqa: F401 - registry import
    llm = LLM(model=str(build_tiny_model("llama")), block_size=8, device="cpu")
    want = _tokens(llm)
    model = llm.llm_engine.worker.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    sizes = [sum(p.numel() * p.element_size() for p in m.parameters()) for m in linears]
    budget = sizes[0] + sizes[1] + sizes[2] // 2
    moved = offload_linear_weights(model, budget, torch.device("cpu"))
    assert moved == sizes[0] + sizes[1]  # whole layers in model order, up to the budget
    assert "forward" in vars(linears[1]) and "forward" not in vars(linears[2])
    assert _tokens(llm) == want


@cuda_only
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_offloaded_model_gives_the_same_tokens(enforce_eager):
    path = str(build_tiny_model("llama"))
    kwargs = dict(model=path, dtype="float32", gpu_memory_utilization=0.3, max_model_len=256,
                  enforce_eager=enforce_eager)
    base = LLM(**kwargs)
    want, full = _tokens(base), base.llm_engine.worker.weight_bytes
    del base
    llm = LLM(cpu_offload_gb=full / 2**30 / 2, **kwargs)
    worker = llm.llm_engine.worker
    host = [p for p in worker.model.parameters() if p.device.type == "cpu"]
    assert host and all(p.is_pinned() for p in host)
    assert 0 < worker.weight_bytes <= full - full // 4  # a good share left the device
    assert _tokens(llm) == want
