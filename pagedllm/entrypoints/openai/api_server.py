"""The OpenAI-compatible HTTP server (`pagedllm serve`): FastAPI app factory and `run_server`.

``python -m pagedllm.entrypoints.openai.api_server [flags]`` is the same as
``pagedllm serve [flags]``. FastAPI/uvicorn/prometheus_client are imported only here (and in
the serving modules), never by ``import pagedllm`` or ``LLM``.

Errors always leave as OpenAI error bodies: ``OpenAIError`` with its status (400 invalid
input, 404 unknown model), request validation and malformed JSON as 400, the API-key check as
401, anything unexpected as 500; none of them stops the engine loop.
"""
from __future__ import annotations

if __name__ == "__main__":  # vLLM's module entry: hand over to `pagedllm serve` before the
    # imports below (torch, transformers, FastAPI), so that it starts the engine core
    # process first (cli._prestart_core); this file is then imported under its own name
    import sys as _sys

    from pagedllm.cli import main as _serve_main
    _sys.exit(_serve_main(["serve", *_sys.argv[1:]]))

import argparse
import asyncio
import hmac
import logging
import os
import signal
import sys
import time
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Optional, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import pagedllm
from pagedllm.config import LoRAConfig, PromptAdapterConfig
from pagedllm.engine.async_engine import AsyncLLMEngine
from pagedllm.gc_tuning import tune_gc
from pagedllm.logging_setup import configure_logging
from pagedllm.engine.inputs import LoRATokenizers, load_tokenizer
from pagedllm.entrypoints.openai.cli_args import ServerConfig, server_config_from_args
from pagedllm.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from pagedllm.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest,
                                                  DetokenizeRequest, TokenizeChatRequest,
                                                  TokenizeCompletionRequest)
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedllm.entrypoints.openai.serving_embedding import (EmbeddingRequest,
                                                           OpenAIServingEmbedding)
from pagedllm.entrypoints.openai.serving_engine import (ClientDisconnected, OpenAIError,
                                                        ServingContext, error_body)
from pagedllm.entrypoints.openai.serving_misc import (OpenAIServingModels,
                                                      OpenAIServingTokenization)

logger = logging.getLogger("pagedllm.entrypoints.openai.api_server")


class _ApiKeyMiddleware:
    """Pure ASGI: /v1 routes need ``Authorization: Bearer <key>`` (401 otherwise).

    As Starlette-based servers read it: the first ``Authorization`` header counts, the scheme
    is case-insensitive, and the key is compared in constant time (no timing oracle on it).
    """

    def __init__(self, app, api_key: str, root_path: str = "") -> None:
        self.app, self.root_path = app, root_path or ""
        self.expected = api_key.encode()

    def _authorized(self, headers) -> bool:
        value = next((v for k, v in headers if k.lower() == b"authorization"), b"")
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token, self.expected)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS":
            path = scope["path"].removeprefix(self.root_path)
            if path.startswith("/v1") and not self._authorized(scope["headers"]):
                response = _error("Unauthorized: a valid API key is required "
                                  "(Authorization: Bearer <key>)", "AuthenticationError",
                                  HTTPStatus.UNAUTHORIZED)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# Default cap on a request body. The largest legitimate body is a few prompts of
# max_model_len tokens: 128k tokens are ~1 MB as token-id JSON, ~0.5-3 MB as (escaped) text, so
# 32 MiB leaves room for big batches while stopping a client from making the server buffer and
# parse hundreds of megabytes.
DEFAULT_MAX_REQUEST_BODY_BYTES = 32 * 1024 * 1024
MAX_BODY_ENV = "PAGEDLLM_MAX_REQUEST_BODY_BYTES"


