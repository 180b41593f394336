"""The OpenAI-compatible HTTP server (`pagedllm serve`): FastAPI app factory and `run_server`.

``python -m pagedllm.entrypoints.openai.api_server [flags]`` is the same as
``pagedllm serve [flags]``. FastAPI/uvicorn/prometheus_client are imported only here (and in
the serving modules), never by ``import pagedllm`` or ``LLM``.

Errors always leave as OpenAI error bodies: ``OpenAIError`` with its status (400 invalid
input, 404 unknown model), request validation and malformed JSON as 400, the API-key check as
401, anything unexpected as 500; none of them stops the engine loop.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Optional, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse

import pagedllm
from pagedllm.engine.async_engine import AsyncLLMEngine
from pagedllm.engine.inputs import load_tokenizer
from pagedllm.entrypoints.openai.cli_args import ServerConfig, server_config_from_args
from pagedllm.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from pagedllm.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest,
                                                  DetokenizeRequest, TokenizeChatRequest,
                                                  TokenizeCompletionRequest)
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedllm.entrypoints.openai.serving_engine import (ClientDisconnected, OpenAIError,
                                                        ServingContext, error_body)
from pagedllm.entrypoints.openai.serving_misc import (OpenAIServingModels,
                                                      OpenAIServingTokenization)

logger = logging.getLogger("pagedllm.entrypoints.openai.api_server")


class _ApiKeyMiddleware:
    """Pure ASGI: /v1 routes need ``Authorization: Bearer <key>`` (401 otherwise)."""

    def __init__(self, app, api_key: str, root_path: str = "") -> None:
        self.app, self.root_path = app, root_path or ""
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS":
            path = scope["path"].removeprefix(self.root_path)
            headers = dict(scope["headers"])
            if path.startswith("/v1") and headers.get(b"authorization") != self.expected:
                response = JSONResponse(error_body("Unauthorized: a valid API key is required "
                                                   "(Authorization: Bearer <key>)",
                                                   "AuthenticationError",
                                                   HTTPStatus.UNAUTHORIZED), status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error(message: str, err_type: str, status: HTTPStatus) -> JSONResponse:
    return JSONResponse(error_body(message, err_type, status), status_code=status.value)


def _load_chat_template(value: Optional[str]) -> Optional[str]:
    """--chat-template: a file path, or the template text itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value) as f:
            return f.read()
    if any(c in value for c in "{}\n"):
        return value
    raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")


def prompt_adapter_requests(modules, config) -> dict:
    """--prompt-adapters NAME=PATH ...: one PromptAdapterRequest per name, ids from 1, with
    the checkpoint's num_virtual_tokens (read now: a bad directory fails at start-up)."""
    from pagedllm.prompt_adapter import PromptAdapterRequest, read_num_virtual_tokens
    if not modules:
        return {}
    if not config.enable_prompt_adapter:
        raise ValueError("--prompt-adapters needs --enable-prompt-adapter")
    return {name: PromptAdapterRequest(name, i, path, read_num_virtual_tokens(path, name))
            for i, (name, path) in enumerate(modules, start=1)}


def lora_module_requests(modules, config, hf_config) -> dict:
    """--lora-modules NAME=PATH ...: one LoRARequest per name, ids from 1 (each checkpoint
    is read now: a bad directory fails at start-up)."""
    from pagedllm.lora import LoRARequest, load_lora, projection_shapes
    if not modules:
        return {}
    if not config.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    requests = {name: LoRARequest(name, i, path) for i, (name, path) in
                enumerate(modules, start=1)}
    for request in requests.values():
        load_lora(request, config.max_lora_rank, hf_config.num_hidden_layers,
                  projection_shapes(hf_config))
    return requests


