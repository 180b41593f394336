#!/usr/bin/env bash
# Install, then run the bundled demo model (pagedllm/demo_model) offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
exec .venv/bin/pagedllm generate --prompt "The for statement" --prompt "A class definition" \
  --max-tokens 48 "$@"
