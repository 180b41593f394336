"""The batch runner (``pagedllm run-batch -i in.jsonl -o out.jsonl``, or
``python -m pagedllm.entrypoints.openai.run_batch``): OpenAI's batch file format, offline.

Each input line is ``{"custom_id", "method": "POST", "url", "body"}``; each output line, in
input order, is vLLM 0.6.3's ``BatchRequestOutput``: ``{"id": "vllm-<uuid>", "custom_id",
"response": {"status_code", "request_id": "vllm-batch-<uuid>", "body"}, "error"}``. The bodies
go through the server's own serving classes (``OpenAIServingCompletion`` /
``OpenAIServingChat``), so a line answers exactly what the HTTP server would; all lines are
submitted at once and the engine batches them. The engine runs in this process (as vLLM's
runner does) and takes every engine flag of ``serve``.

Where it differs from vLLM 0.6.3 (on purpose, and only by answering more):
* ``/v1/completions`` is served too (0.6.3 answers it with a per-line error);
* a body that fails validation is that line's 400 error, not the end of the whole run (0.6.3
  validates every body while reading the file and stops at the first bad one);
* ``/v1/embeddings`` lines are answered as the server's ``/v1/embeddings`` (0.6.3 runs them
  too); on a generative model each is that route's 400.
A line that is not a batch request at all (not JSON, no ``custom_id``/``url``/``body``) stops
the run before the model loads, naming the line. Input and output are local files (vLLM also
takes http(s) URLs; those are refused with a message).

Only light modules are imported at the top, so ``pagedllm --help`` stays fast.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Optional, Sequence

from pagedllm.arg_utils import EngineArgs

logger = logging.getLogger("pagedllm.entrypoints.openai.run_batch")

COMPLETIONS_URL, CHAT_URL, EMBEDDINGS_URL = ("/v1/completions", "/v1/chat/completions",
                                             "/v1/embeddings")


def add_batch_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """vLLM 0.6.3's run_batch flags (-i, -o, --response-role, --max-log-len) and every
    engine flag of ``serve``."""
    parser.add_argument("-i", "--input-file", required=True,
                        help="The batch input file (JSON lines, OpenAI batch format).")
    parser.add_argument("-o", "--output-file", required=True,
                        help="Where to write the results (JSON lines, one per input line).")
    parser.add_argument("--response-role", default="assistant",
                        help="Role of generated chat messages when the request's "
                             "add_generation_prompt is true.")
    parser.add_argument("--max-log-len", type=int, default=None,
                        help="Most prompt characters/ids printed in request logs.")
    EngineArgs.add_cli_args(parser)
    return parser


@dataclass
class BatchLine:
    """One input line's envelope: the body is validated when it runs (a per-line error)."""
    custom_id: str
    method: str
    url: str
    body: dict


def parse_batch_file(text: str) -> list[BatchLine]:
    """Every non-empty line as a ``BatchLine``; ValueError naming the first line that is not
    a batch request (vLLM 0.6.3 also stops the run on it, before generating anything)."""
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue  # vLLM skips empty lines
        try:
            item = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"input line {number} is not JSON: {exc}") from exc
        if not isinstance(item, dict):
            raise ValueError(f"input line {number} must be a JSON object")
        missing = [k for k in ("custom_id", "method", "url", "body") if k not in item]
        if missing:
            raise ValueError(f"input line {number} lacks {', '.join(missing)} (a batch request "
                             "has custom_id, method, url and body)")
        unknown = sorted(set(item) - {"custom_id", "method", "url", "body"})
        if unknown:  # vLLM's BatchRequestInput is extra="forbid"
            raise ValueError(f"input line {number}: unknown field(s) {', '.join(unknown)}")
        if not all(isinstance(item[k], str) for k in ("custom_id", "method", "url")) or \
                not isinstance(item["body"], dict):
            raise ValueError(f"input line {number}: custom_id, method and url must be strings "
                             "and body an object")
        lines.append(BatchLine(item["custom_id"], item["method"], item["url"], item["body"]))
    return lines


def _output(custom_id: str, status: int, body: Optional[dict], error: Any) -> dict:
    """vLLM 0.6.3's BatchRequestOutput, with its id prefixes."""
    return {"id": f"vllm-{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": int(status),
                         "request_id": f"vllm-batch-{uuid.uuid4().hex}", "body": body},
            "error": error}


