#!/usr/bin/env python
"""Train the tiny demo language model bundled with pagedllm.

Everything is offline and seeded: the training text is the Python standard
library's own documentation (``pydoc_data.topics.topics``, i.e. the text behind
``help('for')`` etc.) plus the docstrings of a fixed list of stdlib modules,
read from the running interpreter.  The script

1. builds the corpus and a document-level train/val split,
2. trains a byte-level BPE tokenizer (``tokenizers``) and wraps it in a
   ``transformers.PreTrainedTokenizerFast`` with bos/eos and a chat template,
3. trains a small ``LlamaForCausalLM`` (GQA, tied embeddings) on CPU with AdamW
   and a warmup + cosine LR schedule,
4. saves everything with ``save_pretrained`` (weights in float16) and checks
   that it reloads and generates with ``AutoModelForCausalLM``.

Usage::

    python scripts/train_demo_model.py                      # defaults = shipped model
    python scripts/train_demo_model.py --steps 200 --out /tmp/demo   # quick run

The corpus depends on the Python version (the shipped model was made with
CPython 3.11); with the same interpreter and library versions the run is
reproducible up to floating-point nondeterminism of multithreaded CPU kernels.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "2")  # tokenizers' trainer threads
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Docstrings come from every importable stdlib module (and the submodules of
# stdlib packages) except these: ones with side effects on import (antigravity
# opens a browser, this prints), GUI/IDE code, test suites, deprecated
# packages, platform-specific modules and machine-generated codec modules.
SKIP_MODULES = {
    "__main__", "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo",
    "test", "lib2to3", "distutils", "ensurepip", "pydoc_data", "encodings",
    "sre_compile", "sre_constants", "sre_parse", "msilib", "winreg", "winsound",
    "msvcrt", "nt", "xxsubtype",
}


def stdlib_doc_modules() -> list[str]:
    """Sorted names of the stdlib modules whose docstrings go into the corpus."""
    import importlib
    import pkgutil

    names: list[str] = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP_MODULES:
            continue
        names.append(name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:
            continue
        if hasattr(mod, "__path__"):  # package: add its submodules
            for sub in sorted(pkgutil.walk_packages(mod.__path__, name + ".", onerror=lambda _: None),
                              key=lambda m: m.name):
                parts = sub.name.split(".")
                if any(p.startswith("_") or p.startswith("test") or p in SKIP_MODULES for p in parts[1:]):
                    continue
                names.append(sub.name)
    return names


SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


# --------------------------------------------------------------------------- corpus
def _clean(doc: str) -> str:
    doc = inspect.cleandoc(doc)
    return doc.strip()


def _module_docs(name: str) -> list[str]:
    import importlib

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(name)
    except BaseException:  # platform-specific or otherwise unimportable modules
        return []
    out: list[str] = []
    seen: set[int] = set()

    def add(obj, qualname: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            doc = getattr(obj, "__doc__", None)
        if not isinstance(doc, str) or id(obj) in seen:
            return
        seen.add(id(obj))
        doc = _clean(doc)
        if len(doc) >= 80:  # skip one-liners such as "Return self+value."
            out.append(f"{qualname}\n\n{doc}")

    add(mod, name)
    for attr in sorted(vars(mod)):
        if attr.startswith("_"):
            continue
        obj = vars(mod)[attr]
        owner = getattr(obj, "__module__", None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if owner is not None and owner != name and name != "builtins":
            continue
        add(obj, f"{name}.{attr}")
        if inspect.isclass(obj):
            for m in sorted(vars(obj)):
                if m.startswith("_") and m != "__init__":
                    continue
                sub = vars(obj)[m]
                if isinstance(sub, (staticmethod, classmethod)):
                    sub = sub.__func__
                if inspect.isroutine(sub) or isinstance(sub, property):
                    add(sub, f"{name}.{attr}.{m}")
    return out


def build_corpus(chat_frac: float, seed: int) -> tuple[list[str], list[str], dict]:
    """Return (train_docs, val_docs, stats).  Docs are plain strings (no specials)."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    docs: list[str] = []
    n_topic = n_chat = 0
    for key in sorted(topics):
        text = topics[key].strip()
        if not text:
            continue
        n_topic += 1
        if rng.random() < chat_frac:
            # A little instruction-style data so the chat template is meaningful.
            q = f"Explain the Python documentation topic \"{key}\"."
            docs.append(("CHAT", q, text))
            n_chat += 1
        else:
            docs.append(text)
    n_mod = 0
    seen: set[str] = set()
    for name in stdlib_doc_modules():
        for d in _module_docs(name):
            if d not in seen:
                seen.add(d)
                docs.append(d)
                n_mod += 1
    rng.shuffle(docs)
    n_val = max(1, int(0.05 * len(docs)))
    val, train = docs[:n_val], docs[n_val:]
    stats = dict(topics=n_topic, chat_topics=n_chat, docstrings=n_mod, docs=len(docs),
                 train_docs=len(train), val_docs=len(val))
    return train, val, stats


def doc_text(d) -> str:
    """Plain text of a doc, for tokenizer training."""
    if isinstance(d, tuple):
        return d[1] + "\n" + d[2]
    return d


