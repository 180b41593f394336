"""An on-disk cache of Hugging Face configs as plain data (`plain_config.PlainConfig`).

Building a config through transformers imports most of transformers (5.17: its package, the
config class's module and, through ``auto_docstring``, the model classes and the generation
code): 3.6 s on a 2-core CPU and 9.6 s on the H100 machine of the seventh session, on the
critical path of ``pagedllm serve``'s start-up. The snapshot is a pure function of the
``config.json`` bytes, the revision arguments and the transformers version, so it is kept
under that key; the next start with the same model reads it back without importing
transformers. Configs with their own code (``auto_map``) are never cached.

Where: ``$PAGEDLLM_CACHE_ROOT/configs`` (default ``$XDG_CACHE_HOME/pagedllm``, else
``~/.cache/pagedllm``); ``PAGEDLLM_CONFIG_CACHE=0`` turns it off. A cache that cannot be
written or read is skipped (a debug log line): it only ever saves time. The files are
pickles read with an unpickler that builds nothing but `PlainConfig`, plain containers and
torch dtypes.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pagedllm.models.plain_config import PlainConfig

logger = logging.getLogger(__name__)

_FORMAT = "1"  # bump when PlainConfig's pickled form or the snapshot's rules change


_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def cache_dir() -> Path | None:
    setting = os.environ.get("PAGEDLLM_CONFIG_CACHE", "1").strip().lower()
    if setting in _OFF:
        return None
    if setting not in _ON:
        raise ValueError(f"PAGEDLLM_CONFIG_CACHE={setting!r}: choose from "
                         f"{', '.join(_ON + _OFF)}")
    root = os.environ.get("PAGEDLLM_CACHE_ROOT")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                               ".cache")
        root = os.path.join(xdg, "pagedllm")
    return Path(root) / "configs"


def cache_key(config_bytes: bytes, revision: str | None, code_revision: str | None) -> str:
    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        version = "none"
    digest = hashlib.sha256()
    for part in (_FORMAT, version, revision or "", code_revision or ""):
        digest.update(part.encode() + b"\0")
    digest.update(config_bytes)
    return digest.hexdigest()


_ALLOWED = {("pagedllm.models.plain_config", "PlainConfig"), ("builtins", "set"),
            ("builtins", "frozenset"), ("builtins", "complex")}


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == "torch" and
                                          isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a config cache")


def load(key: str) -> PlainConfig | None:
    folder = cache_dir()
    if folder is None:
        return None
    path = folder / f"{key}.pkl"
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        config = _PlainUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001 - a damaged entry: rebuilt and rewritten
        logger.debug("config cache: %s unreadable (%s); rebuilding it", path, exc)
        return None
    return config if isinstance(config, PlainConfig) else None


def store(key: str, config: PlainConfig) -> None:
    folder = cache_dir()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as f:
            f.write(pickle.dumps(config, protocol=5))
        os.replace(f.name, folder / f"{key}.pkl")  # atomic: a reader sees all or nothing
    except OSError as exc:
        logger.debug("config cache: not written to %s (%s)", folder, exc)
