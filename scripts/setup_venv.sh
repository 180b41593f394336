#!/usr/bin/env bash
# Create ./.venv (if missing) and install pagedllm with its test dependencies (and ray) into it.
# torch: an already importable torch is kept; otherwise torch 2.13.0 is installed first
# (on CPU-only machines pip may take a CPU build that lies on disk), then the package.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "torch==2.13.0" || .venv/bin/pip install -q "torch>=2.4,<2.15"
fi
# test + ray (the Ray executor's tests; ray without extras, ~80 MB)
.venv/bin/pip install -q -e ".[test,ray]"
# the static guards of scripts/lint.sh (rule sets in pyproject.toml; pinned to a minor version
# so a new release's rules cannot fail CI on unchanged code)
.venv/bin/pip install -q "ruff>=0.17,<0.18" "mypy>=2.4,<2.5"
# Structured output backends (the `guided` extra): xgrammar runs on CPU without triton, which
# its metadata would pull, so it comes without deps plus its one real dependency.
if ! .venv/bin/python -c "import xgrammar" 2>/dev/null; then
  .venv/bin/pip install -q --no-deps "xgrammar==0.2.8"
  .venv/bin/pip install -q "apache-tvm-ffi>=0.1.11"
fi
.venv/bin/python -c "import outlines_core" 2>/dev/null || \
  .venv/bin/pip install -q "outlines_core>=0.2.14,<0.3"
# lm-format-enforcer pulls only interegular (pydantic, pyyaml, packaging are already here).
.venv/bin/python -c "import lmformatenforcer" 2>/dev/null || \
  .venv/bin/pip install -q "lm-format-enforcer>=0.11,<0.12"
# compressed-tensors writes the checkpoints of tests/quant/test_compressed_tensors.py (pure
# Python; the torch already installed satisfies it)
.venv/bin/python -c "import compressed_tensors" 2>/dev/null || \
  .venv/bin/pip install -q "compressed-tensors>=0.20,<0.21"
# gguf reads .gguf files (--load-format gguf) and writes the files of tests/quant/test_gguf.py
.venv/bin/python -c "import gguf" 2>/dev/null || .venv/bin/pip install -q "gguf>=0.10"
# bitsandbytes quantizes at load (--quantization bitsandbytes --load-format bitsandbytes) and
# writes the checkpoints of tests/quant/test_bitsandbytes.py (its CPU backend runs here)
.venv/bin/python -c "import bitsandbytes" 2>/dev/null || .venv/bin/pip install -q "bitsandbytes>=0.45"
# Triton for the kernel tests under the interpreter on CPU (tests/kernels: attention, fused ops,
# fused MoE, W4A16, fp8 quantization; ~4 minutes on two cores): opt-in here, the wheel is
# large; .ci/run opts in. 3.6.0 is the GPU
# image's version (Triton 3.9's interpreter fails tests/kernels/test_triton_attention.py).
if [ "${PAGEDLLM_KERNEL_TESTS:-0}" = "1" ] && ! .venv/bin/python -c "import triton" 2>/dev/null; then
  .venv/bin/pip install -q "triton==3.6.0"
fi
