"""The per-layer quantization strategy and the sharding metadata its parameters carry.

A ``LinearMethod`` is picked once per linear layer when the layer is built (by the layer's
``QuantConfig`` from its checkpoint ``prefix``), instead of branching per call. It registers
the layer's parameters; each parameter says how the layer's (tensor-parallel, fused-shard)
weight loader must cut a checkpoint tensor for it:

- ``output_dim`` / ``input_dim``: which tensor dim indexes the layer's output / input features
  (None: the tensor does not depend on it and is loaded whole, e.g. a replicated scale);
- ``output_div`` / ``input_div``: how many features one element along that dim covers (the
  pack factor of packed int32 words, or the group size of group scales), so a feature range
  [a, b) is the element range [a/div, b/div);
- ``per_shard``: a scalar per fused part (fp8 per-tensor scales): part ``i`` goes to index i;
- ``same_per_shard``: one tensor that every fused part repeats (GPTQ ``g_idx``): parts must agree;
- ``optional``: may be absent from the checkpoint (it keeps the value it was created with);
- ``discard``: read and dropped (compressed-tensors ``weight_shape``, implied by the layer).
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def make_param(data: torch.Tensor, *, output_dim: int | None = None,
               input_dim: int | None = None, output_div: int = 1, input_div: int = 1,
               per_shard: bool = False, same_per_shard: bool = False,
               optional: bool = False, discard: bool = False) -> nn.Parameter:
    """A frozen parameter tagged with the metadata the layers' loaders read (module doc)."""
    param = nn.Parameter(data, requires_grad=False)
    param.output_dim, param.input_dim = output_dim, input_dim
    param.output_div, param.input_div = output_div, input_div
    param.per_shard, param.same_per_shard, param.optional = per_shard, same_per_shard, optional
    param.discard = discard
    return param


def narrow_features(tensor: torch.Tensor, dim: int | None, div: int, start: int, size: int,
                    name: str) -> torch.Tensor:
    """Elements of ``tensor`` covering features [start, start + size) along ``dim``: a packed
    or grouped dim must be cut at whole elements, else the checkpoint cannot be sharded."""
    if dim is None:
        return tensor
    if start % div or size % div:
        raise ValueError(f"checkpoint tensor {name!r}: features [{start}, {start + size}) do not "
                         f"fall on whole elements of {div} along dim {dim} (pack factor or "
                         "group size); this tensor-parallel split or fused layout cannot load it")
    if tensor.dim() <= dim or tensor.shape[dim] * div < start + size:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, too small "
                         f"for features [{start}, {start + size}) at {div} per element along "
                         f"dim {dim}")
    return tensor.narrow(dim, start // div, size // div)


class LinearMethod(ABC):
    """How one linear layer stores its weight and multiplies by it.

    ``create_weights`` registers the parameters on ``layer`` (sizes are this rank's);
    ``process_after_loading`` runs once every tensor is loaded (repack, quantize, check);
    ``apply`` returns x @ W^T + bias, with silu(gate) * up when ``gated_silu``.
    """
    name = "base"

    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       dtype: torch.dtype) -> None:
        """Register the parameters for this rank's ``input_size`` and fused parts."""

    def process_after_loading(self, layer: nn.Module) -> None:
        return None

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
              gated_silu: bool = False) -> torch.Tensor:
        """x @ W^T (+ bias), then silu(gate) * up when ``gated_silu``."""


class MoEMethod(ABC):
    """How one ``FusedMoE`` layer stores its stacked expert weights and hands them to the
    expert computation (the MoE counterpart of ``LinearMethod``).

    ``create_weights`` registers ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj``
    ``[E, H, I]`` (this rank's I) and whatever they need (scales); the layer's loaders cut
    each checkpoint tensor to this rank's full-precision rows and call ``store``;
    ``expert_weights`` returns what the expert loop indexes by expert id (``w[e]``,
    ``w[ids]``) to get full-precision ``[rows, cols]`` matrices.
    """
    name = "base"

    @abstractmethod
    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size: int, dtype: torch.dtype) -> None:
        """Register the stacked parameters for this rank's ``intermediate_size``."""

    @abstractmethod
    def store(self, layer: nn.Module, name: str, expert: int | None, row_offset: int,
              value: torch.Tensor) -> None:
        """Write full-precision rows ``value`` ([rows, cols] of expert ``expert``, or
        [E, rows, cols] of every expert when None) into ``name`` (``gate_up_proj`` /
        ``down_proj``) from row ``row_offset``."""

    @abstractmethod
    def expert_weights(self, layer: nn.Module):
        """(gate_up, down): indexable by expert id or id tensor, with ``.shape``."""

    def kernel_weights(self, layer: nn.Module):
        """(gate_up, down, scales) as the fused Triton kernels read them: stacked tensors in
        the model's dtype and None, or int8 / fp8 codes and their per-row scales (gate_up
        [E, 2I], down [E, H]); None where the kernels cannot read this storage."""
        gate_up, down = self.expert_weights(layer)
        if isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor):
            return gate_up, down, None
        return None

    def process_after_loading(self, layer: nn.Module) -> None:
        return None


