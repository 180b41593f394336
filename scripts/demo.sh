#!/usr/bin/env bash
# Install, then serve the bundled demo model (pagedllm/demo_model) with the OpenAI-compatible
# server on port 8000. Extra arguments go to `pagedllm serve` (e.g. --port 8080).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
.venv/bin/pip install -q -e ".[serve]"
cat <<'MSG'
Serving pagedllm/demo_model. Try, from another terminal:
  curl http://localhost:8000/v1/completions -H "Content-Type: application/json" \
    -d '{"model": "pagedllm/demo_model", "prompt": "The for statement", "max_tokens": 48}'
MSG
exec .venv/bin/pagedllm serve pagedllm/demo_model "$@"
