#!/usr/bin/env bash
# Device calls for the GPU backend (issue #5). `bash benchmarks/gpu_suite.sh tests` runs the
# kernel tests (compiled, vs the torch references) and the engine tests on CUDA (Triton
# backend, CUDA graphs, multi-step, fp8 KV cache, memory profiling; HF references on CPU);
# `... bench1` the start-up, batch-1 decode and TTFT workloads; `... bench2` offline
# throughput (1000 x 256/256) and the nano-vllm workload; `... gemv` the one-row GEMV
# configs against cuBLAS; `... leads` the open questions of issue #5's batch-1 goal (graph
# replay with and without PDL, the decode profile, GEMV configs for the Qwen3-0.6B shape);
# `... serve` pagedllm serve vs the in-process engine vs LLM.generate (issue 19); `...
# serve-probe` the same with per-step timelines (where the server loses time) and start-ups;
# `... final-probe` kernel tests, server vs offline, W4A16 batch-1 and the MoE layer in one call;
# `... kerneltests` the quantized-matmul and fused-MoE kernel tests (issues 22, 23; ~5 min);
# `... quant` / `quantoffline` benchmarks/quant_bench.py (W4A16 GPTQ/AWQ and fp8 kernels and
# engine decode vs bf16, Llama-3-8B shape / fp8 offline 1000 x 256/256 vs bf16); `... moe` /
# `moeoffline` benchmarks/moe_bench.py (MoE layer vs copy bandwidth and Qwen3-30B-A3B decode
# vs roofline / offline vs the 8B dense shape); `... moetune` / `quanttune` the tile-config
# sweeps; `... smoke` both scripts on tiny shapes (CPU too). One mode per device call keeps
# each under 10 minutes;
# no argument: tests, bench1, bench2. (tests/e2e/test_lora.py needs peft, which the GPU image
# lacks: carry its wheel and accelerate's as .whl, see the device README, or it is skipped.)
set -uo pipefail
# the server's wheels, carried as .whl-serve (not in git): the GPU image has none of them.
# cp312 manylinux wheels, `pip download --no-deps` (see the device README) of fastapi,
# starlette, uvicorn, pydantic, pydantic_core, annotated-types, typing-inspection,
# typing_extensions, annotated-doc, opentelemetry-api, anyio, sniffio, h11, click, idna, pyzmq,
# and for GGUF files gguf, pyyaml, tqdm, requests, urllib3, charset-normalizer, certifi
use_serve_wheels() {
  if [ -d .whl-serve ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site-serve .whl-serve/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site-serve"
  fi
}
export PYTHONPATH="$PWD" PAGEDLLM_TEST_MODELS=/tmp/pagedllm-test-models
OUT_DIR=${OUT:-/tmp}
# server vs LLM.generate on the 8B shape, 1000 x 256/256 at rate inf, with per-step timelines
# ($1: time limit in seconds, $2: load-generator processes)
serve_vs_offline() {
  echo "== serve"; PYTHONUNBUFFERED=1 timeout "$1" python benchmarks/serving.py \
    --model benchmarks/configs/llama-3-8b --num-prompts 1000 --input-len 256 \
    --output-len 256 --range-ratio 0 --compare-offline --client-processes "$2" \
    --timeline "$OUT_DIR/timeline" --engine-flags --max-model-len 4096 \
    > "$OUT_DIR/serve.txt" 2>&1
  grep -E "over_offline|output_tokens_per_s|wall_s|tail_s|front_lag|full_batch|tpot|ttft|median|startup_s|client" \
    "$OUT_DIR/serve.txt" | head -40
}
# two starts of python -m pagedllm serve (8B shape, dummy weights) and their log splits
quant_engine() {  # quant_engine SECONDS ARGS...: quant_bench.py's engine part, its result lines
  timeout "$1" python benchmarks/quant_bench.py --only engine "${@:2}" --out "$OUT_DIR" 2>&1 \
    | grep -v Warning | grep -E "bench=|Error|error:" | cut -c1-300
}
startup_split() {
  echo "== start-up"; timeout "$1" python benchmarks/serve_startup.py \
    --model benchmarks/configs/llama-3-8b --repeat 2 -- --load-format dummy \
    --skip-tokenizer-init --max-model-len 4096 2>&1 | grep -E "seconds|start-up|ready in"
}
parts=${1:-"tests bench1 bench2"}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
for part in $parts; do
  case $part in
    tests)
      echo "== kernel tests"; python -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tail -4
      echo "== engine tests on CUDA"
      python -m pytest -q -p no:cacheprovider tests/models tests/e2e/test_engine_features.py \
        tests/e2e/test_gpu_bf16.py \
        tests/e2e/test_multi_step.py tests/e2e/test_fp8_kv_cache.py tests/e2e/test_gpu_memory.py \
        tests/e2e/test_spec_decode.py tests/e2e/test_lora.py \
        tests/unit/test_loader.py 2>&1 | tail -8 ;;
    bench1)
      python benchmarks/gpu_workloads.py --only startup decode ttft 2>&1 | grep -v Warning \
        | tee -a "$OUT_DIR/gpu_workloads.txt" ;;
    gemv)
      python benchmarks/gpu_gemv.py 2>&1 | grep -v Warning | tee -a "$OUT_DIR/gpu_gemv.txt" ;;
    leads)
      python benchmarks/graph_replay.py 2>&1 | grep PDL
      PAGEDLLM_PDL=0 python benchmarks/graph_replay.py 2>&1 | grep PDL
      python benchmarks/profile_decode.py --graphs --steps 8 2>&1 | grep -v Warning | tail -30
      python benchmarks/gpu_gemv.py --model benchmarks/configs/qwen3-0.6b 2>&1 \
        | grep -v Warning | tee -a "$OUT_DIR/gpu_gemv.txt" ;;
    serve)
      # issue 19: pagedllm serve (engine core in its own process) vs the in-process engine vs
      # LLM.generate, 8B shape, 1000 x 256/256 at rate inf, then a Poisson sweep; carries
      # the server's wheels (.whl-serve: fastapi, starlette, uvicorn, pydantic, pyzmq)
      use_serve_wheels
      PYTHONUNBUFFERED=1 python benchmarks/serving.py --model benchmarks/configs/llama-3-8b \
        --num-prompts 1000 --input-len 256 --output-len 256 --range-ratio 0 \
        --compare-offline --compare-inproc --client-processes 4 --rates 4 8 16 32 \
        --sweep-prompts 200 --engine-flags --max-model-len 4096 2>&1 | grep -v Warning \
        | tee -a "$OUT_DIR/serving.txt" ;;
    serve-probe)
      # issue 19: where the server loses time against offline (per-step timelines of the
      # core and the front end, benchmarks/timeline.py), then warm and cold start-up splits
      use_serve_wheels
      PYTHONUNBUFFERED=1 python benchmarks/serving.py --model benchmarks/configs/llama-3-8b \
        --num-prompts 1000 --input-len 256 --output-len 256 --range-ratio 0 \
        --compare-offline --compare-inproc --client-processes 4 --timeline "$OUT_DIR/timeline" \
        --engine-flags --max-model-len 4096 2>&1 | grep -v Warning | tee -a "$OUT_DIR/probe.txt"
      python benchmarks/serve_startup.py --model benchmarks/configs/llama-3-8b --repeat 2 -- \
        --load-format dummy --skip-tokenizer-init --max-model-len 4096 2>&1 \
        | grep -v Warning | tee -a "$OUT_DIR/startup.txt" ;;
    final-probe)
      # issue 19 / 22 / 23 in one call (the last H100 figures of 2026-12-07): the new kernel
      # tests, the server vs offline with timelines, batch-1 W4A16 decode vs bf16, the MoE
      # layer vs copy bandwidth; each part under its own time limit
      use_serve_wheels
      echo "== kernel tests"; timeout 120 python -m pytest -q -p no:cacheprovider \
        tests/kernels/test_fused_moe.py tests/kernels/test_wna16.py \
        tests/kernels/test_fp8_scaled_mm.py tests/kernels/test_triton_attention.py 2>&1 | tail -6
      serve_vs_offline 190 4
      echo "== quant b1"; timeout 130 python benchmarks/quant_bench.py --only engine \
        --formats bf16 gptq awq --batches 1 --no-offline --out "$OUT_DIR" 2>&1 \
        | grep -v Warning | tail -12
      echo "== moe layer"; timeout 80 python benchmarks/moe_bench.py --only layer \
        --out "$OUT_DIR" 2>&1 | grep -v Warning | tail -12 ;;
    probe3)
      # third session: the server with the raw-socket load generator (8 load processes),
      # start-up splits, the W4A16 kernels per projection and a profile of GPTQ batch-1 decode
      use_serve_wheels
      serve_vs_offline 200 8
      startup_split 120
      echo "== wna16 kernels"; timeout 100 python benchmarks/quant_bench.py --only kernels \
        --rows 1 16 --out "$OUT_DIR" 2>&1 | grep -v Warning | tail -30
      echo "== gptq decode profile"; timeout 90 python benchmarks/profile_decode.py --graphs \
        --quant gptq --tokens 32 --rows 20 2>&1 | grep -v Warning | tail -45 ;;
    probe4)
      # third session, second call: W4A16 GEMV / GEMM tile and split-K sweep at 1 and 16 rows,
      # Qwen3-30B-A3B batch-1 decode vs its roofline, the fused-MoE / W4A16 kernel tests
      echo "== tune"; timeout 330 python benchmarks/quant_bench.py --only kernels --tune \
        --rows 1 16 --out "$OUT_DIR" 2>&1 | grep -v Warning | grep -E "tune|bench=kernel" \
        | tail -40
      echo "== moe decode"; timeout 150 python benchmarks/moe_bench.py --only decode \
        --out "$OUT_DIR" 2>&1 | grep -v Warning | tail -6
      echo "== kernel tests"; timeout 100 python -m pytest -q -p no:cacheprovider \
        tests/kernels/test_fused_moe.py tests/kernels/test_wna16.py 2>&1 | tail -6 ;;
    final3)
      # third session, last call: the GPU engine tests of the issue-21 changes (one step
      # loop, LoRA / pipeline sends in the forward context), the server vs offline, start-up
      # (python -m pagedllm serve), bf16 vs GPTQ decode at batch 1 and 16, the W4A16 kernels
      use_serve_wheels
      echo "== engine tests"; timeout 170 python -m pytest -q -p no:cacheprovider -x \
        tests/e2e/test_step_loop.py tests/e2e/test_spec_decode.py tests/e2e/test_async_output.py \
        tests/unit/test_forward_context_lora.py tests/e2e/test_multi_step.py \
        tests/e2e/test_prompt_adapters.py 2>&1 | tail -4
      serve_vs_offline 170 8
      startup_split 80
      echo "== wna16 check"; timeout 60 python -c "import torch, benchmarks.quant_bench as q; \
q.check_kernels(torch.device('cuda'), torch.bfloat16)" 2>&1 | grep -E "check|Error" | head -4
      echo "== quant engine"; quant_engine 130 --formats bf16 gptq --batches 1 16 --no-offline ;;
    probe5)
      # fourth session, first call: where Qwen3-30B-A3B batch-1 decode spends its time (the
      # kernels per token inside the CUDA graphs), and fp8 vs bf16 batch-1 decode
      echo "== moe decode profile"; timeout 260 python benchmarks/profile_decode.py --graphs \
        --model benchmarks/configs/qwen3-30b-a3b --tokens 32 --rows 32 2>&1 \
        | grep -v Warning | tail -52
      echo "== fp8 b1"; quant_engine 150 --formats bf16 fp8 --batches 1 --no-offline ;;
    probe6)
      # fourth session, second call: the fused-MoE / W4A16 kernel tests, the per-token MoE
      # GEMV path (tuned at 1 token; both paths at 2-16 tokens), the dense GEMV sweep for the
      # Qwen3-30B-A3B projections, the W4A16 kernels at 1 and 16 rows
      echo "== kernel tests"; timeout 120 python -m pytest -q -p no:cacheprovider \
        tests/kernels/test_fused_moe.py tests/kernels/test_wna16.py 2>&1 | tail -4
      echo "== moe gemv tune"; timeout 130 python benchmarks/moe_bench.py --only layer \
        --tokens 1 --tune --out "$OUT_DIR" 2>&1 | grep -v Warning | grep "bench=" | tail -4
      echo "== moe layer"; timeout 70 python benchmarks/moe_bench.py --only layer \
        --tokens 2 4 8 16 --out "$OUT_DIR" 2>&1 | grep -v Warning | grep "bench=" | tail -4
      echo "== wna16 kernels"; timeout 60 python benchmarks/quant_bench.py --only kernels \
        --rows 1 16 --out "$OUT_DIR" 2>&1 | grep -v Warning | grep "bench=kernel" | tail -24
      echo "== gemv qwen3-30b"; timeout 140 python benchmarks/gpu_gemv.py \
        --model benchmarks/configs/qwen3-30b-a3b --rep-ms 50 --json "$OUT_DIR/gemv30b.json" \
        2>&1 | grep -v Warning | grep -E "MB:|best|faster" ;;
    probe7)
      # fourth session, third call: the kernel tests of the new paths (MoE GEMVs, W4A16
      # decoded-in-place GEMV / GEMM, decode split counts), then batch-1 decode of the
      # Qwen3-30B-A3B shape and of Mixtral-8x7B cut to two layers against their rooflines
      echo "== kernel tests"; timeout 300 python -m pytest -q -p no:cacheprovider \
        tests/kernels/test_fused_moe.py tests/kernels/test_wna16.py \
        tests/kernels/test_triton_attention.py 2>&1 | grep -v Warning | tail -8
      echo "== moe decode"; timeout 150 python benchmarks/moe_bench.py --only decode \
        --out "$OUT_DIR" 2>&1 | grep -v Warning | grep "bench=" | tail -2
      echo "== mixtral decode"; timeout 90 python benchmarks/moe_bench.py --only decode \
        --model benchmarks/configs/mixtral-8x7b-2l --out "$OUT_DIR" 2>&1 | grep -v Warning \
        | grep "bench=" | tail -2 ;;
    probe8)
      # fourth session, fourth call: the GPU-only W4A16 tests (which failed in probe7, with
      # their reasons), GPTQ vs bf16 decode at batch 1 and 16 with the folded GEMV, and the
      # Qwen3-30B-A3B decode profile after the MoE GEMV / dense GEMV changes
      echo "== wna16 gpu tests"; timeout 200 python -m pytest -q -p no:cacheprovider -rf \
        --tb=line tests/kernels/test_wna16.py -k "llama_shapes or cuda_engine or quant_methods \
        or fold or large_batches" 2>&1 | grep -v Warning | tail -14
      echo "== quant engine"; quant_engine 130 --formats bf16 gptq --batches 1 16 --no-offline
      echo "== moe decode profile"; timeout 110 python benchmarks/profile_decode.py --graphs \
        --model benchmarks/configs/qwen3-30b-a3b --tokens 32 --rows 18 2>&1 \
        | grep -v Warning | tail -24 ;;
    pending4)
      # what the fourth session's device time did not cover: bf16 / GPTQ / fp8 decode at
      # batch 1 and 16 (the fp8 batch-1 GEMV; GPTQ 16 rows after the GEMM revert), the
      # fp8 GEMV's layer test against _scaled_mm (rewritten after probe10), Qwen3-30B-A3B
      # vs the 8B shape offline (1000 x 256/256), and serve start-up (issue 19: <= 12 s)
      echo "== fp8 apply test"; timeout 90 python -m pytest -q -p no:cacheprovider -rf \
        --tb=line tests/kernels/test_fp8_gemv.py -k apply 2>&1 | tail -4
      echo "== quant engine"; quant_engine 170 --formats bf16 gptq fp8 --batches 1 16 --no-offline
      echo "== moe offline"; timeout 250 python benchmarks/moe_bench.py --only offline \
        --out "$OUT_DIR" 2>&1 | grep -v Warning | grep "bench=" | tail -3
      use_serve_wheels
      startup_split 70 ;;
    s5b)
      # the W4A16 GEMV and the MoE GEMV with the next tile prefetched: GPU kernel tests,
      # GPTQ vs bf16 batch-1 decode, the MoE GEMV sweep (prefetch on/off) and Qwen3-30B-A3B
      # decode with the best found; serve start-up with the core's collector off while it imports
      echo "== kernel tests"; timeout 150 python -m pytest -q -p no:cacheprovider -x \
        tests/kernels/test_wna16.py tests/kernels/test_fused_moe.py 2>&1 | tail -3
      echo "== quant engine"; quant_engine 120 --formats bf16 gptq --batches 1 --no-offline
      echo "== moe"; timeout 200 python benchmarks/moe_bench.py --only layer decode \
        --tokens 1 --tune --apply-tuned --out "$OUT_DIR" 2>&1 | grep -v Warning \
        | grep "bench=" | tail -4
      use_serve_wheels
      startup_split 70 ;;
    s5c)
      # the fp8 GEMV's first GPU sweep, and fp8 vs bf16 batch-1 decode with its best configs
      echo "== fp8"; timeout 330 python benchmarks/quant_bench.py --only kernels engine \
        --rows 1 --tune-fp8 --apply-tuned --formats bf16 fp8 --batches 1 --no-offline \
        --out "$OUT_DIR" 2>&1 | grep -v Warning | grep -E "bench=(fp8 gemv tune|decode)" ;;
    next6)
      # what the fifth session left for the next one, ~9 min (after a call of "s5e probe10"):
      # the MoE decode profile without PDL (its early launches blur the per-kernel split),
      # Qwen3-30B-A3B vs the 8B shape offline, bnb NF4 batch-1 decode (issue 22 reports it)
      echo "== profilers"; (which ncu nsys; ls /usr/local/cuda*/bin 2>/dev/null | grep -E \
        "ncu|nsys|cupti") 2>&1 | head -5  # stall reasons of the W4A16 GEMV, if ncu exists
      if command -v ncu > /dev/null; then timeout 120 ncu --section WarpStateStats \
        --section SchedulerStats -k regex:wna16_gemv -c 2 python benchmarks/wna16_probe.py \
        --ncu 2>&1 | grep -vi warning | tail -45; fi
      echo "== moe decode profile, PDL off"; PAGEDLLM_PDL=0 timeout 200 python \
        benchmarks/profile_decode.py --graphs --model benchmarks/configs/qwen3-30b-a3b \
        --tokens 32 --rows 30 2>&1 | grep -v Warning | tail -40
      echo "== moe offline"; timeout 250 python benchmarks/moe_bench.py --only offline \
        --out "$OUT_DIR" 2>&1 | grep -v Warning | grep "bench=" | tail -3
      echo "== nf4"; quant_engine 150 --formats bf16 nf4 --batches 1 --no-offline ;;
    s8a)
      # eighth session: the tensor-core W4A16 kernel (quant/triton_w4mma.py, GPTQ / AWQ
      # layers repacked at load): its GPU tests and the W4A16 engines' greedy tests (they
      # take it now), per projection at 1 / 16 / 64 rows against the CUDA-core kernels
      # (gptq) and bf16, GPTQ vs bf16 decode at batch 1 / 16 / 64, and GPTQ with
      # PAGEDLLM_W4_MMA=0 (the CUDA-core kernels) at batch 1 on the same machine (~8 min)
      echo "== gpu tests"; timeout 150 python -m pytest -q -p no:cacheprovider -rf \
        --tb=short tests/kernels/test_w4mma.py tests/kernels/test_wna16.py -k \
        "not test_wna16 or engine" 2>&1 | grep -v Warning | tail -12
      echo "== kernels"; timeout 100 python benchmarks/quant_bench.py --only kernels --rows 1 \
        16 64 --kinds gptq w4mma 2>&1 | grep -v Warning | grep -E "kind=(gptq|w4mma)|check" \
        | cut -c1-200
      echo "== quant engine"; PAGEDLLM_W4_MMA=1 quant_engine 200 --formats bf16 gptq \
        --batches 1 16 64 --no-offline
      echo "== old kernels"; PAGEDLLM_W4_MMA=0 quant_engine 90 --formats gptq --batches 1 \
        --no-offline ;;
    s8c)
      # the W4A16 layout after s8a: more than 8 rows take a wgmma GEMM reading the layout
      # (the register-fragment kernel's 16 / 64-row runs were 1.4-10x slower than the
      # CUDA-core GEMM); GPU tests, kernels at 16 / 64 rows, GPTQ vs bf16 decode at batch
      # 1 / 16 / 64 (~5 min)
      echo "== gpu tests"; timeout 100 python -m pytest -q -p no:cacheprovider -rf --tb=short \
        tests/kernels/test_w4mma.py -k "llama or gemm or engine" 2>&1 | grep -v Warning \
        | tail -4
      echo "== kernels"; timeout 70 python benchmarks/quant_bench.py --only kernels --rows 16 \
        64 --kinds gptq w4mma 2>&1 | grep -v Warning | grep -E "kind=(gptq|w4mma)" \
        | cut -c1-200
      echo "== quant engine"; PAGEDLLM_W4_MMA=1 quant_engine 220 --formats bf16 gptq \
        --batches 1 16 64 --no-offline ;;
    s8d)
      # s8c cut to ~3.5 min (little device time left): the GEMM route's GPU tests, the 16 / 64
      # row kernels, GPTQ decode at batch 16 / 64 (bf16 from s8a: 2,480.0 / 8,231.9)
      echo "== gpu tests"; timeout 80 python -m pytest -q -p no:cacheprovider -rf --tb=short \
        tests/kernels/test_w4mma.py -k "gemm or by_rows" 2>&1 | grep -v Warning | tail -4
      echo "== kernels"; timeout 60 python benchmarks/quant_bench.py --only kernels --rows 16 \
        64 --kinds gptq w4mma 2>&1 | grep -v Warning | grep -E "kind=(gptq|w4mma)" \
        | cut -c1-200
      echo "== quant engine"; PAGEDLLM_W4_MMA=1 quant_engine 80 --formats gptq --batches 16 64 \
        --no-offline ;;
    s10a)
      # tenth session, first call (~9 min, carry .whl-serve): the MoE decode profile with PDL
      # off, whole, into $OUT (the fusion targets of issue 23), the layout's GPU tests at the
      # ninth part's defaults, GPTQ vs bf16 at batch 16 / 64 with the 33-64 row config, the
      # routing kernel's GPU tests
      echo "== moe decode profile, PDL off"; PAGEDLLM_PDL=0 timeout 170 python \
        benchmarks/profile_decode.py --graphs --model benchmarks/configs/qwen3-30b-a3b \
        --tokens 32 --rows 40 > "$OUT_DIR/moe_profile.txt" 2>&1; grep -v Warning \
        "$OUT_DIR/moe_profile.txt" | tail -25 | cut -c1-150
      echo "== w4mma gpu tests"; timeout 90 python -m pytest -q -p no:cacheprovider -rf \
        --tb=short tests/kernels/test_w4mma.py -k "llama or gemm or engine" 2>&1 \
        | grep -v Warning | tail -3
      echo "== moe route tests"; timeout 40 python -m pytest -q -p no:cacheprovider -rf \
        --tb=short tests/kernels/test_fused_moe.py -k "route or topk or rejected or nan" 2>&1 \
        | tail -2
      echo "== quant engine"; quant_engine 150 --formats bf16 gptq --batches 16 64 --no-offline ;;
    s10b)
      # second call (~7 min, carry .whl-serve): the fp8 / int8 expert kernels' GPU tests and
      # Mixtral-8x7B fp8 batch-1 decode (mixtralfp8), GGUF Q4_K_M batch 1 with the default and
      # the vectorized Q4_K GEMV
      bash "$0" mixtralfp8
      use_serve_wheels
      echo "== gguf"; quant_engine 100 --formats bf16 gguf --batches 1 --no-offline
      echo "== gguf q4k vector"; quant_engine 80 --formats gguf --batches 1 --no-offline \
        --gguf-q4k-vector ;;
    s10c)
      # the tenth part's fusions, off by default until measured here (~7 min, carry
      # .whl-serve): MoE decode steps with the post-attention norm inside the router's launch
      # and the top-k routing inside the experts' gate/up GEMV (PAGEDLLM_MOE_ROUTED=1, two
      # launches fewer a layer) and decode attention with the rotary + KV write inside
      # (PAGEDLLM_DECODE_ROPE=1, one fewer): Qwen3-30B-A3B batch-1 decode without, with the
      # MoE fusions, then with both; their GPU tests (kernels and the CUDA engines' greedy
      # tokens) with both switches on. Flip the defaults in pagedllm/switches.py if they win
      echo "== moe decode (defaults)"; timeout 110 python benchmarks/moe_bench.py --only decode \
        --out "$OUT_DIR" 2>&1 | grep -E '"moe decode|Error'
      echo "== moe decode PAGEDLLM_MOE_ROUTED=1"; PAGEDLLM_MOE_ROUTED=1 timeout 110 python \
        benchmarks/moe_bench.py --only decode --out "$OUT_DIR" 2>&1 | grep -E '"moe decode|Error'
      echo "== fusion gpu tests"; PAGEDLLM_MOE_ROUTED=1 PAGEDLLM_DECODE_ROPE=1 timeout 150 \
        python -m pytest -q -p no:cacheprovider -rf --tb=short tests/kernels/test_fused_moe.py \
        tests/kernels/test_triton_attention.py tests/e2e/test_gpu_bf16.py -k \
        "routed or norm or cuda or rope or teacher_forced or pdl_same" 2>&1 | grep -v Warning \
        | tail -3
      echo "== moe decode PAGEDLLM_MOE_ROUTED=1 PAGEDLLM_DECODE_ROPE=1"; PAGEDLLM_MOE_ROUTED=1 \
        PAGEDLLM_DECODE_ROPE=1 timeout 110 python benchmarks/moe_bench.py --only decode \
        --out "$OUT_DIR" 2>&1 | grep -E '"moe decode|Error' ;;
    s10e)
      # the decode rope fusion on the dense shapes (~5 min): bf16 and GPTQ batch-1 decode of
      # the Llama-3-8B shape without and with PAGEDLLM_DECODE_ROPE=1, same machine
      echo "== decode"; quant_engine 140 --formats bf16 gptq --batches 1 --no-offline
      echo "== decode PAGEDLLM_DECODE_ROPE=1"; PAGEDLLM_DECODE_ROPE=1 quant_engine 140 \
        --formats bf16 gptq --batches 1 --no-offline ;;
    next9)
      # what the ninth session left, first call (~9 min, carry .whl-serve): s9a (the layout
      # GEMM's 16 / 64-row sweep, its GPU tests at the new defaults, GPTQ decode at batch 16 /
      # 64 with the new 33-64 row config) and the MoE routing kernel's GPU tests
      bash "$0" s9a
      echo "== moe route tests"; timeout 40 python -m pytest -q -p no:cacheprovider -rf \
        --tb=short tests/kernels/test_fused_moe.py -k "route or topk or rejected or nan" 2>&1 \
        | tail -2 ;;
    next9b)
      # second call (~7 min, carry .whl-serve: gguf): the triton_wna16 GEMM's sweep at 64
      # rows now that splits may go below 64 inputs a row (act-order / 8-bit layers and
      # PAGEDLLM_W4_MMA=0), Qwen3-30B-A3B batch-1 decode against its roofline, then GGUF
      echo "== wna16 gemm tune"; timeout 120 python benchmarks/quant_bench.py --only kernels \
        --rows 64 --kinds gptq --tune 2>&1 | grep -v Warning | grep -E "kernel tune" \
        | cut -c1-240
      timeout 120 python benchmarks/moe_bench.py --only decode --out "$OUT_DIR" 2>&1 \
        | grep -E '"moe decode'
      # GGUF Q4_K_M batch 1 with the vectorized Q4_K GEMV (untimed) against the default
      use_serve_wheels
      echo "== gguf"; quant_engine 100 --formats bf16 gguf --batches 1 --no-offline
      echo "== gguf q4k vector"; quant_engine 80 --formats gguf --batches 1 --no-offline \
        --gguf-q4k-vector ;;
    mixtralfp8)
      # issue 23: Mixtral-8x7B (all 32 layers; 93 GB in bf16) with --quantization fp8 (~47
      # GB: experts e4m3 per row through the fused MoE kernels, dense layers W8A8), batch-1
      # decode against its fp8 roofline (12.9 GB a token), the experts' GPU tests first (~4 min)
      echo "== fp8 / int8 expert kernels"; timeout 60 python -m pytest -q -p no:cacheprovider \
        -rf --tb=short tests/kernels/test_fused_moe.py -k "int8" 2>&1 | tail -2
      timeout 200 python benchmarks/moe_bench.py --only decode --model \
        benchmarks/configs/mixtral-8x7b --quantization fp8 --out "$OUT_DIR" 2>&1 \
        | grep -E '"moe decode|Error' ;;
    s9a)
      # the layout's GEMM (9-511 rows) had triton_wna16's table, never tuned for it: sweep
      # it at 16 / 64 rows (tiles, split-K programs per SM, least inputs a split per row),
      # then its GPU tests at the new defaults (two mma chains, the 33-64 row config) and
      # GPTQ decode at batch 16 / 64 against bf16 (~7 min)
      echo "== w4mma gemm tune"; timeout 240 python benchmarks/quant_bench.py --only kernels \
        --rows 16 64 --kinds w4mma --tune-w4mma 2>&1 | grep -v Warning \
        | grep -E "bench=w4mma tune|kind=w4mma" | cut -c1-240
      echo "== w4mma gpu tests"; timeout 90 python -m pytest -q -p no:cacheprovider -rf \
        --tb=short tests/kernels/test_w4mma.py -k "llama or gemm or engine" 2>&1 \
        | grep -v Warning | tail -3
      echo "== quant engine"; quant_engine 150 --formats bf16 gptq --batches 16 64 --no-offline ;;
    next8)
      # what the eighth session left (~9.5 min, carry .whl-serve): s8c (the W4A16 layout's
      # GEMM route: GPU tests, 16 / 64-row kernels, GPTQ with PAGEDLLM_W4_MMA=1 vs bf16 at
      # batch 1 / 16 / 64), then the one-row kernel's config sweep, then GPTQ with the
      # CUDA-core kernels at batch 16 / 64 for the A/B (flip the default if the layout holds)
      bash "$0" s8c
      echo "== w4mma tune"; timeout 120 python benchmarks/quant_bench.py --only kernels \
        --rows 1 --kinds w4mma --tune-w4mma 2>&1 | grep -v Warning | grep -E "w4mma tune" \
        | cut -c1-220
      echo "== old kernels"; PAGEDLLM_W4_MMA=0 quant_engine 90 --formats gptq --batches 16 64 \
        --no-offline ;;
    s8e)
      # the last minutes of device time: the GEMM route's GPU tests and 16 / 64-row kernels
      echo "== gpu tests"; timeout 70 python -m pytest -q -p no:cacheprovider -rf --tb=short \
        tests/kernels/test_w4mma.py -k "gemm or by_rows" 2>&1 | grep -v Warning | tail -4
      echo "== kernels"; timeout 60 python benchmarks/quant_bench.py --only kernels --rows 16 \
        64 --kinds gptq w4mma 2>&1 | grep -v Warning | grep -E "kind=(gptq|w4mma)" \
        | cut -c1-200 ;;
    s8b)
      # eighth session, second call (next7 cut to ~7 min): the GGUF kernels' GPU tests, GGUF
      # Q4_K_M vs bf16 decode at batch 1, fp8 vs bf16 offline 1000 x 256/256 (carry .whl-serve:
      # the gguf wheel)
      use_serve_wheels
      echo "== gguf gpu tests"; timeout 70 python -m pytest -q -p no:cacheprovider -rf \
        --tb=line tests/kernels/test_gguf_kernels.py 2>&1 | grep -v Warning | tail -4
      echo "== quant engine"; quant_engine 150 --formats bf16 gguf --batches 1 --no-offline
      echo "== fp8 offline"; quant_engine 200 --formats bf16 fp8 --batches 1 ;;
    next7)
      # what the seventh session left for the next one (~9 min; carry .whl-serve, which now
      # holds the gguf wheel): the Triton GGUF dequantize on the GPU (tests), GGUF Q4_K_M and
      # NF4 (tuned GEMM) vs bf16 decode at batch 1 and 16, fp8 vs bf16 offline 1000 x 256/256
      use_serve_wheels
      echo "== gguf / nf4 gpu tests"; timeout 90 python -m pytest -q -p no:cacheprovider -rf \
        --tb=line tests/kernels/test_gguf_kernels.py tests/kernels/test_nf4.py \
        tests/quant/test_gguf.py 2>&1 | grep -v Warning | tail -4
      echo "== quant engine"; quant_engine 240 --formats bf16 nf4 gguf --batches 1 16 \
        --no-offline
      echo "== fp8 offline"; quant_engine 250 --formats bf16 fp8 --batches 1 ;;
    next7b)
      # the W4A16 GEMM's 64-row tiles with the W^T x^T form (never swept: GPTQ batch 64 is
      # 0.828x bf16, goal 1.4x), then GPTQ vs bf16 decode at batch 64 (~7 min)
      echo "== 64-row sweep"; timeout 240 python benchmarks/quant_bench.py --only kernels \
        --rows 64 --tune 2>&1 | grep -v Warning | grep -E "kernel tune|kind=gptq"
      echo "== quant engine"; quant_engine 150 --formats bf16 gptq --batches 64 --no-offline ;;
    s7d)
      # seventh session, last call: NF4 vs bf16 decode at batch 16 (the GEMM at its tuned
      # config) and 64 (dequantize + cuBLAS)
      echo "== quant engine"; quant_engine 170 --formats bf16 nf4 --batches 16 64 \
        --no-offline ;;
    s7c)
      # seventh session, third call: the W4A16 GEMM as W^T x^T up to 64 rows (was 32; the
      # GPU cases at 33 and 64 rows, the 64-row kernels with the swap off and on), the
      # bitsandbytes 4-bit GEMM up to 64 rows (GPU tests, a tile sweep at 1 / 16 / 64 rows),
      # bf16 / GPTQ / NF4 decode at batch 16 and 64
      echo "== gpu tests"; timeout 80 python -m pytest -q -p no:cacheprovider -rf \
        --tb=line tests/kernels/test_nf4.py tests/kernels/test_wna16.py -k "test_nf4 or \
        (gptq_llama_shapes and (-33-dtype or -64-dtype)) or (awq_llama_shapes and -64) or \
        (compressed_tensors_llama_shapes and -64)" 2>&1 | grep -v Warning | tail -5
      for swap in 0 1; do echo "== 64-row kernels, swap $swap"; timeout 35 python \
        benchmarks/quant_bench.py --only kernels --rows 64 --gemm-swap $swap 2>&1 \
        | grep -v Warning | grep -E "kind=(gptq|nf4)|check"; done
      echo "== nf4 sweep"; timeout 60 python benchmarks/quant_bench.py --only kernels \
        --rows 16 --tune-nf4 2>&1 | grep -v Warning | grep -E "nf4 tune|kind=nf4"
      echo "== quant engine"; quant_engine 160 --formats bf16 nf4 gptq --batches 16 64 \
        --no-offline ;;
    s7b)
      # seventh session, second call: serve start-up with the config cache (the first start
      # fills it) and the configuration resolved before the server's imports, against the
      # sixth session's code (.ab-old: `git archive e45573b pagedllm benchmarks tests/utils`,
      # carried) on the same machine, and with the cache off; the Triton bitsandbytes 4-bit
      # kernels (GPU tests; NF4 vs bf16 decode at batch 1 and 16)
      use_serve_wheels
      startup_runs() {  # startup_runs DIR REPEAT: serve_startup.py of the tree in DIR
        (cd "$1" && PYTHONPATH="$PWD:/tmp/site-serve" timeout 150 python \
          benchmarks/serve_startup.py --model benchmarks/configs/llama-3-8b --repeat "$2" \
          -- --load-format dummy --skip-tokenizer-init --max-model-len 4096 2>&1 \
          | grep -E "seconds|resolved|took|ready in" | cut -c1-140)
      }
      echo "== start-up, this tree"; startup_runs . 3
      if [ -d .ab-old ]; then echo "== start-up, e45573b"; startup_runs .ab-old 2; fi
      echo "== start-up, cache off"; PAGEDLLM_CONFIG_CACHE=0 startup_runs . 1
      echo "== nf4 gpu tests"; timeout 120 python -m pytest -q -p no:cacheprovider -rf \
        --tb=line tests/kernels/test_nf4.py 2>&1 | grep -v Warning | tail -5
      echo "== quant engine"; quant_engine 200 --formats bf16 nf4 --batches 1 16 --no-offline ;;
    s7a)
      # seventh session, first call: serve start-up with the plain configuration (the core
      # imports no transformers), the W4A16 GPU cases the sixth session could not run (AWQ and
      # compressed-tensors Llama shapes at 16-33 rows on the W^T x^T GEMM), bf16 / GPTQ
      # decode at batch 1, 16 and 64
      use_serve_wheels
      startup_split 75
      echo "== wna16 gpu tests"; timeout 220 python -m pytest -q -p no:cacheprovider -rf \
        --tb=line tests/kernels/test_wna16.py -k "gptq_layout or (gptq_llama_shapes and \
        (-16-dtype or -33-dtype)) or awq_llama_shapes or compressed_tensors_llama_shapes" 2>&1 \
        | grep -v Warning | tail -8
      echo "== quant engine"; quant_engine 200 --formats bf16 gptq --batches 1 16 64 \
        --no-offline ;;
    s6d)
      # sixth session, last call: serve start-up with the core waiting for the front end's
      # configuration, where the core's seconds before EngineCore go, the MoE decode profile
      # without PDL
      use_serve_wheels
      startup_split 75
      for i in 1 2; do echo "== core boot $i"; timeout 60 python benchmarks/core_boot_probe.py \
        --top 25 2>&1 | grep -v "^$" | head -36 | cut -c1-150; done
      echo "== moe decode profile, PDL off"; PAGEDLLM_PDL=0 timeout 150 python \
        benchmarks/profile_decode.py --graphs --model benchmarks/configs/qwen3-30b-a3b \
        --tokens 32 --rows 30 2>&1 | grep -v Warning | tail -34 | cut -c1-150 ;;
    s6all)
      # sixth session, the one call if only one machine starts: serve start-up (the core takes
      # the front end's configuration), the GPU checks of this session's kernel changes
      # (W4A16 GEMV / 16-row GEMM, MoE with PDL), bf16 / GPTQ / fp8 / NF4 decode at batch 1
      # and 16, Qwen3-30B-A3B layer and batch-1 decode
      use_serve_wheels
      startup_split 75
      echo "== gpu checks"; timeout 100 python -m pytest -q -p no:cacheprovider -rf \
        --tb=line tests/kernels/test_wna16.py tests/kernels/test_fused_moe.py -k \
        "(gptq_llama_shapes and 4096-28672 and (-1-dtype or -16-dtype)) or gptq_layout \
        or cuda_engine_greedy_equals_cpu or test_fused_moe" 2>&1 | grep -v Warning | tail -5
      echo "== quant engine"; quant_engine 230 --formats bf16 gptq fp8 nf4 --batches 1 16 \
        --no-offline
      echo "== moe decode"; timeout 110 python benchmarks/moe_bench.py --only layer decode \
        --tokens 1 --out "$OUT_DIR" 2>&1 | grep -v Warning | grep "bench=" | tail -4 ;;
    s6b)
      # sixth session, second call: the W4A16 GPU cases (GEMV: EVEN, GROUP, bf16 x as int32
      # pairs; GEMM: W^T x^T with in-place 4-bit decode), the 16-row GEMM with the swap off
      # and on, bf16 / GPTQ / bnb NF4 decode at batch 1 and 16
      echo "== wna16 gpu tests"; timeout 220 python -m pytest -q -p no:cacheprovider -rf \
        --tb=line tests/kernels/test_wna16.py -k "gptq_layout or (gptq_llama_shapes and \
        (-1-dtype or -16-dtype or -33-dtype)) or awq_llama_shapes or \
        cuda_engine_greedy_equals_cpu" 2>&1 | grep -v Warning | tail -8
      for swap in 0 1; do echo "== 16-row kernels, swap $swap"; timeout 60 python \
        benchmarks/quant_bench.py --only kernels --rows 16 --gemm-swap $swap 2>&1 \
        | grep -v Warning | grep -E "kind=(gptq|awq)|check"; done
      echo "== quant engine"; quant_engine 190 --formats bf16 gptq nf4 --batches 1 16 \
        --no-offline ;;
    s6c)
      # sixth session, third call: the MoE kernels with PDL (GPU tests; layer and
      # Qwen3-30B-A3B batch-1 decode), the decode profile without PDL, MoE vs 8B offline
      echo "== moe tests"; timeout 80 python -m pytest -q -p no:cacheprovider -x \
        tests/kernels/test_fused_moe.py 2>&1 | tail -2
      echo "== moe decode"; timeout 110 python benchmarks/moe_bench.py --only layer decode \
        --tokens 1 --out "$OUT_DIR" 2>&1 | grep -v Warning | grep "bench=" | tail -4
      echo "== moe decode profile, PDL off"; PAGEDLLM_PDL=0 timeout 140 python \
        benchmarks/profile_decode.py --graphs --model benchmarks/configs/qwen3-30b-a3b \
        --tokens 32 --rows 30 2>&1 | grep -v Warning | tail -36
      echo "== moe offline"; timeout 230 python benchmarks/moe_bench.py --only offline \
        --out "$OUT_DIR" 2>&1 | grep -v Warning | grep "bench=" | tail -3 ;;
    s5e)
      # the per-tensor fp8 quantizer over many programs: its GPU tests, fp8 vs bf16 decode at
      # batch 1 and 16 and offline 1000 x 256/256; serve start-up with cuInit in a thread
      echo "== fp8 tests"; timeout 90 python -m pytest -q -p no:cacheprovider \
        tests/kernels/test_fp8_scaled_mm.py tests/kernels/test_fp8_gemv.py 2>&1 | tail -2
      echo "== fp8 engine"; quant_engine 250 --formats bf16 fp8 --batches 1 16
      use_serve_wheels
      startup_split 70 ;;
    s5d)
      # fp8 W8A8 vs bf16 offline 1000 x 256/256 and batch-1 decode (issue 22: >= 1.4x offline)
      echo "== fp8 offline"; quant_engine 250 --formats bf16 fp8 --batches 1 ;;
    s5a)
      # fifth session's one call (machine starts kept failing): bf16 / GPTQ / fp8 decode at
      # batch 1 and 16 (the fp8 batch-1 GEMV's first timing), the W4A16 probe, serve
      # start-up, the Qwen3-30B-A3B decode profile
      echo "== quant engine"; quant_engine 170 --formats bf16 gptq fp8 --batches 1 16 \
        --no-offline
      echo "== wna16 probe"; timeout 150 python benchmarks/wna16_probe.py --out "$OUT_DIR" \
        2>&1 | grep -v Warning | tail -60
      use_serve_wheels
      startup_split 70
      echo "== moe decode profile"; timeout 180 python benchmarks/profile_decode.py --graphs \
        --model benchmarks/configs/qwen3-30b-a3b --tokens 32 --rows 40 2>&1 \
        | grep -v Warning | tail -60 ;;
    probe11)
      # fifth session: why the W4A16 GEMV reads int4 at 0.8-1.5 TB/s (load-only bounds of
      # both layouts, prefetch), and where Qwen3-30B-A3B decode spends its time now
      echo "== wna16 probe"; timeout 240 python benchmarks/wna16_probe.py --out "$OUT_DIR" \
        2>&1 | grep -v Warning | tail -60
      echo "== moe decode profile"; timeout 260 python benchmarks/profile_decode.py --graphs \
        --model benchmarks/configs/qwen3-30b-a3b --tokens 32 --rows 40 2>&1 \
        | grep -v Warning | tail -60 ;;
    probe10)
      # fourth session, last call (little device time left): only the GPU cases of the
      # fp8 batch-1 GEMV, the MLA decode kernel and DeepSeek with CUDA graphs, GPTQ desc_act
      echo "== gpu tests"; timeout 210 python -m pytest -q -p no:cacheprovider -rf \
        --tb=line tests/kernels/test_fp8_gemv.py tests/kernels/test_triton_mla.py \
        tests/models/test_deepseek_models.py \
        tests/kernels/test_wna16.py::test_cuda_engine_greedy_equals_cpu -k "llama_shapes \
        or apply or tiny_model_cuda or cuda_greedy or 16-16-dtype0 or 16-128-dtype0 \
        or cuda_engine_greedy_equals_cpu" 2>&1 | grep -v Warning | tail -14 ;;
    enginetests21)
      # the GPU engine tests of the issue-21 changes (one step loop, LoRA and pipeline sends
      # in the forward context), every file to the end
      use_serve_wheels
      timeout 330 python -m pytest -q -p no:cacheprovider --tb=short \
        tests/e2e/test_step_loop.py tests/e2e/test_spec_decode.py tests/e2e/test_async_output.py \
        tests/unit/test_forward_context_lora.py tests/e2e/test_multi_step.py \
        tests/e2e/test_prompt_adapters.py 2>&1 | grep -v Warning | tail -40 ;;
    kerneltests)
      python -m pytest -q -p no:cacheprovider tests/kernels/test_fused_moe.py \
        tests/kernels/test_wna16.py tests/kernels/test_fp8_scaled_mm.py 2>&1 \
        | tee -a "$OUT_DIR/kernel_tests.txt" | tail -15 ;;
    quant)  # kernels + decode b1/16/64 of bf16, GPTQ, AWQ, fp8 (~7 min)
      python benchmarks/quant_bench.py --no-offline --out "$OUT_DIR" 2>&1 | grep -v Warning \
        | tee -a "$OUT_DIR/quant_bench.txt" ;;
    quantoffline)  # fp8 vs bf16, 1000 x 256/256 (and batch 1 again; ~4 min)
      python benchmarks/quant_bench.py --only engine --formats bf16 fp8 --batches 1 \
        --out "$OUT_DIR" 2>&1 | grep -v Warning | tee -a "$OUT_DIR/quant_bench.txt" ;;
    quanttune)
      python benchmarks/quant_bench.py --only kernels --tune --out "$OUT_DIR" 2>&1 \
        | grep -v Warning | tee -a "$OUT_DIR/quant_tune.txt" ;;
    moe)  # the MoE layer alone, Qwen3-30B-A3B batch-1 decode vs roofline (~4 min)
      python benchmarks/moe_bench.py --out "$OUT_DIR" 2>&1 | grep -v Warning \
        | tee -a "$OUT_DIR/moe_bench.txt" ;;
    moeoffline)  # Qwen3-30B-A3B vs Llama-3-8B shape, 1000 x 256/256 (~5 min)
      python benchmarks/moe_bench.py --only offline --out "$OUT_DIR" 2>&1 | grep -v Warning \
        | tee -a "$OUT_DIR/moe_bench.txt" ;;
    moetune)
      python benchmarks/moe_bench.py --only layer --tune --out "$OUT_DIR" 2>&1 \
        | grep -v Warning | tee -a "$OUT_DIR/moe_tune.txt" ;;
    smoke)  # every script of the quant / moe modes on tiny shapes (minutes on CPU)
      python benchmarks/moe_bench.py --smoke --tune --offline --out "$OUT_DIR" 2>&1 | tail -3
      python benchmarks/quant_bench.py --smoke --tune --out "$OUT_DIR" 2>&1 | tail -3 ;;
    bench2)
      python benchmarks/gpu_workloads.py --only throughput nano 2>&1 | grep -v Warning \
        | tee -a "$OUT_DIR/gpu_workloads.txt" ;;
  esac
done
