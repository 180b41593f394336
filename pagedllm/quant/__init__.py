"""Weight quantization: one ``LinearMethod`` per linear layer, chosen at construction.

``base`` declares the strategy (create parameters with their sharding metadata, post-process
after loading, apply) and ``QuantConfig`` (which method a module with a given checkpoint
``prefix`` gets). ``unquantized`` is today's dense path; ``gptq``, ``awq``, ``fp8`` and
``compressed_tensors`` read their checkpoint formats; on CPU they run a torch
dequantize-then-matmul reference (``packing``), on CUDA ``kernels`` picks the fast path:
``triton_wna16`` (fused-dequantization int4 / int8 GEMV and GEMM for the GPTQ, AWQ and
pack-quantized layouts) and ``torch._scaled_mm`` for fp8 W8A8. ``config`` turns
``--quantization`` and the checkpoint's ``quantization_config`` into a ``QuantConfig`` at
start-up, before any weight loads.

Other formats: ``int8`` (compressed-tensors int8 W8A8), ``fp8_formats`` (fbgemm_fp8,
modelopt), ``bitsandbytes`` (4-bit NF4/FP4 and LLM.int8 checkpoints, NF4 at load, QLoRA
targets; ``QuantConfig.checkpoint_stream`` regroups its tensors) and ``gguf`` /
``gguf_dequant`` (llama.cpp files, dequantized at load).
"""
