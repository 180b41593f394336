"""Engine configuration: one frozen dataclass per concern, plus the `EngineConfig` aggregate.

Every engine option is declared exactly once here, as a dataclass field built with `option()`.
The field's metadata carries everything else that is derived from it:

* ``help``                the one-line (or short) description used by ``--help`` and the README;
* CLI details             ``choices``, ``aliases`` (``-tp``), ``cli_type`` (JSON, ``k=v`` lists),
                          ``nargs`` / ``action``;
* ``valid``               ``(predicate, "what a valid value is")`` for range checks;
* the flag's STATUS       ``supported`` (a tuple of supported values, a predicate, or
                          ``DEFAULT_ONLY``) and ``planned`` (what is missing and where it is
                          tracked);
* ``deprecated``          a deprecation note (the alias maps to its replacement in arg_utils).

`check_options()` applies choices, validity and status generically, so a flag either works or
fails at start-up with a ValueError naming the flag, the value and what is supported instead.
`pagedllm.arg_utils` generates `EngineArgs`, the argparse parser and the README flag table from
the same fields. Derived values (resolved paths, HF config, dtype, context length, token budget)
are computed once in `EngineArgs.create_engine_config`; the configs stay frozen afterwards.
"""

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterator, Mapping, Optional, cast

import torch

from pagedllm.core.spec_propose import SpecSettings
from pagedllm.quant import config as quant_formats
from pagedllm.switches import Switches
from pagedllm.tracing import check_tracing_flags

DEFAULT_ONLY = "default-only"  # `supported` marker: any non-default value is not built yet

QUANTIZATION_METHODS = (
    "aqlm", "awq", "deepspeedfp", "tpu_int8", "fp8", "fbgemm_fp8", "modelopt", "marlin", "gguf",
    "gptq_marlin_24", "gptq_marlin", "awq_marlin", "gptq", "compressed-tensors", "bitsandbytes",
    "qqq", "experts_int8", "neuron_quant",
)
DEVICE_CHOICES = ("auto", "cuda", "neuron", "cpu", "openvino", "tpu", "xpu")


def cuda_backend_available() -> bool:
    """Hook for the GPU backend (issue #5): True once CUDA is present and usable by pagedllm."""
    return torch.cuda.is_available()


def option(default: Any = None, help: str = "", *, factory: Optional[Callable[[], Any]] = None,
           **meta: Any) -> Any:
    """Declare one engine option: default, help text and metadata (see the module docstring)."""
    meta["help"] = help
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def derived(default: Any = None, help: str = "") -> Any:
    """A value computed by `create_engine_config`, never a CLI flag."""
    return field(default=default, repr=False, compare=False,
                 metadata={"derived": True, "help": help})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


POSITIVE = (_positive, "> 0")
NON_NEGATIVE = (_non_negative, ">= 0")


def _device_supported(value: str) -> bool:
    return value in ("auto", "cpu") or (value == "cuda" and cuda_backend_available())


def _tokenizer_mode_supported(value: str) -> bool:
    if value == "mistral":
        return importlib.util.find_spec("mistral_common") is not None
    return value in ("auto", "slow")


