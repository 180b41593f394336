"""The sampler's ops, one per module, each a pure function over ``[num_rows, vocab]`` fp32
logits with per-row parameters as tensors. ``pagedllm/sample/sampler.py`` documents the order."""
