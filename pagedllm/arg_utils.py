"""`EngineArgs`, its argparse parser and the README flag table, generated from `pagedllm.config`.

Nothing here declares an option: `EngineArgs` is made with `dataclasses.make_dataclass` from the
option fields of every config class, `add_config_args` turns field metadata into argparse
arguments, and `flags_markdown_table` renders the same metadata for the README.

`EngineArgs.create_engine_config()` is the one place where values are checked and derived:

1. generic checks of every option (choices, ranges, "not supported yet" statuses);
2. deprecated aliases warn once and map to their replacement;
3. the device is resolved (auto -> cuda if usable, else cpu);
4. the model is resolved (`pagedllm.models.resolve`): model and tokenizer to local
   directories, the HF config loaded, RoPE overrides applied, dtype and context length derived;
5. the scheduler budget is derived; then the frozen configs are built.
"""

import argparse
import dataclasses
import difflib
import inspect
import json
import logging
import re
import types
import typing
from typing import TYPE_CHECKING, Any, Optional, Self

from pagedllm.models.resolve import ResolvedModel, resolve_model
from pagedllm.tracing import check_tracing_flags
from pagedllm.config import (ENGINE_CONFIG_CLASSES, EngineConfig, LoRAConfig, ModelConfig,
                             cuda_backend_available, check_options, engine_option_fields,
                             field_default, flag_name, is_default, option_fields, status_text)

logger = logging.getLogger(__name__)

_GIVEN_KEY = "_pagedllm_deprecated_given"  # namespace attribute: deprecated flags seen on the CLI


# ---- CLI value parsers -------------------------------------------------------------------------

def parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_json_of(text: str, kind: type, example: str) -> Any:
    """Parse a CLI value as JSON of type ``kind`` (dict or list) or raise a usage error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON {text!r}: {exc}") from exc
    if not isinstance(value, kind):
        raise argparse.ArgumentTypeError(f"expected a JSON {example}, got {text!r}")
    return value


def parse_json(text: str) -> dict:
    return parse_json_of(text, dict, "object")


def parse_kv_int(text: str) -> Optional[dict]:
    """Parse ``image=16,video=2`` into ``{"image": 16, "video": 2}``."""
    if not text:
        return None
    out: dict[str, int] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected KEY=INT items, got {item!r} in {text!r}")
        out[key.strip().lower()] = int(value)
    return out


def parse_nullable(text: str) -> Optional[str]:
    return None if text in ("", "None") else text


_CLI_TYPES = {"json": parse_json, "kv_int": parse_kv_int, "nullable": parse_nullable}


class _DeprecatedFlag(argparse.Action):
    """A store-true flag that also records that it was given, so one warning is printed later."""

    def __init__(self, option_strings, dest, default=None, help=None, **_unused):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        given = set(getattr(namespace, _GIVEN_KEY, ())) | {self.dest}
        setattr(namespace, _GIVEN_KEY, given)


# ---- argparse generation -----------------------------------------------------------------------

def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _default_text(f: dataclasses.Field) -> str:
    default = field_default(f)
    if f.name == "ignore_patterns":
        return "None (= original/**/*)"
    if default is None:
        return "None"
    return repr(default) if isinstance(default, str) else str(default)


def _help_text(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    if "default" not in text.lower():
        text += f" Default: {_default_text(f)}."
    status = status_text(f)
    if status != "works":
        text += f" [{status}]"
    return text.replace("%", "%%")


def _argparse_kwargs(f: dataclasses.Field, tp: Any) -> dict:
    md, default = f.metadata, field_default(f)
    kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": _help_text(f)}
    base = _unwrap_optional(tp)
    if base is bool:
        if md.get("deprecated"):
            kwargs["action"] = _DeprecatedFlag
        elif default is False:
            kwargs["action"] = "store_true"
        else:  # default True or None: `--flag`, `--flag true`, `--flag false`
            kwargs.update(nargs="?", const=True, type=parse_bool, metavar="{true,false}")
        return kwargs
    cli_type = md.get("cli_type", base)
    kwargs["type"] = _CLI_TYPES.get(cli_type, cli_type) if isinstance(cli_type, str) else cli_type
    for key in ("nargs", "action", "metavar"):
        if key in md:
            kwargs[key] = md[key]
    if md.get("choices"):
        choices = tuple(md["choices"])
        kwargs["choices"] = choices + (None,) if md.get("cli_type") == "nullable" else choices
    return kwargs


def add_config_args(parser: argparse.ArgumentParser, config_cls: type,
                    title: Optional[str] = None) -> argparse.ArgumentParser:
    """Add one argparse group with a flag per option field of `config_cls`."""
    doc = (config_cls.__doc__ or "").strip().splitlines()
    group = parser.add_argument_group(title or config_cls.__name__, doc[0] if doc else None)
    hints = typing.get_type_hints(config_cls)
    for f in option_fields(config_cls):
        names = [flag_name(f.name), *f.metadata.get("aliases", ())]
        group.add_argument(*names, **_argparse_kwargs(f, hints[f.name]))
    return parser


# ---- EngineArgs --------------------------------------------------------------------------------

class UnknownArgumentError(TypeError, ValueError):
    """An EngineArgs keyword that is no engine option (a TypeError and a ValueError)."""


class _EngineArgsMethods:
    """Methods of the generated `EngineArgs` dataclass."""

    _deprecated_given: frozenset[str] = frozenset()  # deprecated flags seen on the CLI

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        for name, config_cls in ENGINE_CONFIG_CLASSES.items():
            add_config_args(parser, config_cls, title=f"engine: {name}")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> Self:
        engine_args = cls(**{n: getattr(args, n) for n in _FIELD_NAMES if hasattr(args, n)})
        engine_args._deprecated_given = frozenset(getattr(args, _GIVEN_KEY, ()))
        return engine_args

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELD_NAMES}

    def check_flags(self) -> None:
        """Validate every option without touching the model (cheap; run before slow work)."""
        check_options(self.to_dict())

    def create_engine_config(self) -> EngineConfig:
        """Check every option, resolve the device and the model, derive the scheduler budget,
        run the cross-field checks, then build the frozen configs (steps 1-5 of the module
        doc); nothing here loads a weight."""
        values = self.to_dict()
        check_options(values)
        _apply_deprecations(values, self._deprecated_given)
        values["device"] = _resolve_device(values["device"])
        _check_cpu_offload(values)
        values["ignore_patterns"] = _resolve_ignore_patterns(values["ignore_patterns"])
        model = resolve_model(values)
        values["max_model_len"] = model.max_model_len
        values["max_seq_len_to_capture"] = min(values["max_seq_len_to_capture"],
                                               values["max_model_len"])
        values.update(_resolve_scheduler(values))
        _check_cross_fields(values, model.hf_config)
        return _build_engine_config(values, model)


def _build_engine_config(values: dict[str, Any], model: ResolvedModel) -> EngineConfig:
    """The frozen per-concern configs of the checked values; `ModelConfig` also gets what
    model resolution derived."""
    configs = {}
    for name, config_cls in ENGINE_CONFIG_CLASSES.items():
        kwargs = {f.name: values[f.name] for f in option_fields(config_cls)}
        if config_cls is ModelConfig:
            kwargs.update(model.model_config_fields())
        configs[name] = config_cls(**kwargs)
    return EngineConfig(**configs)


def _engine_args_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    out = []
    for config_cls in ENGINE_CONFIG_CLASSES.values():
        hints = typing.get_type_hints(config_cls)
        for f in option_fields(config_cls):
            if f.default_factory is not dataclasses.MISSING:
                spec = dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
            else:
                spec = dataclasses.field(default=f.default, metadata=f.metadata)
            out.append((f.name, hints[f.name], spec))
    return out


if TYPE_CHECKING:  # the generated fields as a class (scripts/gen_engine_args_stub.py)
    from pagedllm._engine_args import EngineArgs
else:
    EngineArgs = dataclasses.make_dataclass("EngineArgs", _engine_args_fields(),
                                            bases=(_EngineArgsMethods,))
EngineArgs.__module__ = __name__
EngineArgs.__doc__ = ("Every engine option as a keyword argument (generated from the fields of "
                      "pagedllm.config); `create_engine_config()` validates and resolves them.")
_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(EngineArgs))
_generated_init = EngineArgs.__init__


def _engine_args_init(self, *args: Any, **kwargs: Any) -> None:
    unknown = [k for k in kwargs if k not in _FIELD_NAMES]
    if unknown:
        hints = [f"{k!r}" + "".join(f" (did you mean {m!r}?)" for m in
                                    difflib.get_close_matches(k, _FIELD_NAMES, n=1))
                 for k in unknown]
        raise UnknownArgumentError(f"EngineArgs got unknown argument(s): {', '.join(hints)}")
    _generated_init(self, *args, **kwargs)


_engine_args_init.__signature__ = inspect.signature(_generated_init)  # type: ignore[attr-defined]
EngineArgs.__init__ = _engine_args_init  # type: ignore[method-assign]


# ---- derived values ----------------------------------------------------------------------------

def _apply_deprecations(values: dict[str, Any], given: frozenset) -> None:
    """Warn once per deprecated option in use; map aliases onto their replacement."""
    for f in engine_option_fields():
        note = f.metadata.get("deprecated")
        in_use = f.name in given or not is_default(values[f.name], field_default(f))
        if not note or not in_use:
            continue
        logger.warning("%s is deprecated: %s", flag_name(f.name), note)
        target = f.metadata.get("alias_of")
        if target:
            values[target] = values[f.name]


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if cuda_backend_available() else "cpu"
    return device


def _resolve_ignore_patterns(patterns: Any) -> list[str]:
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns) if patterns else ["original/**/*"]


def _resolve_scheduler(v: dict[str, Any]) -> dict[str, Any]:
    """Token budget and defaults of the scheduler (needs the resolved max_model_len, device).

    Chunked prefill defaults to on only on CUDA with contexts over 32K (as vLLM). The default
    budget is 512 with chunked prefill, else max(max_model_len, 2048); it is raised to
    max_num_seqs if that is larger, so an unset budget never fails the check below.
    """
    max_model_len, max_num_seqs = v["max_model_len"], v["max_num_seqs"]
    chunked = v["enable_chunked_prefill"]
    if chunked is None:
        chunked = v["device"] == "cuda" and max_model_len > 32768
    budget = v["max_num_batched_tokens"]
    if budget is None:
        budget = max(512 if chunked else max(max_model_len, 2048), max_num_seqs)
    elif not chunked and budget < max_model_len:
        raise ValueError(
            f"--max-num-batched-tokens {budget} is smaller than --max-model-len {max_model_len}: "
            "a full-length prompt could never be scheduled without chunked prefill; raise "
            "--max-num-batched-tokens, lower --max-model-len, or pass --enable-chunked-prefill")
    if budget < max_num_seqs:
        raise ValueError(f"--max-num-batched-tokens {budget} must be >= --max-num-seqs "
                         f"{max_num_seqs}; raise the first or lower the second")
    return {"enable_chunked_prefill": bool(chunked), "max_num_batched_tokens": budget,
            "preemption_mode": v["preemption_mode"] or "recompute"}


# ---- cross-field checks ------------------------------------------------------------------------

def _check_cpu_offload(v: dict[str, Any]) -> None:
    """--cpu-offload-gb needs the resolved device to be CUDA (checked before the model)."""
    if v["cpu_offload_gb"] and v["device"] != "cuda":
        raise ValueError(f"--cpu-offload-gb {v['cpu_offload_gb']} streams weights from "
                         "CPU memory to a CUDA device; with --device cpu every weight is "
                         "in CPU memory already: drop the flag")


def _check_cross_fields(v: dict[str, Any], hf_config: Any) -> None:
    """Every rule between options (and between options and the architecture), in the order
    their errors are reported, after the model and the scheduler budget are resolved."""
    _check_speculative(v)
    check_tracing_flags(v["otlp_traces_endpoint"], v["collect_detailed_traces"])
    if v["enable_prompt_adapter"] and v["max_prompt_adapter_token"] < 1:
        raise ValueError("--enable-prompt-adapter needs --max-prompt-adapter-token, the most "
                         "virtual tokens of one adapter (e.g. 32)")
    _check_lora(v)
    _check_pooling(v, hf_config)
    _check_model_features(v, hf_config)
    if v["quantization_param_path"] and v["kv_cache_dtype"] == "auto":
        raise ValueError("--quantization-param-path holds fp8 KV-cache scales; it needs "
                         "--kv-cache-dtype fp8, fp8_e4m3 or fp8_e5m2")


def _check_speculative(v: dict[str, Any]) -> None:
    """The speculative flags that only make sense together, and what [ngram] runs with."""
    spec_only = ["num_speculative_tokens", "ngram_prompt_lookup_max", "ngram_prompt_lookup_min",
                 "speculative_max_model_len", "speculative_disable_by_batch_size",
                 "typical_acceptance_sampler_posterior_threshold",
                 "typical_acceptance_sampler_posterior_alpha"]
    if v["speculative_model"] is None:
        given = [n for n in spec_only if v[n] is not None]
        if v["spec_decoding_acceptance_method"] != "rejection_sampler":
            given.append("spec_decoding_acceptance_method")
        if given:
            raise ValueError(f"{flag_name(given[0])} needs --speculative-model [ngram]")
        return
    if v["num_speculative_tokens"] is None or v["ngram_prompt_lookup_max"] is None:
        raise ValueError("--speculative-model [ngram] needs --num-speculative-tokens and "
                         "--ngram-prompt-lookup-max")
    if (v["ngram_prompt_lookup_min"] or 1) > v["ngram_prompt_lookup_max"]:
        raise ValueError(f"--ngram-prompt-lookup-min {v['ngram_prompt_lookup_min']} is larger "
                         f"than --ngram-prompt-lookup-max {v['ngram_prompt_lookup_max']}")
    typical = [n for n in spec_only[-2:] if v[n] is not None]
    if typical and v["spec_decoding_acceptance_method"] != "typical_acceptance_sampler":
        raise ValueError(f"{flag_name(typical[0])} needs --spec-decoding-acceptance-method "
                         "typical_acceptance_sampler")
    for name, value in (("num_scheduler_steps", 1), ("pipeline_parallel_size", 1)):
        if v[name] != value:
            raise ValueError(f"--speculative-model does not combine with {flag_name(name)} "
                             f"{v[name]} yet; use {value}")


def _check_pooling(values: dict[str, Any], hf_config: Any) -> None:
    """Embedding / reward models run prompts only: the generation-side features that need
    sampled tokens, and prefix caching where every prompt row is pooled (a cached block's
    rows are never computed), fail here naming the flag."""
    from pagedllm.models.registry import model_pooler
    pooler = model_pooler(getattr(hf_config, "architectures", None))
    if pooler is None:
        return
    arch = hf_config.architectures[0]
    for flag, key in (("--speculative-model", "speculative_model"),
                      ("--enable-lora", "enable_lora"),
                      ("--enable-prompt-adapter", "enable_prompt_adapter")):
        if values[key]:
            raise ValueError(f"{flag} is not supported with the embedding model {arch} "
                             "(its requests pool the prompt and generate nothing)")
    if values["enable_prefix_caching"] and pooler.keeps_all_rows:
        raise ValueError(f"--enable-prefix-caching is not supported with {arch}: it pools "
                         "every prompt token, and cached blocks' rows are not recomputed")


def _check_model_features(v: dict[str, Any], hf_config: Any) -> None:
    """What the architecture must support for the flags given, checked before any weight is
    loaded (prompt adapters: the model class's ``supports_prompt_adapters``; LoRA: its layers,
    built on the meta device, have every projection LoRA adapts)."""
    if v["enable_prompt_adapter"]:
        from pagedllm.worker.prompt_adapter import check_prompt_adapter_support
        check_prompt_adapter_support(hf_config)
    if v["enable_lora"]:
        from pagedllm.worker.lora import check_lora_architecture
        check_lora_architecture(hf_config, v["max_model_len"])


def _check_lora(values: dict[str, Any]) -> None:
    """--enable-lora's cross-field rules (pagedllm/worker/lora.py)."""
    if not values["enable_lora"]:
        for f in option_fields(LoRAConfig):
            if f.name in ("max_loras", "max_lora_rank", "lora_dtype", "max_cpu_loras") and \
                    values[f.name] != field_default(f):
                raise ValueError(f"{flag_name(f.name)} needs --enable-lora")
        return
    if values["max_cpu_loras"] is not None and values["max_cpu_loras"] < values["max_loras"]:
        raise ValueError(f"--max-cpu-loras ({values['max_cpu_loras']}) must be >= --max-loras "
                         f"({values['max_loras']})")
    for flag, key in (("--tensor-parallel-size", "tensor_parallel_size"),
                      ("--pipeline-parallel-size", "pipeline_parallel_size")):
        if values[key] > 1:
            raise ValueError(f"--enable-lora works with {flag} 1 only for now (got "
                             f"{values[key]})")


# ---- README table ------------------------------------------------------------------------------

def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def flags_markdown_table() -> str:
    """Markdown table of every engine flag: flag, default, status, one-line description."""
    rows = ["| flag | default | status | description |", "|---|---|---|---|"]
    for f in engine_option_fields():
        names = ", ".join(f"`{n}`" for n in (flag_name(f.name), *f.metadata.get("aliases", ())))
        choices = f.metadata.get("choices")
        if choices:
            names += " `{" + ",".join(map(str, choices)) + "}`"
        help_text = f.metadata.get("help", "")
        first = re.split(r"(?<=\.)\s+(?=[A-Z])", help_text)[0]
        rows.append(f"| {_cell(names)} | `{_cell(_default_text(f))}` | {_cell(status_text(f))} "
                    f"| {_cell(first)} |")
    return "\n".join(rows) + "\n"
