"""Request and response bodies of the OpenAI-compatible server (pydantic), as vLLM 0.6.3 and the
OpenAI API define them: the OpenAI fields with their defaults, then vLLM's extra sampling fields.

Requests validate field by field (pydantic, then the ``model_validator`` checks below, which
raise ``ValueError`` naming the field); ``to_sampling_params`` builds the engine's
``SamplingParams``, whose own validation (ranges, features not built yet) also surfaces as 400.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pagedllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def random_uuid() -> str:
    return uuid.uuid4().hex


class OpenAIBaseModel(BaseModel):
    # Unknown fields are a 400 naming them, as vLLM 0.6.3 (extra="forbid"): a misspelt
    # sampling field must not silently fall back to its default.
    model_config = ConfigDict(extra="forbid")


class ErrorResponse(OpenAIBaseModel):
    object: str = "error"
    message: str
    type: str
    param: Optional[str] = None
    code: int


class ModelPermission(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"modelperm-{random_uuid()}")
    object: str = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: Optional[str] = None
    is_blocking: bool = False


class ModelCard(OpenAIBaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedllm"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None
    permission: list[ModelPermission] = Field(default_factory=list)


class ModelList(OpenAIBaseModel):
    object: str = "list"
    data: list[ModelCard] = Field(default_factory=list)


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: Optional[int] = 0


class StreamOptions(OpenAIBaseModel):
    include_usage: Optional[bool] = True
    continuous_usage_stats: Optional[bool] = False


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[dict[str, Any]] = None


class _SamplingRequest(OpenAIBaseModel):
    """Fields shared by completions and chat: OpenAI's, then vLLM's extras.

    Python's JSON reader takes ``NaN``, ``Infinity`` and ``1e999`` as floats; no sampling
    number means anything non-finite (a NaN bias or temperature poisons the logits), so every
    float field, ``logit_bias`` values included, must be finite (400 naming the field).
    """
    model_config = ConfigDict(allow_inf_nan=False)  # extra: as OpenAIBaseModel
    model: str
    frequency_penalty: Optional[float] = 0.0
    logit_bias: Optional[dict[str, float]] = None
    n: int = 1
    presence_penalty: Optional[float] = 0.0
    response_format: Optional[ResponseFormat] = None
    seed: Optional[int] = Field(None, ge=_INT64_MIN, le=_INT64_MAX)
    stop: Optional[Union[str, list[str]]] = Field(default_factory=list)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    top_p: Optional[float] = 1.0
    user: Optional[str] = None
    # vLLM extras
    best_of: Optional[int] = None
    use_beam_search: bool = False
    top_k: Optional[int] = -1
    min_p: Optional[float] = 0.0
    repetition_penalty: Optional[float] = 1.0
    length_penalty: float = 1.0
    stop_token_ids: Optional[list[int]] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: Optional[int] = Field(None, ge=1)
    prompt_logprobs: Optional[int] = None
    allowed_token_ids: Optional[list[int]] = None
    guided_json: Optional[Union[str, dict, BaseModel]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    guided_decoding_backend: Optional[str] = None
    guided_whitespace_pattern: Optional[str] = None
    priority: int = 0

    @model_validator(mode="after")
    def _check_common(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("Stream options can only be defined when `stream=True`.")
        if self.prompt_logprobs is not None and self.prompt_logprobs > 0 and self.stream:
            # vLLM lets prompt_logprobs=0 through with stream (and streams none back)
            raise ValueError("`prompt_logprobs` are not available when `stream=True`.")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError("`prompt_logprobs` must be a non-negative value.")
        guided = [k for k in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
                  if getattr(self, k) is not None]
        if len(guided) > 1:
            raise ValueError("You can only use one kind of guided decoding ('guided_json', "
                             "'guided_regex', 'guided_choice' or 'guided_grammar'), got "
                             f"{', '.join(guided)}.")
        if self.use_beam_search:
            self._check_beam_search()
        return self

    def _check_beam_search(self) -> None:
        """What a beam-search answer cannot carry (vLLM 0.6.3 answers such requests
        unstreamed, with the cumulative logprob where per-token logprobs belong): a 400
        naming the field instead."""
        for name in ("stream", "echo", "logprobs"):
            if getattr(self, name, None):
                raise ValueError(f"{name} is not supported with use_beam_search.")
        if self.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs is not supported with use_beam_search.")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of must be greater than or equal to n, got n={self.n} "
                             f"and best_of={self.best_of}.")

    def to_beam_search_params(self, default_max_tokens: int) -> BeamSearchParams:
        """vLLM 0.6.3's ``to_beam_search_params``: ``beam_width=n``, max_tokens (default: what
        fits), ignore_eos, temperature (``0.0`` only when null) and length_penalty. A given
        ``best_of`` widens the beam; the ``n`` best sequences are answered."""
        max_tokens = self.requested_max_tokens
        return BeamSearchParams(
            beam_width=self.best_of or self.n,
            max_tokens=default_max_tokens if max_tokens is None else max_tokens,
            ignore_eos=self.ignore_eos,
            temperature=0.0 if self.temperature is None else self.temperature,
            length_penalty=self.length_penalty)

    def _guided_decoding(self) -> Optional[dict]:
        for key in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
            value = getattr(self, key)
            if value is not None:
                return {key.removeprefix("guided_"): value,
                        "backend": self.guided_decoding_backend,
                        "whitespace_pattern": self.guided_whitespace_pattern}
        if self.response_format is not None and self.response_format.type != "text":
            schema = (self.response_format.json_schema or {}).get("schema")
            kind = {"json": schema} if schema is not None else {"json_object": True}
            return {**kind, "backend": self.guided_decoding_backend}
        return None

    def _sampling_kwargs(self, max_tokens: Optional[int], temperature: Optional[float],
                         logprobs: Optional[int], prompt_logprobs: Optional[int]) -> dict:
        logit_bias = None
        if self.logit_bias:
            try:
                logit_bias = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError as exc:
                raise ValueError("logit_bias keys must be token ids (integers as strings), "
                                 f"got {list(self.logit_bias)}") from exc
        return dict(
            n=self.n, best_of=self.best_of, presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else
            self.repetition_penalty,
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0, seed=self.seed, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
            logit_bias=logit_bias, allowed_token_ids=self.allowed_token_ids,
            guided_decoding=self._guided_decoding())


# ---- completions -----------------------------------------------------------------------------
Prompt = Union[list[int], list[list[int]], str, list[str]]


class CompletionRequest(_SamplingRequest):
    prompt: Prompt
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    max_tokens: Optional[int] = 16
    suffix: Optional[str] = None
    temperature: Optional[float] = 1.0
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _check_completion(self):
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError("`logprobs` must be a positive value.")
        return self

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    @property
    def echo_only(self) -> bool:
        """Prompt scoring (echo with max_tokens=0): the answer is the prompt and its logprobs.
        The engine still runs one decode step (it needs max_tokens >= 1, as vLLM's does);
        the serving side drops that token."""
        return bool(self.echo) and self.max_tokens == 0

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = default_max_tokens if self.max_tokens is None else self.max_tokens
        if self.echo_only:
            max_tokens = 1
        prompt_logprobs = self.prompt_logprobs
        if self.echo and prompt_logprobs is None:
            prompt_logprobs = self.logprobs
        return SamplingParams(**self._sampling_kwargs(
            max_tokens, self.temperature, self.logprobs, prompt_logprobs))


class CompletionLogProbs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionResponseChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    prompt_logprobs: Optional[list[Optional[dict[int, Any]]]] = None


class CompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{random_uuid()}")
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionResponseStreamChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class CompletionStreamResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{random_uuid()}")
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: Optional[UsageInfo] = Field(default=None)


# ---- chat ------------------------------------------------------------------------------------
class FunctionDefinition(OpenAIBaseModel):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class ChatCompletionToolsParam(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionNamedFunction(OpenAIBaseModel):
    name: str


class ChatCompletionNamedToolChoiceParam(OpenAIBaseModel):
    function: ChatCompletionNamedFunction
    type: Literal["function"] = "function"


ToolChoice = Union[Literal["none", "auto", "required"], ChatCompletionNamedToolChoiceParam]
_NAMED_TOOL_HINT = ('Should be like `{"type": "function", "function": {"name": '
                    '"my_function"}}`')
# Arguments of a function declared without `parameters`: the empty object (OpenAI's meaning).
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
# The keys a message may carry: the union of OpenAI's message types and vLLM 0.6.3's custom
# one (role, content, name, tool_call_id, tool_calls), which reject any other key.
MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_call_id", "tool_calls",
                            "function_call", "refusal"})


def check_message_fields(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A 400 naming ``messages[i].key`` for a key no message type has (vLLM's typed
    messages reject it; passing it to the chat template would hide a client's typo)."""
    for i, message in enumerate(messages):
        unknown = sorted(set(message) - MESSAGE_FIELDS)
        if unknown:
            raise ValueError(f"messages[{i}]: unknown field(s) {', '.join(unknown)} (a message "
                             f"has only {', '.join(sorted(MESSAGE_FIELDS))})")
    return messages


class ChatCompletionRequest(_SamplingRequest):
    messages: list[dict[str, Any]]
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = 0
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = 0.7
    tools: Optional[list[ChatCompletionToolsParam]] = None
    # "none" when no tools are given, "auto" when tools are given without a tool_choice.
    tool_choice: Optional[ToolChoice] = "none"
    # None/True: as many calls as the model makes; False: at most one.
    parallel_tool_calls: Optional[bool] = None
    # vLLM extras
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: Optional[list[dict[str, str]]] = None
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None

    _check_messages = field_validator("messages")(check_message_fields)

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs is not None and self.top_logprobs < 0:
            raise ValueError("`top_logprobs` must be a positive value.")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("when using `top_logprobs`, `logprobs` must be set to true.")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("Cannot set both `continue_final_message` and "
                             "`add_generation_prompt` to True.")
        if not self.messages:
            raise ValueError("messages must contain at least one message.")
        self._check_tools()
        return self

    def _check_tools(self) -> None:
        """vLLM's tool checks: tool_choice needs tools, a named tool must be one of them, and a
        forced tool call (named or "required") owns the output constraint."""
        if "tool_choice" not in self.model_fields_set and self.tools is not None:
            self.tool_choice = "auto"
        if "tool_choice" in self.model_fields_set and self.tool_choice is not None \
                and self.tools is None:
            raise ValueError("When using `tool_choice`, `tools` must be set.")
        if self.tools is not None and not self.tools:
            raise ValueError("`tools` must contain at least one tool (got an empty list).")
        if self.named_tool is not None:
            if not self.named_tool.function.name:
                raise ValueError(f"Incorrectly formatted `tool_choice`. {_NAMED_TOOL_HINT}")
            if self.named_tool.function.name not in self.tool_names:
                raise ValueError(f"The tool {self.named_tool.function.name!r} specified in "
                                 "`tool_choice` does not match any of the specified `tools` "
                                 f"({', '.join(self.tool_names)})")
        if self.forces_tool_call:
            given = [k for k in ("guided_json", "guided_regex", "guided_choice",
                                 "guided_grammar") if getattr(self, k) is not None]
            if self.response_format is not None and self.response_format.type != "text":
                given.append("response_format")
            if given:
                raise ValueError(f"tool_choice {self.tool_choice_name!r} constrains the output "
                                 f"to tool calls; it cannot be combined with {', '.join(given)}")

    @property
    def tool_names(self) -> list[str]:
        return [tool.function.name for tool in self.tools or ()]

    @property
    def named_tool(self) -> Optional[ChatCompletionNamedToolChoiceParam]:
        if isinstance(self.tool_choice, ChatCompletionNamedToolChoiceParam):
            return self.tool_choice
        return None

    @property
    def tool_choice_name(self) -> str:
        """The tool choice as a word for messages: none, auto, required or the function name."""
        named = self.named_tool
        return named.function.name if named is not None else str(self.tool_choice or "none")

    @property
    def forces_tool_call(self) -> bool:
        return bool(self.tools) and (self.named_tool is not None
                                     or self.tool_choice == "required")

    def tool_call_schema(self) -> Optional[dict]:
        """The JSON schema a forced tool call is generated under, None when not forced.

        Named tool: the function's parameters. "required": an array of
        ``{"name": <tool>, "parameters": <its schema>}`` objects, one ``anyOf`` branch per tool,
        at least one item (at most one with ``parallel_tool_calls=false``).
        """
        if not self.forces_tool_call:
            return None
        functions = {tool.function.name: tool.function for tool in self.tools}
        if self.named_tool is not None:
            return functions[self.named_tool.function.name].parameters or _NO_PARAMETERS
        branches = [{"type": "object",
                     "properties": {"name": {"type": "string", "enum": [name]},
                                    "parameters": fn.parameters or _NO_PARAMETERS},
                     "required": ["name", "parameters"], "additionalProperties": False}
                    for name, fn in functions.items()]
        schema = {"type": "array", "minItems": 1,
                  "items": branches[0] if len(branches) == 1 else {"anyOf": branches}}
        if self.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return schema

    def _guided_decoding(self) -> Optional[dict]:
        schema = self.tool_call_schema()
        if schema is None:
            return super()._guided_decoding()
        return {"json": schema, "backend": self.guided_decoding_backend,
                "whitespace_pattern": self.guided_whitespace_pattern}

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def num_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = self.requested_max_tokens
        if max_tokens is None:
            max_tokens = default_max_tokens
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is None and self.echo:  # vLLM scores an echoed chat prompt too
            prompt_logprobs = self.top_logprobs
        return SamplingParams(**self._sampling_kwargs(
            max_tokens, self.temperature, self.num_logprobs, prompt_logprobs))


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-tool-{random_uuid()}")
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(OpenAIBaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(OpenAIBaseModel):
    """One streamed piece of a tool call: the first carries id, type and name, later ones
    argument fragments; ``index`` says which call of the message it belongs to."""
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[DeltaFunctionCall] = None


class ChatMessage(OpenAIBaseModel):
    role: str
    content: Optional[str] = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatCompletionLogProb(OpenAIBaseModel):
    token: str
    logprob: float = -9999.0
    bytes: Optional[list[int]] = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(OpenAIBaseModel):
    content: Optional[list[ChatCompletionLogProbsContent]] = None


class ChatCompletionResponseChoice(OpenAIBaseModel):
    index: int
    message: ChatMessage
    logprobs: Optional[ChatCompletionLogProbs] = None
    finish_reason: Optional[str] = "stop"
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"chat-{random_uuid()}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    prompt_logprobs: Optional[list[Optional[dict[int, Any]]]] = None


class DeltaMessage(OpenAIBaseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    tool_calls: list[DeltaToolCall] = Field(default_factory=list)


class ChatCompletionResponseStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatCompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"chat-{random_uuid()}")
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: Optional[UsageInfo] = Field(default=None)


# ---- tokenize / detokenize -------------------------------------------------------------------
class TokenizeCompletionRequest(OpenAIBaseModel):
    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(OpenAIBaseModel):
    model: Optional[str] = None
    messages: list[dict[str, Any]]
    _check_messages = field_validator("messages")(check_message_fields)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None


TokenizeRequest = Union[TokenizeCompletionRequest, TokenizeChatRequest]


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIBaseModel):
    model: Optional[str] = None
    tokens: list[int]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str


# ---- runtime LoRA (VLLM_ALLOW_RUNTIME_LORA_UPDATING) --------------------------------------------
# vLLM 0.6.3 declares these two on pydantic's BaseModel, not its forbidding base: unknown
# fields are ignored here too.
class LoadLoraAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoraAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: Optional[int] = None


class VersionResponse(OpenAIBaseModel):
    version: str