@dataclass(frozen=True)
class ModelConfig:
    """Model and tokenizer: what to load and how to interpret it."""
    model: str = option("facebook/opt-125m", "Hugging Face repo id or local directory of the "
                        "model. A repo id is looked up in the HF cache, then downloaded.")
    tokenizer: Optional[str] = option(None, "Repo id or directory of the tokenizer; defaults to "
                                      "the model.")
    skip_tokenizer_init: bool = option(False, "Do not load a tokenizer: prompts must be token ids "
                                       "and outputs carry ids with empty text.")
    revision: Optional[str] = option(None, "Branch, tag or commit of the model repo.")
    code_revision: Optional[str] = option(None, "Branch, tag or commit of the model's remote code.")
    tokenizer_revision: Optional[str] = option(None, "Branch, tag or commit of the tokenizer repo.")
    tokenizer_mode: str = option(
        "auto", "auto: fast tokenizer when available; slow: always the Python tokenizer; "
        "mistral: the mistral_common tokenizer.", choices=("auto", "slow", "mistral"),
        supported=_tokenizer_mode_supported, supported_desc="auto, slow",
        planned="mistral needs the mistral_common package")
    trust_remote_code: bool = option(False, "Allow running model/tokenizer code shipped in the "
                                     "model repo (refused without this flag).")
    config_format: str = option(
        "auto", "Config file format: hf reads config.json; mistral reads params.json.",
        choices=("auto", "hf", "mistral"), supported=("auto", "hf"),
        planned="Mistral params.json format")
    dtype: str = option(
        "auto", "Weight and activation dtype. auto: float32 on CPU (bf16/fp16 matmuls are far "
        "slower than fp32 on AVX2 CPUs); on CUDA the checkpoint dtype, with fp32 checkpoints run "
        "in fp16. half = float16, float = float32.",
        choices=("auto", "half", "float16", "bfloat16", "float", "float32"))
    max_model_len: Optional[int] = option(
        None, "Context length (prompt + output). Default: derived from the model config "
        "(times the RoPE scaling factor where that extends the context).", valid=POSITIVE)
    seed: int = option(0, "Random seed for sampling when a request gives none.")
    rope_scaling: Optional[dict] = option(
        None, 'RoPE scaling as JSON, e.g. {"rope_type":"dynamic","factor":2.0}; replaces the '
        "model's scaling.", cli_type="json", metavar="JSON")
    rope_theta: Optional[float] = option(None, "RoPE base frequency; overrides the model's.",
                                         valid=POSITIVE)
    served_model_name: Optional[list] = option(
        None, "Name(s) the API answers to; the first is reported in responses and metrics. "
        "Default: the --model value.", nargs="+", cli_type=str)
    max_logprobs: int = option(20, "Most logprobs / prompt_logprobs a request may ask for.",
                               valid=NON_NEGATIVE)
    quantization: Optional[str] = option(
        None, "Weight quantization method; default: the checkpoint's quantization_config. "
        "fp8 on an unquantized checkpoint quantizes its weights at load; experts_int8 "
        "quantizes a MoE model's expert weights to int8 at load.",
        aliases=("-q",), choices=QUANTIZATION_METHODS, cli_type="nullable",
        supported=(None, *quant_formats.SUPPORTED), supported_desc=quant_formats.SUPPORTED_DESC,
        planned=quant_formats.NOT_BUILT)
    enforce_eager: bool = option(False, "Always run eagerly (no CUDA graphs). The CPU backend is "
                                 "always eager.")
    max_context_len_to_capture: Optional[int] = option(
        None, "Deprecated alias of --max-seq-len-to-capture.",
        deprecated="use --max-seq-len-to-capture", alias_of="max_seq_len_to_capture",
        valid=POSITIVE)
    max_seq_len_to_capture: int = option(8192, "Longest sequence run under a CUDA graph; longer "
                                         "ones run eagerly.", valid=POSITIVE)
    disable_sliding_window: bool = option(False, "Cap the context at the model's sliding window "
                                          "instead of using sliding-window attention.")
    override_neuron_config: Optional[dict] = option(
        None, "JSON overrides of the Neuron device config.", cli_type="json", metavar="JSON",
        supported=DEFAULT_ONLY, planned="Neuron devices are not supported")

    model_path: Optional[str] = derived(help="local directory of the resolved model")
    tokenizer_path: Optional[str] = derived(help="local directory of the tokenizer; None when "
                                            "skip_tokenizer_init")
    hf_config: Any = derived(help="transformers PretrainedConfig with overrides applied")
    torch_dtype: Optional[torch.dtype] = derived(help="resolved dtype of weights/activations")
    quant_config: Any = derived(help="pagedllm.quant QuantConfig of --quantization or the "
                                "checkpoint's quantization_config; None: unquantized")

    def _hf(self, *names: str) -> Any:
        for name in names:
            value = getattr(self.hf_config, name, None)
            if value is not None:
                return value
        return None

    @property
    def architecture(self) -> Optional[str]:
        archs = self._hf("architectures") or [None]
        return archs[0]

    @property
    def num_hidden_layers(self) -> int:
        return self._hf("num_hidden_layers")

    @property
    def hidden_size(self) -> int:
        return self._hf("hidden_size")

    @property
    def num_attention_heads(self) -> int:
        return self._hf("num_attention_heads")

    @property
    def num_kv_heads(self) -> int:
        """KV heads; OPT/GPT-2 style configs without a key have one per attention head."""
        return self._hf("num_key_value_heads", "num_kv_heads", "n_head_kv",
                        "multi_query_group_num") or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self._hf("head_dim") or self.hidden_size // self.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self._hf("vocab_size")

    @property
    def sliding_window(self) -> Optional[int]:
        """The model's sliding window, or None if it has none or it is disabled."""
        if self.disable_sliding_window or self.hf_config is None:
            return None
        if getattr(self.hf_config, "use_sliding_window", True) is False:
            return None
        return getattr(self.hf_config, "sliding_window", None)

    @property
    def served_model_names(self) -> list[str]:
        names = self.served_model_name
        if isinstance(names, str):
            names = [names]
        return list(names) if names else [self.model]

    @property
    def pooler(self):
        """The ``Pooler`` of an embedding / reward model (vLLM's ``embedding_mode``): its
        requests pool the prompt's hidden states and never generate. None otherwise."""
        from pagedllm.models.registry import model_pooler
        return model_pooler(self._hf("architectures"))

    @property
    def embedding_mode(self) -> bool:
        return self.pooler is not None

    def get_max_logprobs(self) -> int:
        return self.max_logprobs


