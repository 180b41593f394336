"""Issue #5's GPU workloads in one process: start-up, batch-1 decode vs the roofline, time to
first token, offline throughput (1000 x 256/256) and the nano-vllm workload, each next to
Hugging Face ``generate`` (eager, bf16) on the same shape measured in the same run.

    python benchmarks/gpu_workloads.py                 # everything (one H100: ~6 minutes)
    python benchmarks/gpu_workloads.py --only ttft decode

Models are the config-only directories under benchmarks/configs with dummy weights and no
tokenizer; prompts are seeded random token ids; EOS is ignored. HF runs on a subset where its
batch would not fit (the subset is printed). Prints one JSON line per result.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.throughput import bench_hf, copy_bandwidth_gbs, make_prompts, weight_bytes_per_step  # noqa: E402

LLAMA = "benchmarks/configs/llama-3-8b"
QWEN3 = "benchmarks/configs/qwen3-0.6b"


def parse_engine_args(items: list[str]) -> dict:
    """``key=value`` engine arguments: ints and True/False parsed, the rest strings."""
    out = {}
    for item in items:
        key, value = item.split("=", 1)
        out[key] = int(value) if value.lstrip("-").isdigit() else \
            {"True": True, "False": False}.get(value, value)
    return out


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


ENGINE_ARGS: dict = {}  # --engine-arg key=value, applied to every engine


def make_llm(model: str, max_model_len: int, **kw):
    from pagedllm import LLM
    kw = dict(load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=max_model_len, **kw)
    return LLM(model=model, **{**kw, **ENGINE_ARGS})


def release_memory() -> None:
    """After the caller dropped its last reference (``del llm``): give the memory back."""
    gc.collect()
    torch.cuda.empty_cache()


LAST_DIGEST = ""  # of the last generate()'s token ids: equal across variants of one engine


def generate(llm, prompts: list[list[int]], output_lens: list[int]) -> tuple[float, int]:
    global LAST_DIGEST
    from pagedllm import SamplingParams
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == sum(output_lens)
    LAST_DIGEST = hashlib.sha1(str([list(o.outputs[0].token_ids) for o in outs]).encode()
                               ).hexdigest()[:12]
    return elapsed, tokens


def hf_model(model: str):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(model)
    with torch.device("cuda"):  # random init on the host took minutes for 8B
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def bench_startup(args) -> None:
    """Seconds from LLM() to ready: dummy weights, KV cache profiled, every CUDA graph
    size captured (the worker captures them all at start-up). Twice: the first start pays
    for the CUDA context and kernel compiles, the second finds them loaded."""
    for attempt in ("first start in a fresh process", "second start in the same process"):
        start = time.perf_counter()
        llm = make_llm(LLAMA, 2048)
        graphs = llm.llm_engine.worker.runner.graphs
        emit(workload="startup", attempt=attempt, model=LLAMA,
             seconds_to_ready=round(time.perf_counter() - start, 2),
             graph_sizes=len(graphs.graphs) if graphs else 0)
        del llm, graphs  # the graph runner holds the model and KV cache too
        release_memory()


def bench_decode(args) -> None:
    """Batch 1, 128 in / 512 out, against weight bytes / copy bandwidth."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(LLAMA)
    with torch.device("meta"):
        step_bytes = weight_bytes_per_step(AutoModelForCausalLM.from_config(
            cfg, dtype=torch.bfloat16))
    # best of 20 (best of 5 moved between 3,862 and 4,135 GB/s across H200 runs)
    bandwidth = copy_bandwidth_gbs(torch.device("cuda"), 1 << 30, repeats=20)
    roofline = bandwidth * 1e9 / step_bytes
    prompt = make_prompts(1, 128, cfg.vocab_size, 0)
    for steps in args.decode_steps:
        llm = make_llm(LLAMA, 1024, num_scheduler_steps=steps, max_num_seqs=8)
        generate(llm, prompt, [16])  # warm-up: graphs for batch 1
        best = min(generate(llm, prompt, [512])[0] for _ in range(2))
        emit(workload="decode b=1 128/512", num_scheduler_steps=steps,
             tok_s=round(512 / best, 1), roofline_tok_s=round(roofline, 1),
             roofline_share=round(512 / best / roofline, 3), copy_gbs=round(bandwidth, 1),
             pdl=os.environ.get("PAGEDLLM_PDL", "1") != "0", tokens_sha1=LAST_DIGEST)
        del llm
        release_memory()
    if not args.skip_hf:
        model = hf_model(LLAMA)
        emit(workload="decode b=1 128/512", engine="hf",
             tok_s=round(bench_hf(model, prompt, 512), 1))
        del model
        release_memory()


