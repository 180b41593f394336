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


def exact_float_ops():
    """Make the interpreter's narrowing float casts round as the GPU does (to nearest even,
    mantissa carries into the exponent, e4m3 saturating), and its fp32 ``tl.fma`` fused:
    fp32 -> bf16 / fp16 truncates in Triton 3.6's interpreter, its fp32 -> e4m3 cast rounds
    ties up and drops carries (127.9 -> 64), and its fma rounds the product first. The casts
    go through torch's, which round like the device's; the fma runs in float64 (the product
    of two fp32 values is exact there). Only the tests that compare bit-exact roundings call
    this (after ``patch_interpreter``), and undo it when done: returns the undo function."""
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter
    builder = interpreter.InterpreterBuilder
    torch_types = {tl.float32: torch.float32, tl.bfloat16: torch.bfloat16,
                   tl.float16: torch.float16, tl.float8e4nv: torch.float8_e4m3fn}
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16,
            torch.float8_e4m3fn: torch.uint8, torch.float32: torch.float32}
    original_cast, original_fp_to_fp, original_fma = (builder.cast_impl, builder.create_fp_to_fp,
                                                      builder.create_fma)

    def through_torch(src, dst_type):
        src_t, dst_t = torch_types.get(src.dtype.scalar), torch_types.get(dst_type.scalar)
        if src_t is None or dst_t is None or src_t == dst_t:
            return None
        data = torch.from_numpy(np.array(src.data, order="C"))
        if src_t != torch.float32:
            data = data.view(bits[src_t]).view(src_t)
        out = data.to(dst_t)
        out = out if dst_t == torch.float32 else out.view(bits[dst_t])
        np_dtype = interpreter._get_np_dtype(dst_type)
        return interpreter.TensorHandle(out.numpy().view(np_dtype), dst_type.scalar)

    def cast_impl(self, src, dst_type):  # (a TensorHandle's truth is its data's: no `or`)
        out = through_torch(src, dst_type)
        return original_cast(self, src, dst_type) if out is None else out

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        out = through_torch(src, dst_type)
        return original_fp_to_fp(self, src, dst_type, rounding_mode) if out is None else out

    def create_fma(self, x, y, z):
        if z.dtype.scalar != tl.float32:
            return original_fma(self, x, y, z)
        wide = x.data.astype(np.float64) * y.data.astype(np.float64) + z.data
        return interpreter.TensorHandle(wide.astype(np.float32), tl.float32)

    def undo() -> None:
        builder.cast_impl, builder.create_fp_to_fp, builder.create_fma = (
            original_cast, original_fp_to_fp, original_fma)

    builder.cast_impl, builder.create_fp_to_fp, builder.create_fma = (
        cast_impl, create_fp_to_fp, create_fma)
    return undo
