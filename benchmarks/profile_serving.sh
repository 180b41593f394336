#!/usr/bin/env bash
# Where the serving time goes (issue 19): start `pagedllm serve` (engine core in its own
# process) on the 8B shape with dummy weights, send 1000 x 256/256 streaming requests from 4
# load processes, and sample the API-server process, the engine-core process and one load
# process with py-spy for 6 s of the steady state; prints each process's busy share by area.
# Needs py-spy (pip install py-spy). Usage: bash benchmarks/profile_serving.sh [MODEL] [OUTDIR]
set -uo pipefail
MODEL=${1:-benchmarks/configs/llama-3-8b}
OUT_DIR=${2:-${OUT:-/tmp}}
PORT=18321
PYSPY=$(command -v py-spy || echo /tmp/site-serve/bin/py-spy)
python -m pagedllm.entrypoints.openai.api_server --model "$MODEL" --load-format dummy \
  --skip-tokenizer-init --max-model-len 4096 --port $PORT --host 127.0.0.1 \
  --disable-log-requests --uvicorn-log-level warning > "$OUT_DIR/profile_server.log" 2>&1 &
SERVER=$!
for _ in $(seq 300); do
  python -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/health').status_code != 200)" \
    2>/dev/null && break
  sleep 1
done
CORE=$(pgrep -P $SERVER -f spawn_main | head -1)
python benchmarks/serving.py --base-url http://127.0.0.1:$PORT --model "$MODEL" \
  --num-prompts 1000 --input-len 256 --output-len 256 --range-ratio 0 --client-processes 4 \
  > "$OUT_DIR/profile_load.txt" 2>&1 &
LOAD=$!
sleep 12
"$PYSPY" record -r 100 -d 6 --format raw -o "$OUT_DIR/prof_api.txt" -p $SERVER --nonblocking \
  > /dev/null 2>&1 &
"$PYSPY" record -r 100 -d 6 --format raw -o "$OUT_DIR/prof_core.txt" -p "$CORE" --nonblocking \
  > /dev/null 2>&1 &
LOADP=$(pgrep -P $LOAD -f spawn_main | head -1)
"$PYSPY" record -r 100 -d 6 --format raw -o "$OUT_DIR/prof_client.txt" -p "$LOADP" \
  --nonblocking > /dev/null 2>&1
wait $LOAD
kill $SERVER; wait $SERVER 2>/dev/null
grep -E "output_tokens_per_s|tpot|median" "$OUT_DIR/profile_load.txt" | head -4
python - "$OUT_DIR" <<'PY'
import collections, os, sys
AREAS = ["pagedllm/engine/output_processor", "pagedllm/engine/async", "serving_completion",
         "serving_engine", "pydantic", "starlette", "uvicorn", "h11", "httptools", "zmq",
         "pickle", "asyncio", "selectors", "httpx", "httpcore", "model_runner", "sampler",
         "scheduler", "core_client", "engine/core.py", "torch", "triton"]
for name in ("api", "core", "client"):
    path = os.path.join(sys.argv[1], f"prof_{name}.txt")
    if not os.path.exists(path):
        print(name, "no samples"); continue
    total, by = 0, collections.Counter()
    for line in open(path):
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack:
            continue
        total += int(n)
        frames = stack.split(";")
        key = next((a for f in reversed(frames) for a in AREAS if a in f), "other")
        by[key] += int(n)
    print(f"{name}: {total} samples at 100/s over 6 s (busy share {total / 600:.2f})")
    for key, n in by.most_common(8):
        print(f"   {key:34s} {100 * n / max(total, 1):5.1f}%")
PY