# fused module name -> the checkpoint modules it holds (for per-module rules)
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
               "gate_up_proj": ("gate_proj", "up_proj")}


def rule_matches(rule: str, name: str, substring: bool) -> bool:
    """``re:<regex>`` (compressed-tensors ignore lists and targets) matches from the start of
    the name (``re.match``, as compressed-tensors does); otherwise the exact module name, its
    dotted suffix, or (HF ``modules_to_not_convert``) any substring."""
    if rule.startswith("re:"):
        return re.match(rule[3:], name) is not None
    return name == rule or name.endswith("." + rule) or (substring and rule in name)


def module_skipped(prefix: str, rules: list[str], substring: bool = False) -> bool:
    """Whether a module stays unquantized. A fused module (``qkv_proj``) is skipped when all
    its checkpoint parts are; some but not all is a checkpoint this layout cannot serve."""
    if not rules or not prefix:
        return False
    if any(rule_matches(r, prefix, substring) for r in rules):
        return True
    head, _, leaf = prefix.rpartition(".")
    parts = FUSED_PARTS.get(leaf)
    if not parts:
        return False
    hits = [any(rule_matches(r, f"{head}.{p}" if head else p, substring) for r in rules)
            for p in parts]
    if any(hits) and not all(hits):
        raise ValueError(f"the checkpoint's quantization rules skip only some of {parts} in "
                         f"{prefix!r}; pagedllm fuses them into one layer, so they must all be "
                         "quantized or all be left unquantized")
    return all(hits)


class QuantConfig(ABC):
    """A checkpoint's quantization: which ``LinearMethod`` each module gets.

    ``skip_rules`` name modules left unquantized (``substring`` matching for HF's
    ``modules_to_not_convert``, exact / ``re:`` for ignore lists)."""
    name = "base"
    moe_only = False  # quantizes only mixture-of-experts experts (experts_int8)

    def __init__(self, skip_rules: list[str] | None = None, substring: bool = False) -> None:
        self.skip_rules = list(skip_rules or [])
        self.substring = substring

    def method_for(self, prefix: str) -> LinearMethod:
        from pagedllm.quant.unquantized import UNQUANTIZED
        if module_skipped(prefix, self.skip_rules, self.substring):
            return UNQUANTIZED
        return self.quantized_method()

    @abstractmethod
    def quantized_method(self) -> LinearMethod:
        """The method of every module the skip rules leave quantized."""

    def moe_method_for(self, prefix: str) -> MoEMethod:
        """The method of the ``FusedMoE`` layer named ``prefix``. Formats whose expert
        weights are not built say so (their model classes are refused before this)."""
        raise ValueError(f"--quantization {self.name} does not cover mixture-of-experts "
                         f"expert weights ({prefix}); supported for MoE models: experts_int8, "
                         "fp8 (an unquantized checkpoint, quantized at load)")

    def describe(self) -> str:
        return self.name

    def checkpoint_stream(self, weights: Iterable[tuple[str, torch.Tensor]]
                          ) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's (name, tensor) stream as the layers load it: formats whose
        tensors do not map one to one onto parameters (bitsandbytes) regroup them here."""
        return iter(weights)


def get_linear_method(quant_config: QuantConfig | None, prefix: str) -> LinearMethod:
    """The method of the linear layer named ``prefix``: dense without a quant config."""
    from pagedllm.quant.unquantized import UNQUANTIZED
    return UNQUANTIZED if quant_config is None else quant_config.method_for(prefix)


def get_moe_method(quant_config: QuantConfig | None, prefix: str) -> MoEMethod:
    """The method of the ``FusedMoE`` layer named ``prefix``: dense without a quant config."""
    from pagedllm.quant.unquantized import UNQUANTIZED_MOE
    return UNQUANTIZED_MOE if quant_config is None else quant_config.moe_method_for(prefix)