def bench_ttft(args) -> None:
    """One 1024-token prompt on an idle engine, max_tokens=1: best of 5 after a warm-up."""
    prompt = make_prompts(1, 1024, 128256, 1)
    llm = make_llm(LLAMA, 2048)
    generate(llm, prompt, [1])
    best = min(generate(llm, prompt, [1])[0] for _ in range(5))
    emit(workload="ttft 1024", ms=round(best * 1e3, 2))
    del llm
    release_memory()


def bench_throughput(args) -> None:
    """1000 prompts of 256 tokens, 256 out each."""
    prompts = make_prompts(args.num_prompts, 256, 128256, 0)
    for steps in [] if args.hf_only else args.throughput_steps:
        llm = make_llm(LLAMA, 512 + 16, num_scheduler_steps=steps,
                       gpu_memory_utilization=0.9, max_num_seqs=args.max_num_seqs)
        generate(llm, prompts[:8], [8] * 8)
        elapsed, tokens = generate(llm, prompts, [256] * len(prompts))
        emit(workload=f"throughput {len(prompts)} x 256/256", num_scheduler_steps=steps,
             max_num_seqs=args.max_num_seqs, output_tok_s=round(tokens / elapsed, 1),
             total_tok_s=round(2 * tokens / elapsed, 1), seconds=round(elapsed, 2))
        del llm
        release_memory()
    if not args.skip_hf:
        model = hf_model(LLAMA)
        sub = prompts[:args.hf_batch]
        emit(workload="throughput 256/256", engine="hf", batch=len(sub),
             output_tok_s=round(bench_hf(model, sub, 256), 1))
        del model
        release_memory()


def bench_nano(args) -> None:
    """nano-vllm's benchmark: Qwen3-0.6B, 256 sequences, lengths uniform in [100, 1024]."""
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))]
               for _ in range(256)]
    out_lens = [rng.randint(100, 1024) for _ in range(256)]
    for steps in args.throughput_steps:
        llm = make_llm(QWEN3, 4096, num_scheduler_steps=steps, gpu_memory_utilization=0.9)
        generate(llm, prompts[:4], [8] * 4)
        # the first run still JIT-compiles Triton kernels for new prefill shapes
        for run in ("first run", "second run"):
            elapsed, tokens = generate(llm, prompts, out_lens)
            emit(workload="nano-vllm qwen3-0.6b 256 seqs", run=run,
                 num_scheduler_steps=steps, output_tok_s=round(tokens / elapsed, 1),
                 seconds=round(elapsed, 2))
        del llm
        release_memory()
    if not args.skip_hf:
        model = hf_model(QWEN3)
        sub = make_prompts(args.hf_batch, 562, 10000, 0)  # mean lengths of the workload
        emit(workload="nano-vllm shape 562/562", engine="hf", batch=len(sub),
             output_tok_s=round(bench_hf(model, sub, 562), 1))
        del model
        release_memory()


WORKLOADS = {"startup": bench_startup, "decode": bench_decode, "ttft": bench_ttft,
             "throughput": bench_throughput, "nano": bench_nano}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--decode-steps", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--throughput-steps", type=int, nargs="+", default=[8])
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--hf-batch", type=int, default=64)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--hf-only", action="store_true", help="throughput: the HF run only")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra engine argument for every engine, e.g. "
                        "disable_async_output_proc=True (ints and True/False parsed)")
    args = parser.parse_args()
    ENGINE_ARGS.update(parse_engine_args(args.engine_arg))
    if ENGINE_ARGS:
        emit(engine_args=ENGINE_ARGS)
    emit(device=torch.cuda.get_device_name(), torch=torch.__version__)
    for name in args.only:
        WORKLOADS[name](args)


if __name__ == "__main__":
    main()
