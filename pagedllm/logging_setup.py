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