def max_request_body_bytes() -> int:
    """The body cap: ``$PAGEDLLM_MAX_REQUEST_BODY_BYTES`` (bytes, >= 1) or the default."""
    raw = os.environ.get(MAX_BODY_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_MAX_REQUEST_BODY_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{MAX_BODY_ENV} must be a positive number of bytes, got {raw!r}")
    return value


class _BodyLimitMiddleware:
    """Pure ASGI: 413 for a body over ``max_bytes``, before it is buffered or parsed.

    A declared ``Content-Length`` over the cap is refused without reading anything; a chunked
    body is counted as it arrives and refused (an ``HTTPException`` FastAPI passes through its
    body parsing) once it passes the cap.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> StarletteHTTPException:
        return StarletteHTTPException(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"The request body is larger than the server's limit of {self.max_bytes} bytes "
            f"(set by {MAX_BODY_ENV}).")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # (a malformed Content-Length never gets here: the HTTP server refuses it)
        length = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), b"")
        if length.strip().isdigit() and int(length) > self.max_bytes:
            await _http_error(self._too_large())(scope, receive, send)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)


# Error messages quote at most this many characters: a message built from a megabyte-sized
# field (a model name, a stop list) must not send that field back.
MAX_ERROR_MESSAGE_CHARS = 1000


def _cap_message(message: str) -> str:
    """``message`` cut to MAX_ERROR_MESSAGE_CHARS and made encodable: a lone surrogate quoted
    from the request would otherwise fail the UTF-8 encoding of the error body itself."""
    if len(message) > MAX_ERROR_MESSAGE_CHARS:
        message = f"{message[:MAX_ERROR_MESSAGE_CHARS]}... " \
                  f"({len(message) - MAX_ERROR_MESSAGE_CHARS} more characters)"
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def _error(message: str, err_type: str, status: HTTPStatus, headers=None) -> JSONResponse:
    return JSONResponse(error_body(_cap_message(message), err_type, status),
                        status_code=status.value, headers=headers)


_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                404: "NotFoundError", 405: "MethodNotAllowedError",
                413: "RequestEntityTooLargeError", 422: "UnprocessableEntityError"}


def _http_error(exc: StarletteHTTPException) -> JSONResponse:
    """Starlette/FastAPI's own HTTP errors (unknown route, wrong method, unreadable body, the
    body cap) as OpenAI error bodies, keeping their status and headers (405's ``Allow``)."""
    status = HTTPStatus(exc.status_code)
    message = exc.detail if isinstance(exc.detail, str) else status.phrase
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        message = f"The request body is not valid UTF-8: {cause}"
    elif isinstance(cause, RecursionError):
        message = "The request body's JSON is nested too deeply to parse"
    if status == HTTPStatus.NOT_FOUND and exc.detail == status.phrase:
        message = "Not Found: no such route"
    err_type = _ERROR_TYPES.get(status.value, "BadRequestError" if status.value < 500
                                else "InternalServerError")
    return _error(message, err_type, status, headers=getattr(exc, "headers", None))


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


def prompt_adapter_requests(modules, config: PromptAdapterConfig) -> dict:
    """--prompt-adapters NAME=PATH ...: one PromptAdapterRequest per name, ids from 1, with
    the checkpoint's num_virtual_tokens (read now: a bad directory fails at start-up)."""
    from pagedllm.core.adapters import PromptAdapterRequest
    from pagedllm.worker.prompt_adapter import read_num_virtual_tokens
    if not modules:
        return {}
    if not config.enable_prompt_adapter:
        raise ValueError("--prompt-adapters needs --enable-prompt-adapter")
    return {name: PromptAdapterRequest(name, i, path, read_num_virtual_tokens(path, name))
            for i, (name, path) in enumerate(modules, start=1)}


def lora_module_requests(modules, config: LoRAConfig, hf_config) -> dict:
    """--lora-modules NAME=PATH or JSON ...: one LoRARequest per name, ids from 1, with the
    JSON form's base_model_name (each checkpoint is read now: a bad directory fails at
    start-up)."""
    from pagedllm.core.adapters import LoRARequest
    from pagedllm.worker.lora import load_lora, projection_shapes
    if not modules:
        return {}
    if not config.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    requests = {module[0]: LoRARequest(module[0], i, module[1],
                                       base_model_name=(module[2:] or (None,))[0])
                for i, module in enumerate(modules, start=1)}
    for request in requests.values():
        load_lora(request, config.max_lora_rank, hf_config.num_hidden_layers,
                  projection_shapes(hf_config))
    return requests


def _serving_context(engine: AsyncLLMEngine, server: ServerConfig) -> ServingContext:
    config = engine.config.model
    tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config)
    return ServingContext(
        engine=engine, tokenizer=tokenizer, served_model_names=config.served_model_names,
        max_model_len=config.max_model_len, max_logprobs=config.max_logprobs,
        response_role=server.response_role,
        chat_template=_load_chat_template(server.chat_template),
        return_tokens_as_token_ids=server.return_tokens_as_token_ids,
        enable_auto_tools=server.enable_auto_tool_choice, tool_parser=server.tool_call_parser,
        prompt_adapters=prompt_adapter_requests(server.prompt_adapters,
                                                engine.config.prompt_adapter),
        lora_modules=lora_module_requests(server.lora_modules, engine.config.lora,
                                          config.hf_config),
        lora_tokenizers=LoRATokenizers(config, tokenizer))


