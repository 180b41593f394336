"""Activation functions by Hugging Face ``hidden_act`` name, and the gated (``*_and_mul``) form."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers import fused

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def get_act_fn(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class ActAndMul(nn.Module):
    """act(x[..., :d]) * x[..., d:] for a fused gate/up projection of width 2d."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.act = get_act_fn(name)
        self.is_silu = self.act is F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_silu:
            return fused.silu_and_mul(x)  # one Triton kernel on CUDA
        d = x.shape[-1] // 2
        return self.act(x[..., :d]) * x[..., d:]
