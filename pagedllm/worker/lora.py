"""LoRA adapters (PEFT ``LORA`` checkpoints): ``--enable-lora``, many adapters in one batch.

A LoRA adapter adds ``scale * B @ A`` to a projection's weight (A [r, in], B [out, r],
``scale = lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA). The base weights stay as they are;
each LoRA-capable projection (q/k/v, o, gate/up, down of every decoder layer) gets slot
buffers for ``--max-loras`` adapters:

- ``LoRASlots.a`` [max_loras, parts * max_rank, in] and ``.b`` [max_loras, out, parts *
  max_rank]: a fused projection (qkv: 3 parts, gate/up: 2) keeps each part's A in its own
  block of rows and its B in its own block of columns (zero elsewhere), so one pair of
  matmuls gives every part's delta, and an adapter that leaves a part out leaves zeros;
- the scale is folded into B when an adapter is copied into a slot;
- in the forward, ``LoRABatch`` (built by the runner for each batch and carried to the
  projections in ``ForwardContext.lora``, which the layers pass on) says which rows
  (tokens) use which slot: per slot in use, ``out[rows] += (x[rows] @ A^T) @ B^T``, rows
  without an adapter get nothing. With one adapter for every row no gather is needed. A
  projection that holds slots but is called without the batch raises (its deltas would
  otherwise be lost without a word).

A request names its adapter by ``LoRARequest`` (``pagedllm/core/adapters.py``: id, name,
path; the scheduler sees nothing else). The worker loads it once per ``lora_int_id``
(``LoRACache`` in its ``AdapterStore``, at most ``--max-cpu-loras`` kept on the host; one
dropped there and named again is read again): the engine asks the driver worker's store at
``add_request``, so a bad path or checkpoint is a ValueError there. The scheduler admits at
most ``--max-loras`` adapters per batch, and the runner's ``LoRASlotTable`` copies them into
slots (least recently used slots are reused).
The adapter id salts the request's prefix-cache block hashes. Batches with a LoRA request
run without CUDA graphs (graph capture is off with ``--enable-lora``).

Supported: ``target_modules`` among q/k/v/o/gate/up/down_proj, ``bias: none``, no
``modules_to_save`` and no DoRA, rank <= ``--max-lora-rank``, tensor-parallel size 1, the
Llama-family models (their decoder layers hold ``qkv_proj``, ``o_proj``, ``gate_up_proj``,
``down_proj``). Anything else is a clear error.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from pagedllm.core.adapters import LoRARequest
from pagedllm.tensors import to_device

# checkpoint module name -> (fused projection attribute, part index)
_TARGETS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
            "o_proj": ("o_proj", 0), "gate_proj": ("gate_up_proj", 0),
            "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0)}
# fused projection -> (its parent attribute in a decoder layer, number of parts)
_PROJECTIONS = {"qkv_proj": ("self_attn", 3), "o_proj": ("self_attn", 1),
                "gate_up_proj": ("mlp", 2), "down_proj": ("mlp", 1)}
_KEY = re.compile(r"^(?:(?:base_model\.model\.)?model\.)?layers\.(\d+)\.(?:self_attn|mlp)\."
                  r"(\w+)\.lora_([AB])(?:\.default)?\.weight$")
MAX_RANKS = (8, 16, 32, 64, 128, 256)  # vLLM's choices for --max-lora-rank


@dataclass(eq=False)
class LoadedLoRA:
    lora_id: int
    name: str
    rank: int
    scale: float
    # (layer index, checkpoint module name) -> (A [r, in], B [out, r]) fp32 on the host
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)


def projection_shapes(hf_config) -> dict[str, tuple[int, int]]:
    """(in, out) of each LoRA-capable checkpoint module of a Llama-family config."""
    h = hf_config.hidden_size
    head_dim = getattr(hf_config, "head_dim", None) or h // hf_config.num_attention_heads
    q = hf_config.num_attention_heads * head_dim
    kv = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    inter = hf_config.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv * head_dim), "v_proj": (h, kv * head_dim),
            "o_proj": (q, h), "gate_proj": (h, inter), "up_proj": (h, inter),
            "down_proj": (inter, h)}


def load_lora(request: LoRARequest, max_rank: int, num_layers: int,
              shapes: dict[str, tuple[int, int]]) -> LoadedLoRA:
    """Read and check a PEFT LoRA directory (against the model's projection ``shapes``, from
    ``projection_shapes``); ValueError naming the adapter on any problem."""
    name, path = request.lora_name, request.path
    if not isinstance(request.lora_int_id, int) or request.lora_int_id < 1:
        raise ValueError(f"LoRA {name!r}: lora_int_id must be a positive integer, got "
                         f"{request.lora_int_id!r}")
    if request.long_lora_max_len is not None:
        raise ValueError(f"LoRA {name!r}: long_lora_max_len (long-context LoRA) is not "
                         "supported yet")
    rank, scale = _read_adapter_config(name, path, max_rank)
    pairs = _pair_tensors(name, _read_tensors(path, name), num_layers)
    weights = {}
    for where, ab in pairs.items():
        n_in, n_out = shapes[where[1]]
        if set(ab) != {"A", "B"} or tuple(ab["A"].shape) != (rank, n_in) or \
                tuple(ab["B"].shape) != (n_out, rank):
            raise ValueError(f"LoRA {name!r}: layer {where[0]} {where[1]} needs lora_A "
                             f"[{rank}, {n_in}] and lora_B [{n_out}, {rank}] (is it an "
                             "adapter of this model?)")
        weights[where] = (ab["A"], ab["B"])
    if not weights:
        raise ValueError(f"LoRA {name!r}: no LoRA weights in {path!r}")
    return LoadedLoRA(request.lora_int_id, name, rank, float(scale), weights)


def _read_adapter_config(name: str, path: str, max_rank: int) -> tuple[int, float]:
    """(rank, scale) from ``adapter_config.json``; ValueError for what LoRA here cannot run."""
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"LoRA {name!r}: no adapter_config.json in {path!r}")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA {name!r}: peft_type {config.get('peft_type')!r} is not LORA")
    rank, alpha = config.get("r"), config.get("lora_alpha", 8)  # PEFT's default alpha
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA {name!r}: adapter_config.json has no positive integer r")
    if rank > max_rank:
        raise ValueError(f"LoRA {name!r}: rank {rank} is greater than --max-lora-rank "
                         f"{max_rank}")
    for key, ok, what in (("bias", lambda v: v in (None, "none"), "bias terms"),
                          ("modules_to_save", lambda v: not v, "modules_to_save"),
                          ("use_dora", lambda v: not v, "DoRA"),
                          ("rank_pattern", lambda v: not v, "per-module ranks (rank_pattern)"),
                          ("alpha_pattern", lambda v: not v, "per-module alphas")):
        if not ok(config.get(key)):
            raise ValueError(f"LoRA {name!r}: {what} ({key}={config.get(key)!r}) are not "
                             "supported")
    return rank, alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _pair_tensors(name: str, tensors: dict[str, torch.Tensor], num_layers: int,
                  ) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """(layer, module) -> {"A": lora_A, "B": lora_B} (float32); ValueError for a tensor of
    a module or layer LoRA cannot adapt here, or a duplicate."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None or match.group(2) not in _TARGETS:
            raise ValueError(f"LoRA {name!r}: tensor {key!r} targets a module LoRA cannot "
                             f"adapt here (supported: {', '.join(_TARGETS)})")
        layer = int(match.group(1))
        if layer >= num_layers:
            raise ValueError(f"LoRA {name!r}: tensor {key!r} names layer {layer}; the model "
                             f"has {num_layers}")
        ab = pairs.setdefault((layer, match.group(2)), {})
        if match.group(3) in ab:
            raise ValueError(f"LoRA {name!r}: more than one lora_{match.group(3)} for layer "
                             f"{layer} {match.group(2)} (tensor {key!r})")
        ab[match.group(3)] = tensor.float()
    return pairs


