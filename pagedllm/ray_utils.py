"""Connecting to Ray, shared by the Ray executor and the Ray tokenizer pool."""
from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 128 << 20  # small messages travel inline; the store holds almost nothing


def connect_ray(min_cpus: int = 1) -> None:
    """Join the running Ray cluster (``ray.init`` already called in this process, or
    ``RAY_ADDRESS`` set), else start a local one: dashboard off, a small object store and at
    least ``min_cpus`` logical CPUs. A cluster started here lives until the process exits."""
    import ray
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address)
        return
    ray.init(num_cpus=max(os.cpu_count() or 1, min_cpus), include_dashboard=False,
             object_store_memory=OBJECT_STORE_BYTES)
