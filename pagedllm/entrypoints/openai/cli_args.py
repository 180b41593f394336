"""Flags of the OpenAI-compatible server (`pagedllm serve`), declared once in `ServerConfig`.

Engine flags (including --served-model-name and --disable-log-requests) come from
`pagedllm.config`; this module adds only what the HTTP front end reads. The same generic
machinery builds the argparse group and applies each field's status, so a server flag also
works or fails at start-up with a message naming it.
"""

import argparse
import json
import logging
from dataclasses import dataclass
from typing import Any, Optional

from pagedllm import envs
from pagedllm.arg_utils import EngineArgs, add_config_args, parse_json_of
from pagedllm.config import check_option, field_default, option, option_fields


def parse_name_path(text: str) -> tuple[str, str]:
    """Parse ``name=path`` (a LoRA module or prompt adapter) into ``(name, path)``."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


_LORA_MODULE_KEYS = ("name", "path", "base_model_name")


def parse_lora_module(text: str) -> tuple:
    """One --lora-modules item, in either of vLLM 0.6.3's forms: ``name=path`` (when the text
    has "=" and no ","), else JSON ``{"name", "path", "base_model_name"?}``. Returns
    ``(name, path)`` or ``(name, path, base_model_name)``."""
    if "=" in text and "," not in text:
        return parse_name_path(text)
    try:
        item = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"Invalid JSON format for --lora-modules: {text}") \
            from exc
    if not isinstance(item, dict):
        raise argparse.ArgumentTypeError(f"--lora-modules: expected NAME=PATH or a JSON object "
                                         f"with name and path, got {text!r}")
    unknown = sorted(set(item) - set(_LORA_MODULE_KEYS))
    missing = [k for k in ("name", "path") if not isinstance(item.get(k), str) or not item[k]]
    base = item.get("base_model_name")
    if unknown or missing or not isinstance(base, (str, type(None))):
        problem = (f"unknown field(s) {', '.join(unknown)}" if unknown else
                   f"{', '.join(missing)} must be non-empty strings" if missing else
                   "base_model_name must be a string")
        raise argparse.ArgumentTypeError(f"Invalid fields for --lora-modules: {text} - "
                                         f"{problem}")
    return (item["name"], item["path"]) if base is None else (item["name"], item["path"], base)


def _all() -> list[str]:
    return ["*"]


def _parse_json_list(text: str) -> list:
    return parse_json_of(text, list, 'list such as ["*"]')


# The keys of tool_parsers.TOOL_PARSERS (kept here so that the CLI does not import pydantic
# models; a test checks that both agree).
TOOL_PARSER_NAMES = ("hermes", "internlm", "llama3_json", "mistral")


@dataclass(frozen=True)
class ServerConfig:
    """OpenAI-compatible HTTP server."""
    host: Optional[str] = option(None, "Host name or address to bind (default: all "
                                 "interfaces).")
    port: int = option(8000, "Port to listen on.", valid=(lambda p: 0 < p < 65536, "1..65535"))
    uvicorn_log_level: str = option("info", "Log level of uvicorn.",
                                    choices=("debug", "info", "warning", "error", "critical",
                                             "trace"))
    allow_credentials: bool = option(False, "Allow credentials in CORS requests.")
    allowed_origins: list = option(help="CORS allowed origins as a JSON list.", factory=_all,
                                   cli_type=_parse_json_list, metavar="JSON")
    allowed_methods: list = option(help="CORS allowed methods as a JSON list.", factory=_all,
                                   cli_type=_parse_json_list, metavar="JSON")
    allowed_headers: list = option(help="CORS allowed headers as a JSON list.", factory=_all,
                                   cli_type=_parse_json_list, metavar="JSON")
    api_key: Optional[str] = option(None, "Require this key in the Authorization: Bearer "
                                    "header.")
    lora_modules: Optional[list] = option(
        None, "LoRA adapters to serve, as NAME=PATH or JSON {\"name\": ..., \"path\": ..., "
        "\"base_model_name\": ...} (one or more; PEFT LoRA directories; needs --enable-lora): "
        "a request's model NAME selects one; /v1/models lists it under base_model_name (a "
        "served name, else the first).", nargs="+", cli_type=parse_lora_module,
        metavar="NAME=PATH|JSON")
    prompt_adapters: Optional[list] = option(
        None, "Prompt adapters to serve, as NAME=PATH (one or more; PEFT prompt-tuning "
        "directories; needs --enable-prompt-adapter): a request's model NAME selects one.",
        nargs="+", cli_type=parse_name_path, metavar="NAME=PATH")
    chat_template: Optional[str] = option(None, "Chat template (a file path or the template "
                                          "itself); default: the tokenizer's.")
    response_role: str = option("assistant", "Role of generated messages when the request's "
                                "add_generation_prompt is true.")
    ssl_keyfile: Optional[str] = option(None, "TLS private key file.")
    ssl_certfile: Optional[str] = option(None, "TLS certificate file.")
    ssl_ca_certs: Optional[str] = option(None, "CA certificates file.")
    ssl_cert_reqs: int = option(0, "Whether client certificates are required (see Python's "
                                "ssl module).")
    root_path: Optional[str] = option(None, "FastAPI root_path when behind a path-based "
                                      "proxy.")
    max_log_len: Optional[int] = option(None, "Most prompt characters/ids printed in request "
                                        "logs (default: all).")
    return_tokens_as_token_ids: bool = option(
        False, 'Represent tokens in logprobs as "token_id:{id}" strings.')
    disable_frontend_multiprocessing: bool = option(
        False, "Run the HTTP front end and the engine in one process.")
    enable_auto_tool_choice: bool = option(
        False, 'Let the model decide whether to call tools (tool_choice "auto", the default '
        "when a request has tools); needs --tool-call-parser.")
    tool_call_parser: Optional[str] = option(
        None, "Format of the model's tool calls, parsed into OpenAI tool_calls for "
        '--enable-auto-tool-choice: hermes (<tool_call>), llama3_json, mistral ([TOOL_CALLS]) '
        "or internlm.", choices=TOOL_PARSER_NAMES)


def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return add_config_args(parser, ServerConfig, title="server")


def make_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """All flags of `pagedllm serve`: engine flags, then server flags."""
    EngineArgs.add_cli_args(parser)
    return add_server_args(parser)


def server_config_from_args(args: Any) -> ServerConfig:
    """Check the server flags of an argparse namespace and build the frozen `ServerConfig`.

    Also the server's environment (`pagedllm.envs`): refused variables stop start-up here,
    VLLM_API_KEY / PAGEDLLM_API_KEY fills ``api_key`` (over --api-key, as vLLM 0.6.3 reads
    ``envs.VLLM_API_KEY or args.api_key``), and the variables read are logged once logging
    is set up."""
    findings = envs.check_server_environment()
    values = {}
    for f in option_fields(ServerConfig):
        values[f.name] = getattr(args, f.name, field_default(f))
        check_option(f, values[f.name])
    env_key, flag_key = envs.api_key(), values["api_key"]
    if env_key is not None:
        values["api_key"] = env_key
    if logging.getLogger("pagedllm.envs").hasHandlers():  # else `serve` logs on its 2nd call
        envs.log_environment(findings)
        if env_key is not None and flag_key not in (None, env_key):
            logging.getLogger("pagedllm.envs").warning(
                "--api-key and the API_KEY environment variable differ; the variable wins")
    if values["enable_auto_tool_choice"] and values["tool_call_parser"] is None:
        raise ValueError("--enable-auto-tool-choice requires --tool-call-parser (one of: "
                         f"{', '.join(TOOL_PARSER_NAMES)})")
    return ServerConfig(**values)
