#!/usr/bin/env bash
# One device call for the GPU backend: kernel tests (compiled, vs the torch reference), the
# engine tests on CUDA (Triton backend, CUDA graphs; HF references on CPU), the kernel
# benchmark, then offline throughput on the Llama-3-8B shape in bf16. Prints a short summary.
set -uo pipefail
export PYTHONPATH="$PWD" PAGEDLLM_TEST_MODELS=/tmp/pagedllm-test-models
OUT_DIR=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
echo "== kernel tests"; python -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tail -4
echo "== engine tests on CUDA"
python -m pytest -q -p no:cacheprovider tests/models tests/e2e/test_engine_features.py \
  tests/unit/test_loader.py 2>&1 | tail -8
echo "== kernel benchmark"; python benchmarks/gpu_kernels.py > "$OUT_DIR/gpu_kernels.txt" 2>&1
tail -25 "$OUT_DIR/gpu_kernels.txt"
echo "== throughput"
python benchmarks/throughput.py --model benchmarks/configs/llama-3-8b --dtype bfloat16 \
  --batch-sizes 1 64 --input-len 128 --output-len 128 --gpu-memory-utilization 0.55 2>&1 \
  | grep -v Warning | tail -4
