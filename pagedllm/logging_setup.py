"""The ``pagedllm`` logger's one console handler, for processes that serve (the API server
and the engine-core process it starts); library users keep their own logging setup."""
from __future__ import annotations

import logging


def configure_logging() -> None:
    root = logging.getLogger("pagedllm")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: "
                                               "%(message)s", "%m-%d %H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), for start-up log lines: what the
    interpreter and the imports took before the first timer; None elsewhere."""
    import os
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
