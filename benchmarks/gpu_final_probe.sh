export PYTHONPATH=$PWD PAGEDLLM_TEST_MODELS=/tmp/pagedllm-test-models OUT_DIR=${OUT:-/tmp}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-serve .whl-serve/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site-serve"
nvidia-smi --query-gpu=name --format=csv,noheader
echo "== kernel tests"; timeout 120 python -m pytest -q -p no:cacheprovider tests/kernels/test_fused_moe.py tests/kernels/test_wna16.py tests/kernels/test_fp8_scaled_mm.py tests/kernels/test_triton_attention.py 2>&1 | tail -6
echo "== serve"; PYTHONUNBUFFERED=1 timeout 190 python benchmarks/serving.py --model benchmarks/configs/llama-3-8b --num-prompts 1000 --input-len 256 --output-len 256 --range-ratio 0 --compare-offline --client-processes 4 --timeline "$OUT_DIR/timeline" --engine-flags --max-model-len 4096 > "$OUT_DIR/serve.txt" 2>&1; grep -E "over_offline|wall_s|tail_s|front_lag|full_batch|tpot|ttft|median" "$OUT_DIR/serve.txt" | head -40
echo "== quant b1"; timeout 130 python benchmarks/quant_bench.py --only engine --formats bf16 gptq awq --batches 1 --no-offline --out "$OUT_DIR" 2>&1 | grep -v Warning | tail -12
echo "== moe layer"; timeout 80 python benchmarks/moe_bench.py --only layer --out "$OUT_DIR" 2>&1 | grep -v Warning | tail -12