class BatchRunner:
    """Runs batch lines through the server's serving classes over one async engine."""

    def __init__(self, ctx) -> None:
        from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
        from pagedllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
        from pagedllm.entrypoints.openai.serving_embedding import OpenAIServingEmbedding
        self.completion, self.chat = OpenAIServingCompletion(ctx), OpenAIServingChat(ctx)
        self.embedding = OpenAIServingEmbedding(ctx)

    def _route(self, line: BatchLine):
        """(request model class, handler) for the line's URL, or an error message."""
        from pagedllm.entrypoints.openai.protocol import (ChatCompletionRequest,
                                                          CompletionRequest)
        from pagedllm.entrypoints.openai.serving_embedding import EmbeddingRequest
        if line.method.upper() != "POST":
            return f"method must be POST, got {line.method!r}"
        if line.url == COMPLETIONS_URL:
            return CompletionRequest, self.completion.create_completion
        if line.url == CHAT_URL:
            return ChatCompletionRequest, self.chat.create_chat_completion
        if line.url == EMBEDDINGS_URL:
            return EmbeddingRequest, self.embedding.create_embedding
        return (f"url {line.url!r} is not supported: only /v1/completions, "
                "/v1/chat/completions and /v1/embeddings are supported in the batch runner")

    async def run_line(self, line: BatchLine) -> dict:
        """The line's output: 200 with the response body, else the error as the server
        would answer it (``ErrorResponse``), or a message for what is not a request."""
        from pydantic import ValidationError

        from pagedllm.entrypoints.openai.serving_engine import OpenAIError, error_body
        route = self._route(line)
        if isinstance(route, str):
            return _output(line.custom_id, HTTPStatus.BAD_REQUEST, None, route)
        model, handler = route
        try:
            request = model.model_validate(line.body)
            # vLLM's run_request: a stream is not a batch answer (embeddings have no stream)
            if getattr(request, "stream", False):
                return _output(line.custom_id, HTTPStatus.BAD_REQUEST, None,
                               "Request must not be sent in stream mode")
            body = await handler(request, None)
        except ValidationError as exc:
            return _output(line.custom_id, HTTPStatus.BAD_REQUEST, None,
                           error_body(_validation_message(exc)))
        except OpenAIError as exc:
            return _output(line.custom_id, exc.status, None,
                           error_body(exc.message, exc.err_type, exc.status))
        return _output(line.custom_id, HTTPStatus.OK, body, None)

    async def run(self, lines: list[BatchLine]) -> list[dict]:
        return list(await asyncio.gather(*(self.run_line(line) for line in lines)))


def _validation_message(exc) -> str:
    """As the server's 400 for a bad body: one ``field: message`` per pydantic error."""
    parts = [f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}"
             if err.get("loc") else str(err.get("msg")) for err in exc.errors()]
    return "; ".join(parts) or str(exc)


def _check_local(path: str, flag: str) -> str:
    if path.startswith(("http://", "https://")):
        raise ValueError(f"{flag} {path!r}: URLs are not supported, give a local file")
    return path


def serving_context(engine, response_role: str):
    """What the serving classes read, as vLLM's runner builds them: the served names, no
    LoRA modules, prompt adapters or chat-template override."""
    from pagedllm.engine.inputs import load_tokenizer
    from pagedllm.entrypoints.openai.serving_engine import ServingContext
    config = engine.config.model
    return ServingContext(
        engine=engine, tokenizer=None if config.skip_tokenizer_init else load_tokenizer(config),
        served_model_names=config.served_model_names, max_model_len=config.max_model_len,
        max_logprobs=config.max_logprobs, response_role=response_role)


async def run_batch(engine, lines: list[BatchLine], response_role: str = "assistant"
                    ) -> list[dict]:
    """Output dicts for ``lines`` (in order) over a not yet started async engine."""
    runner = BatchRunner(serving_context(engine, response_role))
    engine.start()
    return await runner.run(lines)


def write_outputs(path: str, outputs: list[dict]) -> None:
    """One JSON object per line; like vLLM 0.6.3, no newline after the last one."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(o, ensure_ascii=False) for o in outputs))


def run_from_args(args: argparse.Namespace) -> int:
    """Read, run and write; the model is loaded only after the input file parsed."""
    from pagedllm.engine.async_engine import AsyncLLMEngine
    from pagedllm.logging_setup import configure_logging
    configure_logging()  # the runner's progress lines on stderr, as serve logs
    with open(_check_local(args.input_file, "--input-file"), encoding="utf-8") as f:
        lines = parse_batch_file(f.read())
    _check_local(args.output_file, "--output-file")
    engine = AsyncLLMEngine.from_engine_args(EngineArgs.from_cli_args(args),
                                             max_log_len=args.max_log_len)
    try:
        logger.info("running %d batch requests from %s", len(lines), args.input_file)
        outputs = asyncio.run(run_batch(engine, lines, args.response_role))
    finally:
        engine.shutdown()
    write_outputs(args.output_file, outputs)
    failed = sum(o["error"] is not None for o in outputs)
    logger.info("wrote %d results to %s (%d with errors)", len(outputs), args.output_file,
                failed)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from pagedllm import cli
    return cli.main(["run-batch", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
