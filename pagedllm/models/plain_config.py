"""A Hugging Face config as plain data, for the engine-core process (``pagedllm serve``).

Unpickling a transformers config imports its class's module, and in transformers 5.17 that
module's ``auto_docstring`` imports the model classes and the generation code: 4.5 s of the
core process's 7.2 s before its configuration on the H100 machine (docs/benchmarks.md, sixth
part). The engine only reads a config's attributes, so the front end sends the core a
`PlainConfig` instead: every instance attribute, the class's plain attributes (``model_type``,
``attribute_map``, ...) and the values of its properties (``num_labels``, ...), all read once
in the front end; names that only read another attribute (attribute-map aliases such as
``num_experts`` -> ``num_local_experts``, transformers 5's ``rope_scaling`` ->
``rope_parameters``) stay aliases. Nested configs (``text_config``, ...) become `PlainConfig`
too. A value that is not plain data (a class, a callable) is left out and named in
``dropped``: reading it raises an AttributeError that says so.

`hf_config.load_hf_config` (and the GGUF loader) return this snapshot, so an `EngineConfig`
pickles without transformers classes and the core never imports transformers for it
(checked by tests/unit/test_plain_config.py).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import sys
import warnings
from typing import Any

import torch

_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype)


class PlainConfig:
    """Attribute access over a snapshot of a transformers ``PretrainedConfig``."""

    def __init__(self, class_name: str, values: dict[str, Any], dropped: tuple[str, ...],
                 aliases: dict[str, str] | None = None):
        self.__dict__.update(values)
        self.__dict__["_plain_class_name"] = class_name
        self.__dict__["_plain_dropped"] = dropped
        self.__dict__["_plain_aliases"] = dict(aliases or {})

    def __getattr__(self, name: str) -> Any:  # only called for names that are not set
        target = self.__dict__.get("_plain_aliases", {}).get(name)
        if target is not None:
            return getattr(self, target)
        if name in self.__dict__.get("_plain_dropped", ()):
            raise AttributeError(f"{self._plain_class_name}.{name} is not plain data and was "
                                 "not carried to the engine-core process")
        raise AttributeError(f"{self.__dict__.get('_plain_class_name', 'config')!r} has no "
                             f"attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__[self._plain_aliases.get(name, name)] = value

    def __repr__(self) -> str:
        keys = sorted(k for k in self.__dict__ if not k.startswith("_"))
        return f"PlainConfig({self._plain_class_name}: {', '.join(keys)})"

    def values(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_plain_")}

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.to_dict() if isinstance(v, PlainConfig) else v)
                for k, v in self.values().items()}

    def get_text_config(self, decoder: bool = False) -> "PlainConfig":
        """transformers' rule: the nested text (or decoder) config where there is one."""
        for name in (("decoder", "generator", "text_config") if decoder else
                     ("text_config", "decoder", "generator")):
            sub = self.__dict__.get(name)
            if isinstance(sub, PlainConfig):
                return sub
        return self


def _is_hf_config(obj: Any) -> bool:
    module = sys.modules.get("transformers.configuration_utils")
    return module is not None and isinstance(obj, module.PretrainedConfig)


def _plain(value: Any) -> tuple[bool, Any]:
    """(True, a plain copy) or (False, None) when ``value`` holds anything else."""
    if isinstance(value, _PLAIN_SCALARS):
        return True, value
    if _is_hf_config(value):
        return True, to_plain(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(v) for v in value]
        if all(ok for ok, _ in items):
            return True, type(value)(v for _, v in items)
        return False, None
    if isinstance(value, dict):
        pairs = [(_plain(k), _plain(v)) for k, v in value.items()]
        if all(k[0] and v[0] for k, v in pairs):
            return True, {k[1]: v[1] for k, v in pairs}
    return False, None


def _class_names(cls: type) -> list[str]:
    """The properties and plain (non-callable) attributes the class and its bases define."""
    names: dict[str, None] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if name.startswith("__"):
                continue
            if isinstance(value, property) or not (
                    callable(value) or isinstance(value, (staticmethod, classmethod))):
                names[name] = None
    return list(names)


def to_plain(config: Any) -> PlainConfig:
    """The snapshot of a transformers config (see the module doc). Names that read another
    attribute (``attribute_map`` aliases; a property returning an attribute's own dict or
    list, as transformers 5's ``rope_scaling`` returns ``rope_parameters``) stay aliases, so
    that a later override of the attribute shows through them."""
    own = dict(vars(config))
    aliases = {name: target for name, target in (getattr(config, "attribute_map", {})
                                                 or {}).items() if target in own}
    values: dict[str, Any] = {}
    dropped: list[str] = []
    names = dict.fromkeys(_class_names(type(config)))
    names.update(dict.fromkeys(own))
    with _quiet():  # deprecated aliases (torch_dtype, use_return_dict) warn when read
        for name in names:
            if name in aliases:
                continue
            try:
                value = getattr(config, name)
            except Exception:  # noqa: BLE001 - a property that does not apply to this config
                continue
            if inspect.ismethod(value):
                continue
            if name not in own and isinstance(value, (dict, list)):
                same = [key for key, held in own.items() if held is value]
                if same:
                    aliases[name] = same[0]
                    continue
            ok, copy = _plain(value)
            if ok:
                values[name] = copy
            else:
                dropped.append(name)
    return PlainConfig(type(config).__name__, values, tuple(dropped), aliases)


@contextlib.contextmanager
def _quiet():
    log = logging.getLogger("transformers")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)
