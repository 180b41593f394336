"""Where the engine core process's start-up seconds go before ``EngineCore`` (issue 19): the
steps of ``core_client.run_engine_core`` timed one by one in a fresh interpreter (its imports,
the first CUDA query), then ``create_engine_config`` under cProfile with the config cache
off (what a cold resolution through transformers pays; a warm start reads the cache, and the
core takes the front end's plain configuration).
``python benchmarks/core_boot_probe.py [--model DIR]`` (8B shape by default)."""
import time

T0 = time.time()
import argparse  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="benchmarks/configs/llama-3-8b")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    os.environ["PAGEDLLM_CONFIG_CACHE"] = "0"  # time transformers, not the cache
    gc.disable()
    from pagedllm.engine import core_client
    threading.Thread(target=core_client._init_cuda_driver, daemon=True).start()
    import zmq  # noqa: F401
    marks = [("interpreter + zmq + core_client", time.time())]
    from pagedllm.engine.core import EngineCore  # noqa: F401
    marks.append(("pagedllm.engine.core (torch, the engine)", time.time()))
    gc.enable()
    import torch
    torch.cuda.is_available()
    marks.append(("torch.cuda.is_available()", time.time()))
    import cProfile
    import pstats
    from pagedllm import EngineArgs
    engine_args = EngineArgs(model=args.model, load_format="dummy", skip_tokenizer_init=True,
                             max_model_len=4096)
    profile = cProfile.Profile()
    profile.runcall(engine_args.create_engine_config)
    marks.append(("create_engine_config", time.time()))
    if torch.cuda.is_available():
        torch.cuda.init()
        torch.empty(1, device="cuda")
        marks.append(("CUDA context (torch.cuda.init + first tensor)", time.time()))
    last = T0
    for name, t in marks:
        print(f"{t - last:6.2f} s  {name}")
        last = t
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