def _read_tensors(path: str, name: str) -> dict[str, torch.Tensor]:
    st = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file
        return load_file(st)
    binary = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise ValueError(f"LoRA {name!r}: no adapter_model.safetensors or adapter_model.bin in "
                     f"{path!r}")


class LoRACache:
    """A worker's loaded adapters by id, least recently used dropped past ``capacity``
    (``--max-cpu-loras``); an id always names the same adapter (one dropped and asked for
    again is read again from its directory)."""

    def __init__(self, capacity: int, max_rank: int, num_layers: int,
                 shapes: dict[str, tuple[int, int]]) -> None:
        self.capacity, self.max_rank, self.num_layers = capacity, max_rank, num_layers
        self.shapes = shapes
        self._loaded: OrderedDict[int, LoadedLoRA] = OrderedDict()  # LRU first
        self._names: dict[int, LoRARequest] = {}  # every id seen: an id names one adapter

    def get(self, request: LoRARequest) -> LoadedLoRA:
        known = self._names.get(request.lora_int_id)
        if known is not None and (known.lora_name, known.path) != (request.lora_name,
                                                                     request.path):
            raise ValueError(f"lora_int_id {request.lora_int_id} is already in use by LoRA "
                             f"{known.lora_name!r}")
        loaded = self._loaded.get(request.lora_int_id)
        if loaded is None:
            loaded = load_lora(request, self.max_rank, self.num_layers, self.shapes)
            self._loaded[request.lora_int_id] = loaded
            self._names[request.lora_int_id] = request
            while len(self._loaded) > self.capacity:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(request.lora_int_id)
        return loaded

    def put(self, request: LoRARequest, loaded: LoadedLoRA) -> None:
        """Keep ``loaded`` as ``request``'s adapter (the memory profile's all-zero ones)."""
        self._names[request.lora_int_id] = request
        self._loaded[request.lora_int_id] = loaded

    def remove(self, lora_int_id: int) -> bool:
        """Drop an adapter's host weights (its id keeps naming it); True if it was loaded."""
        return self._loaded.pop(lora_int_id, None) is not None