def _install_error_handlers(app: FastAPI) -> None:
    from pagedllm.engine.async_engine import EngineDeadError

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_, exc: EngineDeadError):  # the watchdog logs the cause once
        return _error(str(exc), "InternalServerError", HTTPStatus.INTERNAL_SERVER_ERROR)

    @app.exception_handler(OpenAIError)
    async def openai_error(_, exc: OpenAIError):
        return _error(exc.message, exc.err_type, exc.status)

    @app.exception_handler(ClientDisconnected)
    async def client_disconnected(_, exc: ClientDisconnected):
        return Response(status_code=499)  # nobody reads it; the request was aborted

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        return _http_error(exc)

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
    embedding = OpenAIServingEmbedding(ctx)
    metrics = ServerMetrics(engine, ctx.model_name, ctx.max_model_len)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        watchdog = asyncio.create_task(_watch_engine(engine, app))
        yield
        watchdog.cancel()
        engine.shutdown()

    app = FastAPI(lifespan=lifespan, root_path=server.root_path or "")
    app.state.ctx, app.state.metrics = ctx, metrics
    app.state.engine_death = None  # set by the watchdog: why the engine died
    _install_error_handlers(app)
    app.add_middleware(_BodyLimitMiddleware, max_bytes=max_request_body_bytes())
    _add_routes(app, ctx, completion, chat, models, tokenization, metrics)
    _add_embedding_route(app, embedding)
    from pagedllm.entrypoints.openai.dashboard import add_dashboard_routes
    add_dashboard_routes(app, metrics, server.api_key)  # /dashboard: the live page (issue 25)
    app.add_middleware(CORSMiddleware, allow_origins=server.allowed_origins,
                       allow_credentials=server.allow_credentials,
                       allow_methods=server.allowed_methods,
                       allow_headers=server.allowed_headers)
    if server.api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=server.api_key,
                           root_path=server.root_path or "")
    return app


_WATCH_S = 0.2  # how often the watchdog looks at the engine
_EXIT_DELAY_S = 0.5  # time for the in-flight requests' 500s to reach their clients


