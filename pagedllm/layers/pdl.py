"""Programmatic dependent launch (PDL) for the chain of small Triton kernels of a decode step.

A batch-1 decode step of an 8B model is ~300 kernels, most of them a few microseconds long;
between two dependent kernels the GPU drains the first (its last, partly filled wave), then
launches and ramps up the second. On Hopper (compute capability 9.0+) a kernel launched with
PDL may start while the one before it is still running:
1. every kernel of the chain calls ``launch_dependents`` first: the next kernel's programs may
   be scheduled as soon as all of this kernel's programs have started;
2. a kernel loads only what no earlier kernel of the step writes (weights, norm weights,
   positions, slots, block tables and sequence lengths, all written before the step's first
   torch kernel) before ``wait``;
3. ``wait`` blocks until the previous kernel has finished and its writes are visible; every
   program of a PDL kernel calls it before it reads anything a kernel wrote or writes
   anything (no program returns early before it), so finishing implies that the kernel
   before it finished too, and the ordering holds along the whole chain.
Kernels that are not Triton (cuBLAS, torch) launch normally and wait for everything before
them. CUDA graphs capture the launches as programmatic edges.

``enabled(t)``: CUDA tensor on a 9.0+ device, the Triton in use has the GDC intrinsics, not
under the interpreter, and ``PAGEDLLM_PDL`` is not ``0`` (A/B runs). Kernels take the result
as a ``USE_PDL`` constexpr, with the launch option, through ``options(t)``.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from pagedllm.switches import switches

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAVE_GDC = True
except ImportError:  # older Triton: PDL stays off
    _HAVE_GDC = False
    gdc_launch_dependents = gdc_wait = None

ENV = switches().pdl  # PAGEDLLM_PDL


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(t: torch.Tensor) -> bool:
    if not (ENV and _HAVE_GDC and t.is_cuda) or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _capable(t.device.index if t.device.index is not None
                    else torch.cuda.current_device())


def options(t: torch.Tensor) -> dict:
    """The ``USE_PDL`` constexpr and launch options of a kernel working on ``t``."""
    use = enabled(t)
    return {"USE_PDL": True, "launch_pdl": True} if use else {"USE_PDL": False}


@triton.jit
def launch_dependents(USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_launch_dependents()


@triton.jit
def wait(USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_wait()
