"""Guided-decoding overhead: time per output token of guided JSON vs unguided, same batch.

A model shape from ``benchmarks/configs`` with dummy (random) weights and a byte-level BPE
tokenizer trained here on Python's docs (``--tokenizer-vocab`` tokens; the model's vocab rows
beyond it are never allowed by the mask). Both workloads sample at temperature 1 with
``ignore_eos``, ``max_tokens=--output-len`` and ``detokenize=False``; the guided one
constrains every request to a JSON schema with unbounded arrays and strings, so random
weights keep the JSON open and the batch stays full. Runs are interleaved, best of ``--repeats``.

    python benchmarks/guided.py --model benchmarks/configs/tiny-llama --batch 32
    python benchmarks/guided.py --backend outlines --batch 32
    python benchmarks/guided.py --backend lm-format-enforcer --batch 32
    python benchmarks/guided.py --model benchmarks/configs/qwen2-0.5b --batch 32 --output-len 32
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCHEMA = {
    "type": "object",
    "properties": {
        "records": {"type": "array", "items": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "name": {"type": "string"},
                           "kind": {"enum": ["a", "b", "c"]},
                           "tags": {"type": "array", "items": {"type": "string"}}},
            "required": ["id", "name", "kind", "tags"]}},
    },
    "required": ["records"],
}


def build_tokenizer(vocab_size: int) -> Path:
    """A byte-level BPE tokenizer trained on pydoc topics, cached under /tmp."""
    path = Path(f"/tmp/pagedllm-bench-tokenizer-{vocab_size}")
    if (path / "tokenizer.json").exists():
        return path
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(topics.values()) * 2, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(path)
    return path


def run(llm, prompts, params) -> tuple[float, int]:
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="benchmarks/configs/tiny-llama")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--tokenizer-vocab", type=int, default=16000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="xgrammar",
                        choices=["xgrammar", "outlines", "lm-format-enforcer"])
    args = parser.parse_args()
    from pagedllm import LLM, SamplingParams
    tokenizer = build_tokenizer(args.tokenizer_vocab)
    llm = LLM(model=args.model, tokenizer=str(tokenizer), load_format="dummy",
              max_model_len=args.input_len + args.output_len + 8, seed=0,
              guided_decoding_backend=args.backend, gpu_memory_utilization=0.5)
    vocab = llm.llm_engine.config.model.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, min(vocab, args.tokenizer_vocab) - 10,
                            (args.batch, args.input_len), generator=gen).tolist()
    # detokenize=False: random weights inside JSON strings emit byte tokens that never form
    # valid UTF-8, which makes the incremental detokenizer's window (not guidance) grow.
    common = dict(temperature=1.0, max_tokens=args.output_len, ignore_eos=True,
                  detokenize=False)
    plain = SamplingParams(**common)
    guided = SamplingParams(**common, guided_decoding={"json": SCHEMA})
    run(llm, prompts[:2], plain)
    run(llm, prompts[:2], guided)  # warm-up, and the schema's one compilation
    best = {"unguided": float("inf"), "guided": float("inf")}
    counts = {}
    for _ in range(args.repeats):
        for name, params in (("unguided", plain), ("guided", guided)):
            elapsed, num_tokens = run(llm, prompts, params)
            best[name] = min(best[name], elapsed / num_tokens)
            counts[name] = num_tokens
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU, {torch.get_num_threads()} threads"
    row = {"model": args.model, "backend": args.backend, "device": device, "batch": args.batch,
           "tokenizer_vocab": len(llm.get_tokenizer()), "model_vocab": vocab,
           "output_tokens": counts,
           "unguided_ms_per_token": round(best["unguided"] * 1e3, 4),
           "guided_ms_per_token": round(best["guided"] * 1e3, 4),
           "overhead": f"{(best['guided'] / best['unguided'] - 1) * 100:.1f}%"}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