# ---- the model side --------------------------------------------------------------------

@dataclass
class LoRABatch:
    """Which slot each row of this forward uses: (slot, rows tensor or None = every row)."""
    groups: list[tuple[int, torch.Tensor | None]]


class LoRASlots:
    """One projection's slot buffers (module docstring)."""

    def __init__(self, part_sizes: list[int], in_features: int, max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.part_sizes, self.max_rank = part_sizes, max_rank
        self.offsets = [sum(part_sizes[:i]) for i in range(len(part_sizes))]
        width = len(part_sizes) * max_rank
        self.a = torch.zeros(max_loras, width, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(max_loras, sum(part_sizes), width, dtype=dtype, device=device)

    def load(self, slot: int, parts: dict[int, tuple[torch.Tensor, torch.Tensor]],
             scale: float) -> None:
        """Copy an adapter's (A, B) of each part into ``slot``; parts it lacks stay zero.
        (``load_lora`` checked the shapes against the model.)"""
        self.a[slot].zero_()
        self.b[slot].zero_()
        for part, (a, b) in parts.items():
            r, lo = a.shape[0], part * self.max_rank
            self.a[slot, lo:lo + r] = a.to(self.a.dtype)
            out = self.offsets[part]
            self.b[slot, out:out + b.shape[0], lo:lo + r] = (b * scale).to(self.b.dtype)

    def add_delta(self, x: torch.Tensor, out: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
        """``out`` (the base projection of ``x``, a fresh tensor: updated in place) plus each
        slot's delta on its rows."""
        if self.a.dtype != x.dtype:
            x = x.to(self.a.dtype)
        for slot, rows in batch.groups:
            a, b = self.a[slot], self.b[slot]
            if rows is None and out.dtype == a.dtype:  # every row: add in the second matmul
                out.addmm_(x @ a.t(), b.t())
            elif rows is None:
                out.add_(((x @ a.t()) @ b.t()).to(out.dtype))
            else:
                delta = (x.index_select(0, rows) @ a.t()) @ b.t()
                out.index_add_(0, rows, delta.to(out.dtype))
        return out


def lora_modules(model: torch.nn.Module) -> list[tuple[int, str, torch.nn.Module]]:
    """(layer index, fused projection name, module) of every LoRA-capable projection."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    found = []
    for i in getattr(inner, "stage_layers", range(len(layers or []))):
        layer = layers[i]
        for proj, (parent, _) in _PROJECTIONS.items():
            module = getattr(getattr(layer, parent, None), proj, None)
            if module is None:
                return []
            found.append((i, proj, module))
    return found


def check_lora_support(model: torch.nn.Module, architecture: str) -> None:
    if not lora_modules(model):
        raise ValueError(f"--enable-lora: {architecture} is not supported yet (LoRA serves the "
                         "Llama-family models: Llama, Mistral, Qwen2/3, Gemma and the like)")


def check_lora_architecture(hf_config: Any, max_model_len: int) -> None:
    """``check_lora_support`` before any weight is read (``create_engine_config``): the
    architecture's layers are built on the meta device (no memory, no weights) and must have
    every projection LoRA adapts."""
    from pagedllm.models.registry import resolve_model_class
    model_class = resolve_model_class(getattr(hf_config, "architectures", None))
    with torch.device("meta"):
        model = model_class(hf_config, max_model_len)
    check_lora_support(model, hf_config.architectures[0])


class LoRASlotTable:
    """The runner's ``--max-loras`` slots: which adapter each holds, reused least recently
    used first (the scheduler never puts more adapters than slots in one batch)."""

    def __init__(self, model: torch.nn.Module, max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.max_loras = max_loras
        self.modules: dict[tuple[int, str], LoRASlots] = {}
        for layer, proj, module in lora_modules(model):
            sizes = (list(module.output_sizes.values()) if _PROJECTIONS[proj][1] > 1
                     else [module.output_size])
            module.lora = self.modules[(layer, proj)] = LoRASlots(
                sizes, module.input_size, max_loras, max_rank, dtype, device)
        self._slots: OrderedDict[int, int] = OrderedDict()  # lora id -> slot, LRU first

    def batch(self, row_loras: list[LoadedLoRA | None],
              device: torch.device) -> LoRABatch | None:
        """The mapping of one forward whose row i uses ``row_loras[i]``."""
        ids = {lora.lora_id: lora for lora in row_loras if lora is not None}
        if not ids:
            return None
        if len(ids) > self.max_loras:
            raise RuntimeError(f"{len(ids)} LoRAs in one batch; --max-loras is {self.max_loras}")
        slots = {lora_id: self._slot(lora, set(ids)) for lora_id, lora in ids.items()}
        if len(ids) == 1 and all(lora is not None for lora in row_loras):
            return LoRABatch([(next(iter(slots.values())), None)])
        groups = []
        for lora_id, slot in slots.items():
            rows = [i for i, lora in enumerate(row_loras)
                    if lora is not None and lora.lora_id == lora_id]
            groups.append((slot, to_device(rows, torch.long, device)))
        return LoRABatch(groups)

    def _slot(self, lora: LoadedLoRA, in_use: set[int]) -> int:
        slot = self._slots.get(lora.lora_id)
        if slot is None:
            if len(self._slots) < self.max_loras:
                slot = len(self._slots)
            else:
                victim = next(i for i in self._slots if i not in in_use)
                slot = self._slots.pop(victim)
            self._load(slot, lora)
            self._slots[lora.lora_id] = slot
        self._slots.move_to_end(lora.lora_id)
        return slot

    def _load(self, slot: int, lora: LoadedLoRA) -> None:
        by_module: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        for (layer, name), ab in lora.weights.items():
            proj, part = _TARGETS[name]
            by_module.setdefault((layer, proj), {})[part] = ab
        for key, slots in self.modules.items():
            slots.load(slot, by_module.get(key, {}), lora.scale)
