"""--gpu-memory-utilization on CUDA: the KV cache gets the share left after the weights and
the profiled activation peak (skipped without a GPU)."""
import pytest
import torch

from pagedllm import LLM
from tests.utils.tiny_models import build_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_kv_cache_gets_the_share_left_after_weights_and_activations():
    path = str(build_tiny_model("llama"))
    small = LLM(model=path, gpu_memory_utilization=0.3, max_num_batched_tokens=256,
                max_num_seqs=16, max_model_len=256, enforce_eager=True)
    w = small.llm_engine.worker
    assert w.activation_bytes > 0
    big = LLM(model=path, gpu_memory_utilization=0.3, max_num_batched_tokens=8192,
              max_num_seqs=256, max_model_len=256, enforce_eager=True)
    wb = big.llm_engine.worker
    # a bigger step needs more activation memory, and that comes out of the KV cache
    assert wb.activation_bytes > 4 * w.activation_bytes
    total = torch.cuda.mem_get_info()[1]
    for worker in (w, wb):
        assert worker.num_gpu_blocks * worker.block_bytes + worker.activation_bytes + \
            worker.weight_bytes <= 0.3 * total
    assert w.num_gpu_blocks <= 16 * 256 // 16  # capped at max_num_seqs full sequences
