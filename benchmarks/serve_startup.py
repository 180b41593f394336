"""Start-up of ``pagedllm serve`` to a healthy /health, and where the seconds go (issue 19).
The command is ``python -m pagedllm serve`` (what the ``pagedllm`` script runs): it starts
the engine core process before its own imports.

Starts the server ``--repeat`` times with the same flags (the first start pays the cold
caches: Triton kernel compiles, the page cache of the Python packages), then prints each
start's seconds to /health and the log lines that split it: the process start and imports
(time to the first log line), weights, memory profile, CUDA graphs, the core ready, the
front end ready.

    python benchmarks/serve_startup.py --model benchmarks/configs/llama-3-8b --repeat 2 \
        -- --load-format dummy --skip-tokenizer-init --max-model-len 4096
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

_MARKERS = ("start-up:", "ready in", "CUDA graphs", "captured",
            "weights ", "serving ")


def one_start(model: str, flags: list[str]) -> dict:
    from tests.utils.server import RemoteServer
    start = time.perf_counter()
    server = RemoteServer(model, ["--uvicorn-log-level", "warning", *flags],
                          startup_timeout=900, entry=("-m", "pagedllm", "serve"))
    healthy = time.perf_counter() - start
    server.stop()
    lines = [line for line in server.log_path.read_text().splitlines()
             if any(m in line for m in _MARKERS)]
    return {"seconds_to_health": round(healthy, 2), "log": lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="benchmarks/configs/tiny-llama")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="server flags after --")
    args = parser.parse_args()
    flags = [f for f in args.flags if f != "--"]
    for i in range(args.repeat):
        print(json.dumps({"start": i + 1, **one_start(args.model, flags)}, indent=1),
              flush=True)


if __name__ == "__main__":
    main()
