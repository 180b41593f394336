"""What serving LoRA adapters costs: decode tokens/s of one batch on an engine without
LoRA, on a LoRA engine with plain requests, with every request on one adapter, and with
the batch split over two adapters (rank 16, every projection targeted; random weights
written as PEFT files). All engines run in this process on the same prompts.

    python benchmarks/lora.py                       # the bundled demo model, CPU
    python benchmarks/lora.py --model DIR --batch 32 --rank 64
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

def write_lora(path: str, hf_config, rank: int, seed: int) -> str:
    """A PEFT-format LoRA on every projection of every layer, random A and B."""
    import torch
    from safetensors.torch import save_file

    from pagedllm.worker.lora import projection_shapes
    gen = torch.Generator().manual_seed(seed)
    tensors, shapes = {}, projection_shapes(hf_config)
    for layer in range(hf_config.num_hidden_layers):
        for name, (n_in, n_out) in shapes.items():
            parent = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{parent}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen) * 0.01
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                   "target_modules": list(shapes), "bias": "none"}, f)
    return path


def run(llm, prompts, params, loras) -> float:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="pagedllm/demo_model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch
    from transformers import AutoConfig

    from pagedllm import LLM, LoRARequest, SamplingParams
    torch.manual_seed(0)
    hf_config = AutoConfig.from_pretrained(args.model)
    tmp = tempfile.mkdtemp(prefix="pagedllm-lora-bench-")
    adapters = [LoRARequest(f"l{i}", i + 1, write_lora(os.path.join(tmp, f"l{i}"), hf_config,
                                                       args.rank, i)) for i in range(2)]
    prompts = [{"prompt_token_ids": list(range(5 + i, 37 + i))} for i in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    base = LLM(model=args.model)
    lora = LLM(model=args.model, enable_lora=True, max_loras=2, max_lora_rank=args.rank)
    cases = [("no LoRA engine", base, None), ("LoRA engine, plain requests", lora, None),
             ("one adapter for every request", lora, adapters[0]),
             ("two adapters, half each", lora,
              [adapters[i % 2] for i in range(args.batch)])]
    for _, llm, loras in cases:  # warm-up
        run(llm, prompts[:2], params, loras if not isinstance(loras, list) else loras[:2])
    results = {name: 0.0 for name, _, _ in cases}
    for _ in range(args.repeats):  # rounds over every case: drift of a shared VM hits all
        for name, llm, loras in cases:
            results[name] = max(results[name], run(llm, prompts, params, loras))
    first = results[cases[0][0]]
    for name, tok_s in results.items():
        print(f"{name:32s} {tok_s:8.1f} tok/s  {tok_s / first:.2f}x")


if __name__ == "__main__":
    main()