@dataclass(frozen=True)
class MultiModalConfig:
    """Multimodal inputs (not built yet)."""
    limit_mm_per_prompt: Optional[dict] = option(
        None, "Most items per modality in one prompt, e.g. image=16,video=2.", cli_type="kv_int",
        metavar="MODALITY=N,...", supported=DEFAULT_ONLY, planned="multimodal models")
    mm_processor_kwargs: Optional[dict] = option(
        None, 'JSON overrides for the multimodal processor, e.g. {"num_crops": 4}.',
        cli_type="json", metavar="JSON", supported=DEFAULT_ONLY, planned="multimodal models")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block geometry and memory budget."""
    block_size: int = option(16, "Tokens per KV-cache block.", choices=(8, 16, 32))
    gpu_memory_utilization: float = option(
        0.9, "Fraction of device memory for weights, activations and KV cache; the KV cache "
        "gets this share minus what is in use after loading (on CPU: of the RAM available "
        "after loading, capped at what max-num-seqs full sequences use).",
        valid=(lambda v: 0 < v <= 1, "in (0, 1]"))
    swap_space: float = option(4, "CPU memory (GiB) per device for swapped-out KV blocks.",
                               valid=NON_NEGATIVE)
    kv_cache_dtype: str = option(
        "auto", "KV-cache storage dtype; auto = model dtype; fp8 = fp8_e4m3.",
        choices=("auto", "fp8", "fp8_e5m2", "fp8_e4m3"))
    quantization_param_path: Optional[str] = option(
        None, "JSON file of per-layer KV-cache scaling factors for an fp8 KV cache (default "
        "scale 1.0); layout in pagedllm/attention/kv_quant.py.")
    enable_prefix_caching: bool = option(False, "Reuse full KV blocks across requests that share "
                                         "a prefix (LRU eviction).")
    num_gpu_blocks_override: Optional[int] = option(
        None, "Use exactly this many KV blocks instead of profiling (e.g. to test preemption).",
        valid=POSITIVE)
    cpu_offload_gb: float = option(
        0, "GiB of weights (per rank) kept in pinned CPU memory and streamed to the GPU in each "
        "forward, whole linear layers in model order; CUDA only.", valid=NON_NEGATIVE)
    use_v2_block_manager: bool = option(
        True, "Deprecated, no effect: the one block manager is always used.",
        deprecated="the one block manager is always used; drop this flag")


@dataclass(frozen=True)
class LoadConfig:
    """Where and how weights are loaded."""
    load_format: str = option(
        "auto", "Weight format. auto: safetensors, else .bin; pt: .bin; safetensors; dummy: "
        "random weights of the right shapes (profiling); gguf: --model is a .gguf file (chosen "
        "by itself for one); bitsandbytes: safetensors / .bin quantized "
        "with bitsandbytes (with --quantization bitsandbytes); npcache, tensorizer, "
        "sharded_state, mistral: other formats.",
        choices=("auto", "pt", "safetensors", "npcache", "dummy", "tensorizer", "sharded_state",
                 "gguf", "bitsandbytes", "mistral"),
        supported=("auto", "pt", "safetensors", "dummy", "gguf", "bitsandbytes"),
        planned="loader for this weight format")
    download_dir: Optional[str] = option(None, "Directory for downloaded weights (default: the "
                                         "Hugging Face cache).")
    model_loader_extra_config: Optional[dict] = option(
        None, "JSON passed to the model loader of the chosen --load-format.", cli_type="json",
        metavar="JSON", supported=DEFAULT_ONLY, planned="no loader takes extra options yet")
    ignore_patterns: Optional[list] = option(
        None, "File pattern skipped when loading; repeatable. Default: original/**/*.",
        action="append", cli_type=str)
    max_parallel_loading_workers: Optional[int] = option(
        None, "Ranks that load weights at once (the others wait their turn), to bound host "
        "RAM; default: all.", valid=POSITIVE)


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching scheduler: per-step budgets and policy."""
    max_num_batched_tokens: Optional[int] = option(
        None, "Token budget of one step. Default: 512 with chunked prefill, else "
        "max(max_model_len, 2048).", valid=POSITIVE)
    max_num_seqs: int = option(256, "Most sequences in one step.", valid=POSITIVE)
    enable_chunked_prefill: Optional[bool] = option(
        None, "Split long prompts across steps and batch them with decodes. Default: on only "
        "on CUDA with max_model_len > 32768.")
    preemption_mode: Optional[str] = option(
        None, "How a request gives up its KV blocks under memory pressure: recompute (default) "
        "or swap to CPU.", choices=("recompute", "swap"))
    scheduling_policy: str = option(
        "fcfs", "fcfs: arrival order; priority: request priority (lower first), ties by "
        "arrival.", choices=("fcfs", "priority"))
    scheduler_delay_factor: float = option(
        0.0, "Wait delay_factor x last prompt latency before scheduling new prompts.",
        valid=NON_NEGATIVE)
    num_scheduler_steps: int = option(
        1, "Decode steps run back to back on the device per scheduling decision (multi-step); "
        "batches with prefills, penalties, guided decoding or logits processors run one step.",
        valid=POSITIVE)
    multi_step_stream_outputs: bool = option(
        True, "With multi-step scheduling, stream after each step (True) or at the end.")
    num_lookahead_slots: int = option(0, "Extra KV slots reserved per sequence for "
                                      "speculative tokens.", valid=NON_NEGATIVE)
    disable_async_output_proc: bool = option(
        False, "Do not overlap output processing (detokenization, stop strings, outputs) of "
        "one step with the next forward, and do not launch the next decode batch (one step "
        "or --num-scheduler-steps) before the running one's tokens reach the host. The "
        "overlap is on by default on CUDA, off on CPU and with pipeline parallelism (whose "
        "micro-batches overlap instead).")


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is spread over devices: tp x pp ranks (layout in pagedllm.distributed)."""
    tensor_parallel_size: int = option(
        1, "Tensor-parallel ranks per pipeline stage. Every supported architecture; heads "
        "must divide by it. On CUDA the mp executor binds one GPU per rank: tp x pp at most "
        "the host's visible GPUs.", aliases=("-tp",), valid=POSITIVE)
    pipeline_parallel_size: int = option(
        1, "Pipeline stages (contiguous layer ranges, each with the KV cache of its layers "
        "only; combines with -tp). Every supported architecture; at most the number of "
        "layers.", aliases=("-pp",), valid=POSITIVE)
    distributed_executor_backend: Optional[str] = option(
        None, "Executor for several ranks: mp (local processes, the default) or ray (Ray "
        "actors in a placement group; joins a running cluster or RAY_ADDRESS, else starts a "
        "local one; needs pip install 'pagedllm[ray]'; on CUDA each rank's bundle holds a GPU).",
        choices=("ray", "mp"))
    worker_use_ray: bool = option(
        False, "Deprecated: use --distributed-executor-backend ray.",
        deprecated="use --distributed-executor-backend ray")
    disable_custom_all_reduce: bool = option(False, "Use the library all-reduce only (no "
                                             "all-reduce runs at one device).")
    ray_workers_use_nsight: bool = option(
        False, "Run each Ray worker (ranks 1..) under Nsight Systems (nsys profile, through "
        "Ray's runtime_env); needs --distributed-executor-backend ray and nsys on PATH. "
        "Options: -t cuda,cudnn,cublas --cuda-graph-trace=node, one worker_process_<pid> "
        "report per worker in the Ray session's logs/nsight folder; rank 0 runs in the "
        "engine process (run the engine under nsys to profile it).")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class DeviceConfig:
    """Execution device."""
    device: str = option(
        "auto", "auto: CUDA when available, else CPU.", choices=DEVICE_CHOICES,
        supported=_device_supported,
        supported_desc="auto, cpu, cuda (when a CUDA device is present)",
        planned="no CUDA device here; neuron/openvino/tpu/xpu backends do not exist")


_LORA = "LoRA adapters"


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters (PEFT LORA checkpoints), ``pagedllm/worker/lora.py``."""
    enable_lora: bool = option(
        False, "Serve LoRA adapters (LLM.generate(lora_request=...), the server's "
        "--lora-modules). Llama-family models, tensor-parallel size 1; CUDA graphs are off.")
    max_loras: int = option(1, "Most LoRAs in one batch (each gets a slot of weights on the "
                            "device).", valid=POSITIVE)
    max_lora_rank: int = option(16, "Largest LoRA rank (8, 16, 32, 64, 128 or 256).",
                                valid=(lambda v: v in (8, 16, 32, 64, 128, 256),
                                       "one of 8, 16, 32, 64, 128, 256"))
    lora_extra_vocab_size: int = option(256, "Most extra vocabulary entries a LoRA may add.",
                                        supported=DEFAULT_ONLY,
                                        planned="LoRA adapters with extra vocabulary")
    lora_dtype: str = option("auto", "LoRA weight dtype; auto = model dtype.",
                             choices=("auto", "float16", "bfloat16", "float32"))
    long_lora_scaling_factors: Optional[str] = option(
        None, "Scaling factors of long-context LoRAs served together.", supported=DEFAULT_ONLY,
        planned="long-context LoRA")
    max_cpu_loras: Optional[int] = option(
        None, "Most loaded LoRAs kept in CPU memory (default: max_loras); >= max_loras.",
        valid=(lambda v: v is None or v > 0, "> 0"))
    fully_sharded_loras: bool = option(False, "Shard all LoRA computation over tensor-parallel "
                                       "ranks.", supported=DEFAULT_ONLY,
                                       planned="LoRA with tensor parallelism")
    qlora_adapter_name_or_path: Optional[str] = option(
        None, "QLoRA adapter (PEFT directory or repo) on a bitsandbytes base: with "
        "--quantization bitsandbytes --load-format bitsandbytes only the adapter's "
        "target_modules are quantized at load (vLLM 0.6.3); serve the adapter itself with "
        "--enable-lora and a LoRA request.")


