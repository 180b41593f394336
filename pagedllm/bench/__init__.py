"""``pagedllm bench throughput | latency | serve``: the benchmarks of ``benchmarks/`` behind
the CLI, with the engine's flags, JSON results (``--output-json``) and an optional PNG chart
(``--plot``, matplotlib). Each module keeps its heavy imports (torch, the engine, httpx) inside
functions or is imported only when its subcommand runs, so ``pagedllm --help`` stays fast."""