async def _watch_engine(engine, app: FastAPI) -> None:
    """Engine death (the core process killed, a worker gone, the engine thread ended): every
    open request fails with a 500 at once, /health turns 500, and the server exits non-zero
    (run_server) unless VLLM_KEEP_ALIVE_ON_ENGINE_DEATH is set, as vLLM 0.6.3 does."""
    from pagedllm import envs
    from pagedllm.engine.async_engine import EngineDeadError
    while engine.is_running:
        await asyncio.sleep(_WATCH_S)
    if engine._stop:  # noqa: SLF001 - shut down on purpose: nothing died
        return
    cause = engine.dead_cause()
    app.state.engine_death = cause
    engine.fail_all(EngineDeadError(f"the engine died: {cause}"))
    if envs.keep_alive_on_engine_death():
        logger.error("engine died (%s); VLLM_KEEP_ALIVE_ON_ENGINE_DEATH is set: the server "
                     "stays up and /health answers 500", cause)
        return
    logger.error("engine died (%s); shutting the server down", cause)
    await asyncio.sleep(_EXIT_DELAY_S)
    os.kill(os.getpid(), signal.SIGTERM)


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
        return await tokenization.tokenize_request(request)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest):
        return tokenization.detokenize_request(request)

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request):
        return _respond(await completion.create_completion(request, raw_request))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request):
        return _respond(await chat.create_chat_completion(request, raw_request))

    from pagedllm.entrypoints.openai.serving_misc import add_development_routes
    add_development_routes(app, ctx)  # /start_profile, /v1/load_lora_adapter, ... when enabled


def _add_embedding_route(app: FastAPI, embedding: OpenAIServingEmbedding) -> None:
    @app.post("/v1/embeddings")
    async def create_embedding(request: EmbeddingRequest, raw_request: Request):
        return JSONResponse(await embedding.create_embedding(request, raw_request))


def run_server(args: argparse.Namespace, core_client=None) -> None:
    """Load the model, build the app and serve until interrupted (called by `pagedllm serve`,
    which has resolved ``args.model`` and checked the engine flags, and may have started the
    engine core process already: ``core_client``)."""
    from pagedllm.arg_utils import EngineArgs
    configure_logging()
    server = server_config_from_args(args)
    engine_args = EngineArgs.from_cli_args(args)
    start = time.perf_counter()
    engine = make_async_engine(engine_args, server, core_client)
    try:  # the core process loads the model while this one builds the app
        app = build_app(engine, server)
        if hasattr(engine, "wait_ready"):
            engine.wait_ready()
    except BaseException:
        engine.shutdown()
        raise
    logger.info("engine and front end ready in %.1f s", time.perf_counter() - start)
    tune_gc()  # this process streams every token: keep collector pauses short
    host = server.host if server.host is not None else "0.0.0.0"
    logger.info("serving %s on http://%s:%d", engine.config.model.served_model_names[0],
                host, server.port)
    try:
        uvicorn.run(app, host=host, port=server.port, log_level=server.uvicorn_log_level,
                    ssl_keyfile=server.ssl_keyfile, ssl_certfile=server.ssl_certfile,
                    ssl_ca_certs=server.ssl_ca_certs, ssl_cert_reqs=server.ssl_cert_reqs,
                    timeout_keep_alive=5, timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()  # idempotent; covers a uvicorn that failed to start
    if app.state.engine_death is not None:
        logger.error("server exits: the engine died (%s)", app.state.engine_death)
        sys.exit(1)


def make_async_engine(engine_args, server: ServerConfig, core_client=None):
    """The engine core in its own process (the default; ``core_client``: that process if
    started already), or in a thread of this one with --disable-frontend-multiprocessing
    (vLLM's flag); the same interface either way."""
    if server.disable_frontend_multiprocessing:
        if core_client is not None:
            core_client.shutdown(timeout=0)
        engine = AsyncLLMEngine.from_engine_args(engine_args, max_log_len=server.max_log_len)
        logger.info("engine in this process (--disable-frontend-multiprocessing)")
        return engine
    from pagedllm.engine.async_mp_engine import AsyncMPLLMEngine
    engine = AsyncMPLLMEngine.from_engine_args(engine_args, max_log_len=server.max_log_len,
                                               wait=False, client=core_client)
    logger.info("start-up: engine core process %d spawned %.1f s after this process started",
                engine.client.proc.pid, engine.client.spawned_at_age_s or 0.0)
    return engine
