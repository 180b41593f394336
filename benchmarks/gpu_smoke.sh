#!/usr/bin/env bash
# One device call: the CPU test suite's engine paths on CUDA (device auto picks the GPU;
# HF references stay on CPU), then offline throughput on the Llama-3-8B shape in bf16.
# The current GPU path is the plain-PyTorch one (no Triton kernels or CUDA graphs yet).
set -uo pipefail
export PYTHONPATH="$PWD" PAGEDLLM_TEST_MODELS=/tmp/pagedllm-test-models
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python -m pytest -q -p no:cacheprovider -x tests/models tests/e2e/test_engine_features.py \
  tests/sampling tests/unit/test_loader.py 2>&1 | tail -15
python benchmarks/throughput.py --model benchmarks/configs/llama-3-8b --dtype bfloat16 \
  --batch-sizes 1 64 --input-len 128 --output-len 128 --gpu-memory-utilization 0.55 2>&1 \
  | grep -v Warning | tail -5
