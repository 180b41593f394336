"""``--cpu-offload-gb``: keep up to that many GiB of a rank's weights in pinned CPU memory and
stream them to the device in each forward.

Granularity is one linear layer (``pagedllm.layers.linear.Linear`` and its tensor-parallel
subclasses), taken in model order until the next one would pass the budget; embeddings and
the LM head stay on the device (a tied LM head reads the embedding's weight directly).
An offloaded layer's forward copies its parameters host -> device (``non_blocking`` from
pinned memory) into temporaries that live only for that call, so at most one layer's
streamed weights sit on the device at a time. Inside a CUDA graph the copies are recorded
as memcpy nodes that read the same pinned buffers on every replay, so graphs keep working.
This trades PCIe time for device memory: the KV cache gets what the weights gave up.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from pagedllm.layers.linear import Linear

logger = logging.getLogger(__name__)


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))


def _stream_forward(module: nn.Module, device: torch.device):
    host_params = dict(module._parameters)
    forward = module.forward

    def streamed(*args, **kwargs):
        params = module._parameters
        for name, param in host_params.items():
            if param is not None:
                params[name] = param.to(device, non_blocking=True)
        try:
            return forward(*args, **kwargs)
        finally:
            params.update(host_params)
    return streamed


def offload_linear_weights(model: nn.Module, budget_bytes: int, device: torch.device) -> int:
    """Move whole linear layers to (pinned) host memory until ``budget_bytes``; returns the
    bytes moved. Each moved layer streams its weights back to ``device`` when called."""
    pin = torch.cuda.is_available()
    moved = 0
    for module in model.modules():
        if not isinstance(module, Linear):
            continue
        size = _param_bytes(module)
        if moved + size > budget_bytes:
            break
        for param in module.parameters(recurse=False):
            host = param.data.to("cpu")
            param.data = host.pin_memory() if pin else host
        module.forward = _stream_forward(module, device)
        moved += size
    logger.info("--cpu-offload-gb: %.2f GiB of linear weights in %s host memory, streamed "
                "each forward", moved / 2**30, "pinned" if pin else "pageable")
    return moved
