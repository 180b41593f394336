"""Triton's interpreter (``TRITON_INTERPRET=1``: the kernels on CPU), with two gaps of Triton
3.6's filled so the kernels stay GPU-first; shared by tests/kernels and the benchmarks' smoke
runs. Call it after TRITON_INTERPRET is set and before the kernels are imported."""
from __future__ import annotations


def patch_interpreter() -> None:
    """Two gaps of Triton 3.6's interpreter, filled here so the kernels stay GPU-first:
    1. a loaded scalar is a size-1 numpy array, and ``range(scalar)`` calls ``int(array)``,
       which numpy >= 2.3 refuses: index its single element instead;
    2. ``tl.dot`` on bf16 multiplies the raw uint16 bit patterns: widen bf16 to fp32 first.
    (Its fp32 -> bf16 casts truncate where the GPU rounds to nearest even: within tolerance.)
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter
    if getattr(interpreter, "pagedllm_patched", False):
        return
    original_patch = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    original_dot = interpreter.InterpreterBuilder.create_dot

    def widen(h):
        if h.dtype != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32),
                                        tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter.InterpreterBuilder.create_dot = create_dot
    interpreter.pagedllm_patched = True
