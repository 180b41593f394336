"""The environment variables of vLLM 0.6.3 that pagedllm reads, and what it does with each.

A vLLM deployment carries its ``VLLM_*`` variables over; every one that changes vLLM's server
behaviour is either honoured, refused at start-up (the feature is not built, so running
without it would silently serve something else), or named in a start-up warning (a knob of
vLLM's own kernels, executors or logging that pagedllm does not have). None is ignored
silently. ``PAGEDLLM_<NAME>`` is accepted for every ``VLLM_<NAME>`` below and wins over it.

Only names are logged, never values (``VLLM_API_KEY`` is a secret).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Optional

logger = logging.getLogger("pagedllm.envs")

PREFIXES = ("PAGEDLLM_", "VLLM_")

HONOURED = "honoured"
REFUSED = "refused"        # start-up fails when set (to a true value, for flags)
IGNORED = "ignored"        # start-up warns: vLLM's knob has no pagedllm counterpart
NO_EFFECT = "no effect"    # vLLM behaviour pagedllm never has (usage stats, multimodal fetches)


@dataclass(frozen=True)
class EnvVar:
    name: str               # without the prefix
    action: str             # HONOURED, REFUSED, IGNORED or NO_EFFECT
    meaning: str            # what it does in vLLM 0.6.3 (and in pagedllm, when honoured)
    flag: bool = False      # a 1/true switch: refused only when true

    def refused(self, value: str) -> bool:
        return self.action == REFUSED and (is_true(value) if self.flag else bool(value))


def _vars(action: str, entries: dict[str, str], flag: bool = False) -> dict[str, EnvVar]:
    return {name: EnvVar(name, action, meaning, flag) for name, meaning in entries.items()}


VARIABLES: dict[str, EnvVar] = {
    **_vars(HONOURED, {
        "API_KEY": "API key the /v1 routes require (wins over --api-key, as in vLLM)",
        "ALLOW_LONG_MAX_MODEL_LEN": "1/true: allow --max-model-len above the model's "
                                    "context length (a warning instead of an error)",
        "KEEP_ALIVE_ON_ENGINE_DEATH": "1/true: the server keeps running (/health 500) "
                                      "after the engine died, instead of exiting non-zero",
        "ALLOW_RUNTIME_LORA_UPDATING": "1/true: /v1/load_lora_adapter and "
                                       "/v1/unload_lora_adapter add and remove LoRA adapters",
        "TORCH_PROFILER_DIR": "a directory: /start_profile and /stop_profile write torch "
                              "profiler traces of the engine core there",
    }),
    **_vars(REFUSED, {
        "USE_MODELSCOPE": "download models from ModelScope instead of Hugging Face",
    }, flag=True),
    **_vars(REFUSED, {
        "PLUGINS": "load vLLM plugins (entry points) at start-up",
    }),
    **_vars(IGNORED, {
        "ENGINE_ITERATION_TIMEOUT_S": "engine step timeout", "RPC_TIMEOUT": "front end to "
        "engine RPC timeout", "CONFIGURE_LOGGING": "vLLM's logging setup",
        "LOGGING_CONFIG_PATH": "a "
        "logging config file", "LOGGING_LEVEL": "vLLM's log level", "TRACE_FUNCTION":
        "function-call tracing", "ATTENTION_BACKEND": "attention kernel choice",
        "USE_TRITON_FLASH_ATTN": "attention kernel choice", "USE_FLASHINFER_SAMPLER":
        "sampler kernel choice", "USE_TRITON_AWQ": "AWQ kernel choice",
        "FUSED_MOE_CHUNK_SIZE": "MoE kernel chunking", "TORCH_COMPILE_LEVEL": "torch.compile",
        "PP_LAYER_PARTITION": "pipeline-parallel layer split", "WORKER_MULTIPROC_METHOD":
        "worker start method", "USE_RAY_SPMD_WORKER": "ray executor mode",
        "USE_RAY_COMPILED_DAG": "ray executor mode", "USE_RAY_COMPILED_DAG_NCCL_CHANNEL":
        "ray executor mode", "NCCL_SO_PATH": "NCCL library path", "SKIP_P2P_CHECK":
        "GPU peer-to-peer check", "CPU_KVCACHE_SPACE": "CPU backend KV-cache size",
        "CPU_OMP_THREADS_BIND": "CPU backend thread binding", "OPENVINO_DEVICE": "OpenVINO "
        "backend", "OPENVINO_KVCACHE_SPACE": "OpenVINO backend",
        "OPENVINO_CPU_KV_CACHE_PRECISION": "OpenVINO backend",
        "OPENVINO_ENABLE_QUANTIZED_WEIGHTS": "OpenVINO backend", "XLA_CACHE_PATH": "TPU "
        "backend", "ALLOW_DEPRECATED_BLOCK_MANAGER_V1": "vLLM's old block manager",
        "TEST_FORCE_FP8_MARLIN": "test switch", "TEST_FORCE_LOAD_FORMAT": "test switch",
        "TEST_DYNAMO_FULLGRAPH_CAPTURE": "test switch",
    }),
    **_vars(NO_EFFECT, {
        "NO_USAGE_STATS": "usage stats (pagedllm sends none)", "DO_NOT_TRACK": "usage stats "
        "(pagedllm sends none)", "USAGE_STATS_SERVER": "usage stats (pagedllm sends none)",
        "USAGE_SOURCE": "usage stats (pagedllm sends none)", "INSTANCE_ID": "instance id "
        "in usage stats", "RINGBUFFER_WARNING_INTERVAL": "shm broadcast warnings",
        "NO_DEPRECATION_WARNING": "deprecation warnings", "IMAGE_FETCH_TIMEOUT":
        "multimodal fetches", "AUDIO_FETCH_TIMEOUT": "multimodal fetches", "ASSETS_CACHE":
        "multimodal assets", "CACHE_ROOT": "vLLM's cache directory", "CONFIG_ROOT": "vLLM's "
        "config directory", "TARGET_DEVICE": "build time only", "USE_PRECOMPILED":
        "build time only",
    }),
}


def is_true(value: Optional[str]) -> bool:
    """vLLM's reading of a switch: "1" or "true", any case, surrounding spaces ignored."""
    return value is not None and value.strip().lower() in ("1", "true")