@dataclass(frozen=True)
class PromptAdapterConfig:
    """PEFT prompt-tuning adapters (soft prompts), ``pagedllm/worker/prompt_adapter.py``."""
    enable_prompt_adapter: bool = option(
        False, "Serve prompt adapters (soft prompts; LLM.generate(prompt_adapter_request=...), "
        "the server's --prompt-adapters). Llama-family models.")
    max_prompt_adapters: int = option(1, "Most prompt adapters in one batch.", valid=POSITIVE)
    max_prompt_adapter_token: int = option(
        0, "Most soft-prompt tokens of one adapter (must be set with --enable-prompt-adapter).",
        valid=NON_NEGATIVE)


_DRAFT = "draft models; [ngram] is built"


def _draft_only(default: Any, help: str, **meta: Any) -> Any:
    return option(default, help, supported=DEFAULT_ONLY, planned=_DRAFT, **meta)


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: prompt lookup (``[ngram]``) drafts, verified in one forward by
    the target model (``pagedllm/spec_decode.py``); draft models are not built yet."""
    speculative_model: Optional[str] = option(
        None, "Draft model, or [ngram] for prompt lookup (with --num-speculative-tokens and "
        "--ngram-prompt-lookup-max).", supported=(None, "[ngram]"),
        supported_desc="[ngram] (prompt lookup)", planned="draft models")
    speculative_model_quantization: Optional[str] = _draft_only(
        None, "Quantization method of the draft model.", choices=QUANTIZATION_METHODS,
        cli_type="nullable")
    num_speculative_tokens: Optional[int] = option(
        None, "Draft tokens proposed per step.", valid=POSITIVE)
    speculative_disable_mqa_scorer: bool = option(
        False, "Score drafts by batch expansion instead of the MQA scorer.",
        supported=DEFAULT_ONLY, planned="the batch-expansion scorer; drafts are scored as "
        "multi-token queries")
    speculative_draft_tensor_parallel_size: Optional[int] = _draft_only(
        None, "Tensor-parallel ranks of the draft model.", aliases=("-spec-draft-tp",))
    speculative_max_model_len: Optional[int] = option(
        None, "Longest sequence that speculates (with its draft); longer ones decode one "
        "token a step.", valid=POSITIVE)
    speculative_disable_by_batch_size: Optional[int] = option(
        None, "No request speculates in a step while more than this many requests are "
        "unfinished (running, waiting or swapped).", valid=POSITIVE)
    ngram_prompt_lookup_max: Optional[int] = option(
        None, "Largest n-gram window of prompt lookup.", valid=POSITIVE)
    ngram_prompt_lookup_min: Optional[int] = option(
        None, "Smallest n-gram window of prompt lookup (default 1).", valid=POSITIVE)
    spec_decoding_acceptance_method: str = option(
        "rejection_sampler", "How draft tokens of random requests are verified: "
        "rejection_sampler keeps the target distribution; typical_acceptance_sampler accepts "
        "tokens above an entropy-based probability bound (lossy). Greedy requests keep "
        "exactly their greedy tokens either way.",
        choices=("rejection_sampler", "typical_acceptance_sampler"))
    typical_acceptance_sampler_posterior_threshold: Optional[float] = option(
        None, "Typical acceptance: cap of the bound a draft token's probability must "
        "exceed (default 0.09).", valid=POSITIVE)
    typical_acceptance_sampler_posterior_alpha: Optional[float] = option(
        None, "Typical acceptance: scale of exp(-entropy) in the bound (default 0.3).",
        valid=NON_NEGATIVE)
    disable_logprobs_during_spec_decoding: Optional[bool] = option(
        None, "Whether requests that need logprobs (logprobs, best_of > n) decode one token a "
        "step (True, the default) or speculate too, with the logprobs of every accepted "
        "token (False).")


@dataclass(frozen=True)
class DecodingConfig:
    """Structured (guided) decoding."""
    guided_decoding_backend: str = option(
        "outlines", "Default engine for JSON-schema/regex/choice/grammar constraints; a request "
        "may override it (guided_decoding_backend). Built: outlines (outlines_core; no "
        "guided_grammar), xgrammar (everything) and lm-format-enforcer (no guided_grammar).",
        choices=("outlines", "lm-format-enforcer", "xgrammar"))


@dataclass(frozen=True)
class ObservabilityConfig:
    """Logging, metrics and tracing."""
    disable_log_stats: bool = option(False, "Do not log throughput/cache statistics.")
    disable_log_requests: bool = option(False, "Do not log each request.")
    otlp_traces_endpoint: Optional[str] = option(
        None, "OpenTelemetry endpoint for per-request spans (OTLP over grpc, or http/protobuf "
        "with OTEL_EXPORTER_OTLP_TRACES_PROTOCOL; needs pip install 'pagedllm[tracing]').")
    collect_detailed_traces: Optional[str] = option(
        None, "Add the time in the model forward (model), in model execution (worker) or both "
        "(all; comma-separated) to the spans; needs --otlp-traces-endpoint. Synchronizes "
        "the device each step.")


@dataclass(frozen=True)
class TokenizerPoolConfig:
    """Prompt tokenization in a pool of Ray actors (pagedllm/engine/tokenizer_pool.py)."""
    tokenizer_pool_size: int = option(
        0, "Ray actors that tokenize prompts (asynchronously for the server); 0 tokenizes "
        "in the engine process.", valid=NON_NEGATIVE)
    tokenizer_pool_type: str = option(
        "ray", "Tokenizer pool type (used when --tokenizer-pool-size > 0).", supported=("ray",),
        planned="custom tokenizer group classes")
    tokenizer_pool_extra_config: Optional[dict] = option(
        None, 'Ray actor options of the pool\'s actors as JSON (default {"num_cpus": 0}); '
        "needs --tokenizer-pool-size > 0.", cli_type="json", metavar="JSON")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine reads, resolved and validated once by `create_engine_config`."""
    model: ModelConfig
    cache: CacheConfig
    load: LoadConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: DeviceConfig
    lora: LoRAConfig
    prompt_adapter: PromptAdapterConfig
    speculative: SpeculativeConfig
    decoding: DecodingConfig
    observability: ObservabilityConfig
    tokenizer_pool: TokenizerPoolConfig
    multimodal: MultiModalConfig

    # ---- derived values: computed once here (cached on the instance; a pickled config
    # carries those computed before it was sent), never again by the components ----------
    @cached_property
    def spec(self) -> SpecSettings | None:
        """What the scheduler and the runner need of the speculative flags; None when off."""
        return SpecSettings.from_config(self.speculative)

    @cached_property
    def detailed_traces(self) -> tuple[bool, bool]:
        """--collect-detailed-traces: (collect the model forward time, the execute time)."""
        obs = self.observability
        return check_tracing_flags(obs.otlp_traces_endpoint, obs.collect_detailed_traces)

    @cached_property
    def async_output_proc(self) -> bool:
        """Async output processing: on by default on CUDA (the forward runs on the device
        while the host is free); off on CPU, where the forward's OpenMP threads would compete
        with the output work for the same cores. ``PAGEDLLM_ASYNC_OUTPUT_PROC=1`` turns it on
        anywhere (tests, CPU runs). With pipeline parallelism the micro-batches in flight take
        its place."""
        if self.scheduler.disable_async_output_proc or \
                self.parallel.pipeline_parallel_size > 1:  # micro-batches overlap instead
            return False
        return Switches.from_env().async_output_proc or \
            torch.device(self.device.device).type == "cuda"

    @cached_property
    def lookahead(self) -> bool:
        """Async output processing with the lookahead: a decode batch is scheduled
        (``schedule_lookahead``) and launched while the one before it runs, 2 batches in flight
        (the engine core's ``step``). Not with speculative decoding (a step's drafts come from
        the tokens the previous step accepted) nor detailed traces (batches in flight together
        would count the same seconds in each request's forward / execute times): those run
        one batch at a time, the next launched before the outputs are made."""
        return self.async_output_proc and self.speculative.speculative_model is None and \
            not self.observability.collect_detailed_traces

    @cached_property
    def kv_heads_per_rank(self) -> int:
        """KV heads each tensor-parallel rank holds and caches (one when tp exceeds them:
        the heads are replicated)."""
        tp, heads = self.parallel.tensor_parallel_size, self.model.num_kv_heads
        return heads // tp if heads >= tp else 1


