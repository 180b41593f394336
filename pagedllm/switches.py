"""pagedllm's own ``PAGEDLLM_*`` switches of the compute path, read from the environment here
and nowhere else (``tests/unit/test_switches.py`` guards that). They are A/B and test knobs,
not engine options: each default is the tuned behaviour, and a value outside a switch's
choices is a ValueError naming the variable (never ignored).

=============================== ========== ===========================================
variable                        default    effect
=============================== ========== ===========================================
``PAGEDLLM_DISABLE_FUSED_OPS``  unset      set (any value): no Triton fused ops on CUDA
                                           (``layers/fused.py``), plain PyTorch instead
``PAGEDLLM_GEMV``               ``tuned``  one-row projections on the Triton GEMV for the
                                           tuned shapes; ``off``: cuBLAS for every shape;
                                           ``all``: the GEMV for every shape (fp8 layers:
                                           the fp8 GEMV for every shape unless ``off``)
``PAGEDLLM_PDL``                ``1``      ``0``: no programmatic dependent launch on
                                           Hopper (``layers/pdl.py``)
``PAGEDLLM_DECODE_FOLD``        ``1``      ``0``: split decode attention and the W4A16
                                           one-row GEMV's split-K sums always reduce in a
                                           second kernel (``attention/triton_attention``,
                                           ``quant/triton_wna16``)
``PAGEDLLM_W4_MMA``            ``1``      ``0``: 4-bit GPTQ / AWQ / compressed-tensors layers
                                           keep ``triton_wna16``'s kernels instead of being
                                           repacked at load for ``quant/triton_w4mma``
                                           (mma.sync fragments up to 8 rows, its GEMM
                                           above)
``PAGEDLLM_MOE_ROUTED``         ``0``      ``1``: MoE decode steps run the post-attention
                                           norm inside the router's launch and the top-k
                                           routing inside the experts' gate/up kernel
                                           (``layers/moe.py``); off until it is measured
                                           on a GPU
``PAGEDLLM_DECODE_ROPE``        ``0``      ``1``: decode-only steps normalise and rotate q
                                           / k and write the new K / V inside the paged
                                           decode kernel (``attention/triton_backend``),
                                           not in a launch of their own; off until it is
                                           measured on a GPU
``PAGEDLLM_ASYNC_OUTPUT_PROC``  unset      ``1``: async output processing on CPU too (on by
                                           default on CUDA; ``EngineConfig.async_output_proc``)
=============================== ========== ===========================================

The kernel switches are resolved once per process (``switches()``, on first use); the
async-output one when an engine's config is created (``Switches.from_env()``).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Mapping

GEMV_CHOICES = ("tuned", "off", "all")


@dataclass(frozen=True)
class Switches:
    fused_ops: bool = True
    gemv: str = "tuned"
    pdl: bool = True
    decode_fold: bool = True
    async_output_proc: bool = False  # forced on where it is off by default (CPU)
    w4_mma: bool = True
    moe_routed: bool = False
    decode_rope: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Switches:
        env = os.environ if environ is None else environ
        gemv = env.get("PAGEDLLM_GEMV", "tuned")
        if gemv not in GEMV_CHOICES:
            raise ValueError(f"PAGEDLLM_GEMV={gemv!r}: choose from {', '.join(GEMV_CHOICES)}")
        return cls(fused_ops=not env.get("PAGEDLLM_DISABLE_FUSED_OPS"), gemv=gemv,
                   pdl=_on_unless_zero(env, "PAGEDLLM_PDL"),
                   decode_fold=_on_unless_zero(env, "PAGEDLLM_DECODE_FOLD"),
                   async_output_proc=env.get("PAGEDLLM_ASYNC_OUTPUT_PROC") == "1",
                   w4_mma=_one_or_zero(env, "PAGEDLLM_W4_MMA", "1") == "1",
                   moe_routed=_one_or_zero(env, "PAGEDLLM_MOE_ROUTED", "0") == "1",
                   decode_rope=_one_or_zero(env, "PAGEDLLM_DECODE_ROPE", "0") == "1")


def _one_or_zero(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, default)
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: choose 0 or 1")
    return value


def _on_unless_zero(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "1") != "0"


@functools.cache
def switches() -> Switches:
    """This process's switches, read once."""
    return Switches.from_env()