def lookup(name: str, environ: Optional[Mapping[str, str]] = None
           ) -> Optional[tuple[str, str]]:
    """``(spelling, value)`` of ``PAGEDLLM_<name>`` or else ``VLLM_<name>``; None if unset."""
    environ = os.environ if environ is None else environ
    for prefix in PREFIXES:
        if prefix + name in environ:
            return prefix + name, environ[prefix + name]
    return None


def api_key(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    found = lookup("API_KEY", environ)
    return found[1] if found and found[1] else None


def allow_long_max_model_len(environ: Optional[Mapping[str, str]] = None) -> bool:
    found = lookup("ALLOW_LONG_MAX_MODEL_LEN", environ)
    return found is not None and is_true(found[1])


def keep_alive_on_engine_death(environ: Optional[Mapping[str, str]] = None) -> bool:
    found = lookup("KEEP_ALIVE_ON_ENGINE_DEATH", environ)
    return found is not None and is_true(found[1])


def allow_runtime_lora_updating(environ: Optional[Mapping[str, str]] = None) -> bool:
    """vLLM 0.6.3 reads it as a switch: the LoRA load/unload routes exist only when true."""
    found = lookup("ALLOW_RUNTIME_LORA_UPDATING", environ)
    return found is not None and is_true(found[1])


def torch_profiler_dir(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The trace directory, absolute and with ``~`` expanded (vLLM 0.6.3:
    ``os.path.expanduser(os.getenv("VLLM_TORCH_PROFILER_DIR", "."))`` when set); None when
    unset or empty, which leaves the profiler routes out."""
    found = lookup("TORCH_PROFILER_DIR", environ)
    if found is None or not found[1]:
        return None
    return os.path.abspath(os.path.expanduser(found[1]))


@dataclass(frozen=True)
class Finding:
    spelling: str      # the variable as set, e.g. VLLM_API_KEY or PAGEDLLM_API_KEY
    var: Optional[EnvVar]  # None: a VLLM_* name vLLM 0.6.3 does not have
    value: str


def read_environment(environ: Optional[Mapping[str, str]] = None) -> list[Finding]:
    """Every set variable of the table (either spelling) and every unknown ``VLLM_*``."""
    environ = os.environ if environ is None else environ
    findings = []
    for name, var in VARIABLES.items():
        found = lookup(name, environ)
        if found is not None:
            findings.append(Finding(found[0], var, found[1]))
    known = {"VLLM_" + name for name in VARIABLES}
    findings += [Finding(key, None, value) for key, value in sorted(environ.items())
                 if key.startswith("VLLM_") and key not in known]
    return findings


def check_server_environment(environ: Optional[Mapping[str, str]] = None) -> list[Finding]:
    """Raise ``ValueError`` naming every refused variable that is set; else the findings."""
    findings = read_environment(environ)
    refused = [f for f in findings if f.var is not None and f.var.refused(f.value)]
    if refused:
        raise ValueError("; ".join(
            f"{f.spelling} is set, but pagedllm does not support it yet ({f.var.meaning}); "
            f"unset it" for f in refused))
    return findings


_logged: set[tuple[str, str]] = set()


def log_environment(findings: list[Finding]) -> None:
    """At start-up: which variables were read and what each does here (names only), once
    per process however many times the server config is built."""
    for f in findings:
        if f.var is None:
            level, text = logging.WARNING, (f"{f.spelling} is set but is not a vLLM 0.6.3 "
                                            "variable; ignored")
        elif f.var.action == REFUSED:  # set, but off (refused ones stop start-up earlier)
            level, text = logging.INFO, f"read {f.spelling}: off ({f.var.meaning})"
        elif f.var.action == IGNORED:
            level, text = logging.WARNING, (f"{f.spelling} is set, but pagedllm has no "
                                            f"counterpart ({f.var.meaning}); ignored")
        else:
            level, text = logging.INFO, f"read {f.spelling}: {f.var.action} ({f.var.meaning})"
        if (f.spelling, text) not in _logged:
            _logged.add((f.spelling, text))
            logger.log(level, "%s", text)
