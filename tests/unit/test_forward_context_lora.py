"""The LoRA batch reaches every LoRA-capable projection through ``ForwardContext.lora``
(no module state): for each architecture whose decoder layers hold the LoRA targets, a
forward with a random adapter in a slot equals the same model with the adapter merged into
its base weights (``W + scale * B @ A``, the oracle), row by row in a batch where one
prompt runs the adapter and the other none; a projection with slots called without the
batch raises instead of losing its delta."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.models.test_models_vs_hf import _native_model, _prefill_context
from tests.utils.tiny_models import build_tiny_model

RANK, SCALE = 4, 0.75


def _checkpoint(arch: str) -> str:
    if arch in ("olmo", "olmo2", "cohere"):
        from tests.models.test_dense_models_more import _build
        return _build(arch)
    if arch == "gemma3":
        from tests.models.test_dense_models_new import _configs
        from tests.models.test_moe_models import build_tiny_checkpoint
        return str(build_tiny_checkpoint(arch, _configs()[arch]))
    return str(build_tiny_model(arch))


def _random_lora(hf_config):
    from pagedllm.worker.lora import LoadedLoRA, projection_shapes
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for layer in range(hf_config.num_hidden_layers):
        for name, (n_in, n_out) in projection_shapes(hf_config).items():
            weights[(layer, name)] = (torch.randn(RANK, n_in, generator=gen) * 0.2,
                                      torch.randn(n_out, RANK, generator=gen) * 0.2)
    return LoadedLoRA(1, "random", RANK, SCALE, weights)


def _merge(model, lora) -> None:
    """The oracle: the adapter added into the fused base weights, part by part."""
    from pagedllm.worker.lora import _TARGETS, lora_modules
    modules = {(layer, proj): module for layer, proj, module in lora_modules(model)}
    with torch.no_grad():
        for (layer, name), (a, b) in lora.weights.items():
            proj, part = _TARGETS[name]
            module = modules[(layer, proj)]
            start = module.lora.offsets[part]
            module.weight[start:start + b.shape[0]] += SCALE * b @ a


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "phi3", "olmo", "olmo2",
                                  "cohere", "gemma3"])
def test_slot_deltas_equal_merged_weights(arch):
    from pagedllm.worker.lora import LoRASlotTable
    model, model_config = _native_model(_checkpoint(arch))
    lora = _random_lora(model_config.hf_config)
    table = LoRASlotTable(model, 1, 8, torch.float32, torch.device("cpu"))
    prompts = [list(range(3, 14)), list(range(20, 27))]
    input_ids = torch.tensor([t for ids in prompts for t in ids])
    positions = torch.cat([torch.arange(len(ids)) for ids in prompts])
    rows = [lora] * len(prompts[0]) + [None] * len(prompts[1])
    with torch.no_grad():
        base = model(input_ids, positions, _prefill_context(model_config, prompts))
        ctx = dataclasses.replace(_prefill_context(model_config, prompts),
                                  lora=table.batch(rows, torch.device("cpu")))
        ours = model(input_ids, positions, ctx)
        _merge(model, lora)
        merged = model(input_ids, positions, _prefill_context(model_config, prompts))
    first = len(prompts[0])
    assert not torch.allclose(merged[:first], base[:first], atol=1e-3)  # the adapter matters
    torch.testing.assert_close(ours[:first], merged[:first], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours[first:], base[first:], atol=1e-5, rtol=1e-5)


def test_a_projection_with_slots_needs_the_batch():
    from pagedllm.worker.lora import LoRASlotTable, lora_modules
    model, _ = _native_model(str(build_tiny_model("llama")))
    LoRASlotTable(model, 1, 8, torch.float32, torch.device("cpu"))
    _, _, module = lora_modules(model)[0]
    x = torch.randn(3, module.input_size)
    with pytest.raises(RuntimeError, match="passed no LoRA batch"):
        module(x)
    torch.testing.assert_close(module(x, lora=None), x @ module.weight.t())
