"""The `pagedllm` command: ``serve`` (OpenAI-compatible server), ``run-batch`` (OpenAI batch
files offline), ``generate`` and ``chat``.

Every subcommand takes an optional positional MODEL_TAG (it overrides --model, as in
``vllm serve``) and all engine flags, generated from `pagedllm.config`. Without MODEL_TAG and
--model the bundled demo model (``pagedllm/demo_model``) is used, because the engine default
``facebook/opt-125m`` needs the network. Heavy modules are imported inside the subcommands so
``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:  # torch comes with them: imported once the command is known
    from pagedllm.arg_utils import EngineArgs
    from pagedllm.engine.core_client import MPCoreClient

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"
DEFAULT_PROMPT = "Hello, my name is"
SERVER_MODULE = "pagedllm.entrypoints.openai.api_server"
_SERVE_DEPS = ("fastapi", "uvicorn", "starlette", "pydantic", "prometheus_client")

# CLI-only sampling options of `generate` / `chat`; unset ones keep SamplingParams' defaults.
_SAMPLING_FLAGS = {
    "max_tokens": (int, "Most tokens to generate per prompt (SamplingParams default: 16)."),
    "temperature": (float, "Sampling temperature; 0 is greedy (default: 1.0)."),
    "top_p": (float, "Nucleus sampling probability mass (default: 1.0)."),
    "top_k": (int, "Sample from the k most likely tokens; -1 disables (default: -1)."),
}


def _add_model_tag(parser: argparse.ArgumentParser) -> None:
    """Positional MODEL_TAG; call after the engine flags so the --model default is replaced.
    Its help lists the registered architectures (the registry imports no model code)."""
    from pagedllm.models.registry import supported_architectures
    parser.add_argument(
        "model_tag", nargs="?", default=None, metavar="MODEL_TAG",
        help="Model directory or Hugging Face repo id; overrides --model. Default when neither "
        f"is given: the bundled demo model ({DEMO_MODEL_DIR}), since --model's own default "
        "(facebook/opt-125m) needs the network. Supported architectures (config.json "
        f"\"architectures\"): {', '.join(supported_architectures())}.")
    parser.set_defaults(model=None)


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    for name, (type_, help_text) in _SAMPLING_FLAGS.items():
        group.add_argument("--" + name.replace("_", "-"), dest=name, type=type_, default=None,
                           help=help_text)


def _add_generate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                        help=f"Prompt to complete; repeatable (default: {DEFAULT_PROMPT!r}).")
    _add_sampling_args(parser)
    from pagedllm.arg_utils import EngineArgs
    EngineArgs.add_cli_args(parser)


def _add_chat_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system-prompt", default=None, metavar="TEXT",
                        help="System message at the start of the conversation.")
    _add_sampling_args(parser)
    from pagedllm.arg_utils import EngineArgs
    EngineArgs.add_cli_args(parser)


def build_parser() -> argparse.ArgumentParser:
    from pagedllm.bench.cli import add_bench_parser
    from pagedllm.entrypoints.openai.cli_args import make_arg_parser
    parser = argparse.ArgumentParser(prog="pagedllm", description="pagedllm: an LLM inference "
                                     "engine with a paged KV cache and vLLM-compatible flags.")
    sub = parser.add_subparsers(dest="subcommand",
                                metavar="{serve,run-batch,generate,chat,bench}")
    commands = [
        ("serve", "Run the OpenAI-compatible HTTP server.", make_arg_parser, _serve),
        ("run-batch", "Run an OpenAI batch file (JSON lines of /v1/completions, "
         "/v1/chat/completions and /v1/embeddings requests) offline.", _add_run_batch_args,
         _run_batch),
        ("generate", "Generate completions for prompts offline.", _add_generate_args, _generate),
        ("chat", "Chat with the model in the terminal (/quit or Ctrl-D ends).", _add_chat_args,
         _chat),
    ]
    for name, help_text, add_args, func in commands:
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_args(command)
        _add_model_tag(command)
        command.set_defaults(func=func)
    add_bench_parser(sub, _add_model_tag)
    return parser


def _engine_args(args: argparse.Namespace) -> EngineArgs:
    """EngineArgs of a parsed subcommand, with MODEL_TAG / --model / the demo model applied."""
    from pagedllm.arg_utils import EngineArgs
    args.model = args.model_tag or args.model or str(DEMO_MODEL_DIR)
    engine_args = EngineArgs.from_cli_args(args)
    engine_args.check_flags()
    return engine_args


def _sampling_params(args: argparse.Namespace) -> Any:
    from pagedllm.sampling_params import SamplingParams
    given = {name: getattr(args, name) for name in _SAMPLING_FLAGS}
    return SamplingParams(**{k: v for k, v in given.items() if v is not None})


def _make_llm(engine_args: EngineArgs) -> Any:
    from pagedllm.entrypoints.llm import LLM
    return LLM.from_engine_args(engine_args)


def _serve(args: argparse.Namespace, core: MPCoreClient | None = None) -> int:
    """``core``: the engine core process ``main`` started before the imports, or None."""
    from pagedllm.entrypoints.openai.cli_args import server_config_from_args
    engine_args = _engine_args(args)
    server = server_config_from_args(args)
    if not _server_importable():
        return 1
    if core is not None and not server.disable_frontend_multiprocessing:
        # the core's configuration first: it builds the engine while the server imports
        from pagedllm.logging_setup import configure_logging
        configure_logging()
        core.start_with_args(engine_args)
    try:
        api_server = importlib.import_module(SERVER_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name in _SERVE_DEPS:
            _print_serve_extra(exc.name)
            return 1
        raise
    result = api_server.run_server(args, core_client=core)
    if inspect.iscoroutine(result):
        asyncio.run(result)
    return 0


def _server_importable() -> bool:
    """The server module and its packages can be found (checked without importing them,
    before the engine core is configured); else say what to install."""
    for name in (*_SERVE_DEPS, SERVER_MODULE):
        try:
            found = name in sys.modules or importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if found:
            continue
        if name in _SERVE_DEPS:
            _print_serve_extra(name)
        else:
            print("pagedllm serve: the OpenAI server is not built yet (issue #4); use "
                  "`pagedllm generate`", file=sys.stderr)
        return False
    return True


def _print_serve_extra(name: str) -> None:
    print(f"pagedllm serve: the server needs {name}; install the serve extra: "
          "pip install 'pagedllm[serve]' (or -e '.[serve]' in a checkout)", file=sys.stderr)


def _add_run_batch_args(parser: argparse.ArgumentParser) -> None:
    from pagedllm.entrypoints.openai import run_batch
    run_batch.add_batch_args(parser)


def _run_batch(args: argparse.Namespace) -> int:
    _engine_args(args)
    from pagedllm.entrypoints.openai import run_batch
    return run_batch.run_from_args(args)


def _generate(args: argparse.Namespace) -> int:
    llm = _make_llm(_engine_args(args))
    prompts = args.prompt or [DEFAULT_PROMPT]
    outputs = llm.generate(prompts, _sampling_params(args))
    for prompt, output in zip(prompts, outputs):
        print(f"Prompt: {prompt!r}\nCompletion: {output.outputs[0].text!r}\n")
    return 0


def _chat(args: argparse.Namespace) -> int:
    llm = _make_llm(_engine_args(args))
    params = _sampling_params(args)
    messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    print("Chatting with the model; /quit or Ctrl-D ends.")
    while True:
        try:
            line = input("user> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/quit", "/exit"):
            return 0
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        text = llm.chat(messages, params)[0].outputs[0].text
        print(f"assistant> {text}")
        messages.append({"role": "assistant", "content": text})


def _prestart_core(argv: list[str]) -> MPCoreClient | None:
    """`pagedllm serve` with the engine core in its own process (the default): start that
    process before this one imports torch, transformers and the server (seconds on a GPU
    host), so that the two import in parallel; it waits for the engine arguments. Not for
    --help or --disable-frontend-multiprocessing (an abbreviation of it that slips through
    is handled by ``make_async_engine``, which stops the unused process)."""
    if not argv or argv[0] != "serve":
        return None
    if {"-h", "--help", "--disable-frontend-multiprocessing"} & set(argv):
        return None
    from pagedllm.engine.core_client import MPCoreClient
    return MPCoreClient()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    core = _prestart_core(argv)
    try:
        return _run(argv, core)
    finally:  # a flag error or a failed start before the core got its arguments
        if core is not None and not core.configured:
            core.shutdown(timeout=0)


def _run(argv: list[str], core: MPCoreClient | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return args.func(args, core) if args.func is _serve else args.func(args)
    except ValueError as exc:  # start-up validation: flags, model resolution, config checks
        print(f"pagedllm {args.subcommand}: error: {exc}", file=sys.stderr)
        return 2