def _serving_context(engine: AsyncLLMEngine, server: ServerConfig) -> ServingContext:
    config = engine.engine.config.model
    tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config)
    return ServingContext(
        engine=engine, tokenizer=tokenizer, served_model_names=config.served_model_names,
        max_model_len=config.max_model_len, max_logprobs=config.max_logprobs,
        response_role=server.response_role,
        chat_template=_load_chat_template(server.chat_template),
        return_tokens_as_token_ids=server.return_tokens_as_token_ids,
        enable_auto_tools=server.enable_auto_tool_choice, tool_parser=server.tool_call_parser,
        prompt_adapters=prompt_adapter_requests(server.prompt_adapters,
                                                engine.engine.config.prompt_adapter),
        lora_modules=lora_module_requests(server.lora_modules, engine.engine.config.lora,
                                          config.hf_config))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(_, exc: OpenAIError):
        return _error(exc.message, exc.err_type, exc.status)

    @app.exception_handler(ClientDisconnected)
    async def client_disconnected(_, exc: ClientDisconnected):
        return Response(status_code=499)  # nobody reads it; the request was aborted

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        return _error(_validation_message(exc), "BadRequestError", HTTPStatus.BAD_REQUEST)

    @app.exception_handler(Exception)
    async def internal_error(_, exc: Exception):
        logger.exception("unhandled error")
        return _error(f"internal error: {exc!r}", "InternalServerError",
                      HTTPStatus.INTERNAL_SERVER_ERROR)


def _validation_message(exc: RequestValidationError) -> str:
    """One line per error, naming the field, e.g. ``body.temperature: Input should be ...``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or str(exc)


def _respond(result) -> Response:
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream")


def build_app(engine: AsyncLLMEngine, server: ServerConfig) -> FastAPI:
    """The FastAPI app over a (not yet started) async engine; the lifespan starts it."""
    ctx = _serving_context(engine, server)
    completion, chat = OpenAIServingCompletion(ctx), OpenAIServingChat(ctx)
    models, tokenization = OpenAIServingModels(ctx), OpenAIServingTokenization(ctx, chat)
    metrics = ServerMetrics(engine, ctx.model_name, ctx.max_model_len)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(lifespan=lifespan, root_path=server.root_path or "")
    app.state.ctx, app.state.metrics = ctx, metrics
    _install_error_handlers(app)
    _add_routes(app, ctx, completion, chat, models, tokenization, metrics)
    app.add_middleware(CORSMiddleware, allow_origins=server.allowed_origins,
                       allow_credentials=server.allow_credentials,
                       allow_methods=server.allowed_methods,
                       allow_headers=server.allowed_headers)
    if server.api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=server.api_key,
                           root_path=server.root_path or "")
    return app


def _add_routes(app: FastAPI, ctx: ServingContext, completion, chat, models, tokenization,
                metrics: ServerMetrics) -> None:
    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if ctx.engine.is_running else 500)

    @app.get("/version")
    async def version():
        return {"version": pagedllm.__version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models():
        return models.list_models()

    @app.post("/tokenize")
    async def tokenize(request: Union[TokenizeCompletionRequest, TokenizeChatRequest]):
        return tokenization.tokenize_request(request)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest):
        return tokenization.detokenize_request(request)

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request):
        return _respond(await completion.create_completion(request, raw_request))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request):
        return _respond(await chat.create_chat_completion(request, raw_request))


def _configure_logging() -> None:
    root = logging.getLogger("pagedllm")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: "
                                               "%(message)s", "%m-%d %H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def run_server(args: argparse.Namespace) -> None:
    """Load the model, build the app and serve until interrupted (called by `pagedllm serve`,
    which has resolved ``args.model`` and checked the engine flags)."""
    from pagedllm.arg_utils import EngineArgs
    _configure_logging()
    server = server_config_from_args(args)
    engine_args = EngineArgs.from_cli_args(args)
    engine = AsyncLLMEngine.from_engine_args(engine_args, max_log_len=server.max_log_len)
    app = build_app(engine, server)
    host = server.host if server.host is not None else "0.0.0.0"
    logger.info("serving %s on http://%s:%d", engine.engine.config.model.served_model_names[0],
                host, server.port)
    uvicorn.run(app, host=host, port=server.port, log_level=server.uvicorn_log_level,
                ssl_keyfile=server.ssl_keyfile, ssl_certfile=server.ssl_certfile,
                ssl_ca_certs=server.ssl_ca_certs, ssl_cert_reqs=server.ssl_cert_reqs,
                timeout_keep_alive=5)


def main(argv: Optional[list[str]] = None) -> int:
    from pagedllm import cli
    return cli.main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
