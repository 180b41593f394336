"""The ``pagedllm bench`` subcommand: ``throughput``, ``latency`` and ``serve``.

Each takes the engine's flags (``serve`` takes all of ``pagedllm serve``'s, and starts that
server) and MODEL_TAG, plus its workload flags, ``--output-json PATH`` and ``--plot PATH.png``.
Only argparse is imported here; a benchmark's module is imported when it runs.
"""
from __future__ import annotations

import argparse


def _add_common(parser: argparse.ArgumentParser, input_len: int, output_len: int) -> None:
    group = parser.add_argument_group("benchmark")
    group.add_argument("--input-len", type=int, default=input_len,
                       help=f"Prompt tokens per request (default: {input_len}).")
    group.add_argument("--output-len", type=int, default=output_len,
                       help=f"Output tokens per request, EOS ignored (default: {output_len}).")
    group.add_argument("--output-json", default=None, metavar="PATH",
                       help="Write the summary and per-request samples as JSON.")
    group.add_argument("--plot", default=None, metavar="PATH.png",
                       help="Write a PNG chart (needs matplotlib; skipped with a message "
                       "otherwise).")


def _add_throughput_args(parser: argparse.ArgumentParser) -> None:
    from pagedllm.arg_utils import EngineArgs
    _add_common(parser, 32, 128)
    parser.add_argument("--num-prompts", type=int, default=64,
                        help="Requests, all submitted at once (default: 64).")
    EngineArgs.add_cli_args(parser)  # --seed (the engine's) also seeds the prompts


def _add_latency_args(parser: argparse.ArgumentParser) -> None:
    from pagedllm.arg_utils import EngineArgs
    _add_common(parser, 32, 128)
    parser.add_argument("--batch-size", type=int, default=1, help="Requests per iteration "
                        "(default: 1, the decode-bound case).")
    parser.add_argument("--num-iters-warmup", type=int, default=2)
    parser.add_argument("--num-iters", type=int, default=10)
    EngineArgs.add_cli_args(parser)


def _add_serve_args(parser: argparse.ArgumentParser) -> None:
    from pagedllm.entrypoints.openai.cli_args import make_arg_parser
    _add_common(parser, 32, 64)
    group = parser.add_argument_group("load")
    group.add_argument("--base-url", default=None, help="An already running server; default: "
                       "start `pagedllm serve` here with the engine and server flags given.")
    group.add_argument("--num-prompts", type=int, default=200)
    group.add_argument("--request-rate", type=float, default=float("inf"),
                       help="Requests/s (Poisson arrivals); inf sends all at once.")
    group.add_argument("--range-ratio", type=float, default=0.5,
                       help="Prompt lengths are uniform in input-len * (1 +- this).")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="Token-id range of the prompts (default: the model's).")
    group.add_argument("--client-processes", type=int, default=1,
                       help="Load-generator processes (use >1 when one is saturated).")
    make_arg_parser(parser)


def _run(args: argparse.Namespace) -> int:
    from pagedllm.bench.report import finish
    from pagedllm.cli import _engine_args
    engine_args = _engine_args(args)  # also resolves MODEL_TAG / the demo model into args
    if args.bench_command == "throughput":
        from pagedllm.bench import throughput
        result = throughput.run(engine_args, args.num_prompts, args.input_len,
                                args.output_len, args.seed)
    elif args.bench_command == "latency":
        from pagedllm.bench import latency
        result = latency.run(engine_args, args.batch_size, args.input_len, args.output_len,
                             args.num_iters_warmup, args.num_iters, args.seed)
    else:
        from pagedllm.bench import serving
        result = serving.run_cli(args)
    finish(result, args.output_json, args.plot)
    return 0


BENCHMARKS = [
    ("throughput", "Offline throughput: a batch of prompts at once through LLM.generate.",
     _add_throughput_args),
    ("latency", "Latency of one batch (default batch 1) through LLM.generate, repeated.",
     _add_latency_args),
    ("serve", "Online serving: a load generator against `pagedllm serve` (started here) or "
     "--base-url.", _add_serve_args),
]


def add_bench_parser(sub, add_model_tag) -> None:
    """Register ``bench`` on the top-level subparsers; ``add_model_tag`` is the CLI's
    MODEL_TAG helper, so each benchmark takes a model the way ``serve`` does."""
    bench = sub.add_parser("bench", help="Benchmark throughput, latency or online serving.",
                           description="Benchmark throughput, latency or online serving.")
    kinds = bench.add_subparsers(dest="bench_command", metavar="{throughput,latency,serve}",
                                 required=True)
    for name, help_text, add_args in BENCHMARKS:
        command = kinds.add_parser(name, help=help_text, description=help_text)
        add_args(command)
        add_model_tag(command)
    bench.set_defaults(func=_run)
