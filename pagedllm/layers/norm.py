"""Normalisation layers with Hugging Face parameter names (``weight``, ``bias``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed import all_reduce, get_tp_size
from pagedllm.layers import fused


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32. ``offset=1`` gives Gemma's ``x * (1 + weight)`` variant."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size) if offset else torch.ones(hidden_size))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalise ``x`` (after adding ``residual`` if given; then also return the sum)."""
        if fused.use(x) and x.stride(-1) == 1 and (  # one Triton kernel on CUDA
                x.dim() == 2 or (x.dim() == 3 and residual is None)):
            return fused.ops().rms_norm(x, self.weight, self.eps, self.offset, residual)
        if residual is not None:
            x = x + residual
            residual = x
        if x.dtype == torch.float32 and not self.offset:
            out = F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op
            return out if residual is None else (out, residual)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight.float() + self.offset if self.offset else self.weight.float()
        out = (h * weight).to(dtype)
        return out if residual is None else (out, residual)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None):
        """(norm(x + residual), x + residual); the first layer has no residual yet."""
        if residual is None:
            return self(x), x
        return self(x, residual)


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a whole projection (OLMo 2's ``q_norm`` / ``k_norm`` over all heads) of
    which this tensor-parallel rank holds features ``[start, start + size)``: the mean square
    is summed over the ranks (one all-reduce of a [num_tokens, 1] tensor), so each rank
    normalises its slice exactly as the unsplit norm would. When KV heads are replicated
    (more ranks than KV heads), each head is counted once per rank holding it, and the
    divisor ``size * tp`` counts it as often. The weight loader keeps the rank's slice."""

    def __init__(self, start: int, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.start, self.size, self.eps = start, size, eps
        self.tp = get_tp_size()
        self.weight = nn.Parameter(torch.ones(size))
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, name: str = "") -> None:
        if loaded.dim() != 1 or loaded.shape[0] < self.start + self.size:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(loaded.shape)}, too "
                             f"small for features [{self.start}, {self.start + self.size})")
        param.data.copy_(loaded[self.start:self.start + self.size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        square_sum = h.pow(2).sum(-1, keepdim=True)
        if self.tp > 1:
            square_sum = all_reduce(square_sum)
        h = h * torch.rsqrt(square_sum / (self.size * self.tp) + self.eps)
        return (h * self.weight.float()).to(x.dtype)
