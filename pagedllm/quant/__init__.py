"""Weight quantization: one ``LinearMethod`` per linear layer, chosen at construction.

``base`` declares the strategy (create parameters with their sharding metadata, post-process
after loading, apply) and ``QuantConfig`` (which method a module with a given checkpoint
``prefix`` gets). ``unquantized`` is today's dense path; ``gptq``, ``awq``, ``fp8`` and
``compressed_tensors`` read their checkpoint formats and run a torch dequantize-then-matmul
reference (``packing``); ``triton_w4a16`` is a fused int4 kernel for CUDA (tested
against it, not yet wired into ``apply``). ``config`` turns
``--quantization`` and the checkpoint's ``quantization_config`` into a ``QuantConfig`` at
start-up, before any weight loads.

Other formats: ``int8`` (compressed-tensors int8 W8A8), ``fp8_formats`` (fbgemm_fp8,
modelopt), ``bitsandbytes`` (4-bit NF4/FP4 and LLM.int8 checkpoints, NF4 at load, QLoRA
targets; ``QuantConfig.checkpoint_stream`` regroups its tensors) and ``gguf`` /
``gguf_dequant`` (llama.cpp files, dequantized at load).
"""