# the field types are classes: this module has no string annotations
ENGINE_CONFIG_CLASSES: dict[str, type] = {
    f.name: cast(type, f.type) for f in dataclasses.fields(EngineConfig)}


def option_fields(config_cls: type) -> list[dataclasses.Field]:
    """The user-facing option fields of one config class, in declaration order."""
    return [f for f in dataclasses.fields(config_cls) if not f.metadata.get("derived")]


def engine_option_fields() -> Iterator[dataclasses.Field]:
    for config_cls in ENGINE_CONFIG_CLASSES.values():
        yield from option_fields(config_cls)


def status_text(f: dataclasses.Field) -> str:
    """"works", or "not yet: ..." (with the supported subset) for the README and --help."""
    md = f.metadata
    supported, planned = md.get("supported"), md.get("planned")
    if supported is None:
        return "works"
    if supported == DEFAULT_ONLY:
        return f"not yet: {planned}"
    desc = md.get("supported_desc") or ", ".join(_fmt(v) for v in supported)
    return f"works: {desc}; not yet: others ({planned})"


def _fmt(value: Any) -> str:
    return "None" if value is None else str(value)


def is_default(value: Any, default: Any) -> bool:
    return value == default or (default is None and value in ({}, [], (), ""))


def check_option(f: dataclasses.Field, value: Any) -> None:
    """Apply one field's choices, validity and status; raise ValueError naming the flag."""
    md, flag, default = f.metadata, flag_name(f.name), field_default(f)
    choices = md.get("choices")
    if choices and value is not None and value not in choices:
        raise ValueError(f"{flag} {value!r} is invalid; choose from: "
                         f"{', '.join(map(str, choices))}")
    valid = md.get("valid")
    if valid and value is not None and not valid[0](value):
        raise ValueError(f"{flag} {value!r} is invalid: it must be {valid[1]}")
    supported = md.get("supported")
    if supported is None:
        return
    if supported == DEFAULT_ONLY:
        if is_default(value, default):
            return
        if isinstance(default, bool):
            raise ValueError(f"{flag} is not supported yet ({md['planned']}); remove the flag")
        raise ValueError(f"{flag} {value!r} is not supported yet ({md['planned']}); "
                         f"supported: the default ({_fmt(default)})")
    ok = supported(value) if callable(supported) else value in supported
    if not ok:
        desc = md.get("supported_desc") or ", ".join(_fmt(v) for v in supported)
        raise ValueError(f"{flag} {value} is not supported yet ({md['planned']}); "
                         f"supported: {desc}")


def check_options(values: Mapping[str, Any]) -> None:
    """Check every engine option present in `values` (a name -> value mapping)."""
    for f in engine_option_fields():
        if f.name in values:
            check_option(f, values[f.name])