# ------------------------------------------------------------------------ tokenizer
def train_tokenizer(train_docs, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((doc_text(d) for d in train_docs), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_docs(tokenizer, docs) -> torch.Tensor:
    """Concatenate docs into one token stream: <s> text </s> <s> text </s> ..."""
    texts = []
    for d in docs:
        if isinstance(d, tuple):  # chat-formatted doc; the template adds <s> and </s>
            msgs = [{"role": "user", "content": d[1]}, {"role": "assistant", "content": d[2]}]
            texts.append(tokenizer.apply_chat_template(msgs, tokenize=False))
        else:
            texts.append(tokenizer.bos_token + d + tokenizer.eos_token)
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def unigram_ce(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1.0  # add-one
    logp = (counts / counts.sum()).log()
    return float(-logp[val_ids].mean())


# ---------------------------------------------------------------------------- model
def make_model(tokenizer, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def get_batch(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    ix = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
    x = torch.stack([data[i : i + seq] for i in ix.tolist()])
    y = torch.stack([data[i + 1 : i + 1 + seq] for i in ix.tolist()])
    return x, y


def loss_fn(model, x, y, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq: int, autocast: bool, max_batches: int = 16) -> float:
    """Mean loss over non-overlapping windows covering (the start of) ``data``."""
    model.eval()
    n = (data.numel() - 1) // seq
    starts = list(range(0, n * seq, seq))
    losses, count = 0.0, 0
    for b in range(0, min(len(starts), max_batches * 32), 32):
        s = starts[b : b + 32]
        x = torch.stack([data[i : i + seq] for i in s])
        y = torch.stack([data[i + 1 : i + 1 + seq] for i in s])
        losses += float(loss_fn(model, x, y, autocast)) * len(s)
        count += len(s)
    model.train()
    return losses / count


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    p = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, p)))


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(__file__).resolve().parent.parent
    ap.add_argument("--out", default=str(root / "pagedllm" / "demo_model"))
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--chat-frac", type=float, default=0.5,
                    help="fraction of pydoc topics formatted as chat turns")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-bf16-autocast", dest="autocast", action="store_false",
                    help="train in plain fp32 (default: bf16 autocast on CPU)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    train_docs, val_docs, stats = build_corpus(args.chat_frac, args.seed)
    print(f"corpus: {stats}", flush=True)
    tokenizer = train_tokenizer(train_docs, args.vocab)
    train_ids = encode_docs(tokenizer, train_docs)
    val_ids = encode_docs(tokenizer, val_docs)
    n_chars = sum(len(doc_text(d)) for d in train_docs + val_docs)
    print(f"tokenizer: vocab={len(tokenizer)}  chars={n_chars}  train_tokens={train_ids.numel()}  "
          f"val_tokens={val_ids.numel()}  ({time.time() - t_start:.1f}s)", flush=True)
    uni = unigram_ce(train_ids, val_ids, len(tokenizer))
    print(f"unigram baseline val CE = {uni:.3f} nats (uniform = {math.log(len(tokenizer)):.3f})", flush=True)

    model = make_model(tokenizer, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.time()
    ema = None
    history = []
    val = float("nan")
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        x, y = get_batch(train_ids, args.batch, args.seq, gen)
        loss = loss_fn(model, x, y, args.autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lv = loss.item()
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if step % 10 == 0 or step == args.steps - 1:
            el = time.time() - t0
            print(f"step {step:5d}/{args.steps}  loss {lv:.3f}  ema {ema:.3f}  lr {lr_at(step, args):.2e}  "
                  f"{el:.0f}s ({el / (step + 1):.2f}s/step)", flush=True)
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            val = evaluate(model, val_ids, args.seq, args.autocast)
            history.append({"step": step + 1, "train_ema": round(ema, 4), "val": round(val, 4)})
            print(f"  eval step {step + 1}: val loss {val:.3f}  (ppl {math.exp(val):.1f})", flush=True)
    train_time = time.time() - t0

    # Final numbers (fp32, no autocast) for the README.
    final_train = evaluate(model, train_ids, args.seq, False)
    final_val = evaluate(model, val_ids, args.seq, False)
    print(f"final (fp32 eval): train {final_train:.3f}  val {final_val:.3f}  unigram {uni:.3f}", flush=True)

    # Save: float16 weights, tokenizer, generation config.
    from transformers import GenerationConfig

    model = model.to(torch.float16)
    model.config.dtype = torch.float16
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=128,
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"  # generic name, loads in transformers 4.x and 5.x
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    for f in out.iterdir():
        f.chmod(0o644)
    meta = dict(
        python=sys.version.split()[0], torch=torch.__version__,
        args=vars(args), corpus=stats, parameters=n_params,
        train_tokens=int(train_ids.numel()), val_tokens=int(val_ids.numel()),
        unigram_val_ce=round(uni, 4), final_train_loss=round(final_train, 4),
        final_val_loss=round(final_val, 4), train_seconds=round(train_time, 1),
        history=history,
    )
    (out / "training_log.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"saved to {out}  ({train_time:.0f}s training, {time.time() - t_start:.0f}s total)", flush=True)

    # Reload check with transformers, fp32 like the engine.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    t = AutoTokenizer.from_pretrained(out)
    for prompt in ["The for statement", "A list comprehension", "The open() function"]:
        enc = t(prompt, return_tensors="pt")
        o = m.generate(**enc, max_new_tokens=30, do_sample=False)
        print(f"--- {prompt!r}\n{t.decode(o[0], skip_special_tokens=True)}", flush=True)
    chat = t.apply_chat_template([{"role": "user", "content": 'Explain the Python documentation topic "while".'}],
                                 add_generation_prompt=True, return_tensors="pt", return_dict=True)
    o = m.generate(**chat, max_new_tokens=30, do_sample=False)
    print(f"--- chat\n{t.decode(o[0][chat['input_ids'].shape[1]:], skip_special_tokens=True)}", flush=True)


if __name__ == "__main__":
    main()
