"""Tiny seeded models of every supported architecture, built locally (no network).

A byte-level BPE tokenizer is trained with ``tokenizers`` on text from Python's own docs; the
weights are random from transformers configs with a large init scale so that logits have
clear gaps and greedy choices do not flip on float rounding.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

VOCAB_SIZE = 512
_TOKENIZER_VERSION = 1  # bump when build_tokenizer changes
CACHE_DIR = Path(os.environ.get("PAGEDLLM_TEST_MODELS", "/tmp/pagedllm-test-models"))

_COMMON = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=512, bos_token_id=1,
               eos_token_id=2, pad_token_id=0)


# short prompts of different lengths in the tiny tokenizer's domain (Python docs)
E2E_PROMPTS = ["The for statement is used to iterate over", "Hello", "def f(x):\n    return x",
               "A list is a sequence of", "import os"]


def _training_text() -> list[str]:
    from pydoc_data.topics import topics
    return [t for _, t in sorted(topics.items())][:120]


def build_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_text(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                          "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(path)
    return fast


def _configs():
    from transformers import (Gemma2Config, GemmaConfig, GPT2Config, LlamaConfig, MistralConfig,
                              OPTConfig, Phi3Config, Qwen2Config, Qwen3Config)
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, **_COMMON)
    return {
        "llama": LlamaConfig(**llama_like, tie_word_embeddings=False),
        "mistral": MistralConfig(**llama_like, sliding_window=None),
        # embedding rows past the tokenizer (as padded vocabularies have): room for a LoRA
        # adapter's added tokens
        "llama-vocab576": LlamaConfig(**{**llama_like, "vocab_size": 576},
                                      tie_word_embeddings=False),
        "qwen2": Qwen2Config(**llama_like, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**llama_like, head_dim=32, tie_word_embeddings=True),
        "gemma": GemmaConfig(**llama_like, head_dim=32),
        "gemma2": Gemma2Config(**llama_like, head_dim=32, sliding_window=8,
                               query_pre_attn_scalar=32),
        "phi3": Phi3Config(**llama_like),
        "opt": OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=64, **_COMMON),
        # untied LM head and project_in / project_out (the pipeline-parallel tests)
        "opt-untied": OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                num_attention_heads=4, word_embed_proj_dim=32,
                                tie_word_embeddings=False, **_COMMON),
        "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB_SIZE, n_positions=512,
                           bos_token_id=1, eos_token_id=2),
    }


ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "opt", "gpt2"]


def cached_checkpoint(root: Path, name: str, recipe: str,
                      write: Callable[[Path], None]) -> Path:
    """``root/<name>-<digest of recipe>``: built once by ``write(directory)`` plus the tiny
    tokenizer, in a staging directory renamed into place (atomic: concurrent builders never
    see half a model). The digest covers everything that defines the model, so a changed
    config never reuses a stale checkpoint."""
    path = root / f"{name}-{hashlib.sha1(recipe.encode()).hexdigest()[:10]}"
    if (path / "tokenizer.json").exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    write(staging)
    build_tokenizer(staging)
    try:
        os.rename(staging, path)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process won the race
    return path


def build_tiny_model(name: str, root: Path = CACHE_DIR, init_std: float = 0.15) -> Path:
    """Save (once) a tiny random model of architecture ``name``; return its directory."""
    from transformers import AutoModelForCausalLM
    config = _configs()[name]
    config.initializer_range = init_std

    def write(staging: Path) -> None:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, init_std)
        model.save_pretrained(staging)

    recipe = f"{config.to_json_string()}|{init_std}|{VOCAB_SIZE}|{_TOKENIZER_VERSION}"
    return cached_checkpoint(root, name, recipe, write)


# pooling models (LLM.encode, /v1/embeddings): name -> (base config, architecture)
EMBEDDING_MODELS = {"mistral-embed": ("mistral", "MistralModel"),
                    "llama-embed": ("llama", "LlamaModel"),
                    "gemma2-embed": ("gemma2", "Gemma2Model"),
                    "qwen2-reward": ("qwen2", "Qwen2ForRewardModel")}


def build_tiny_embedding_model(name: str, root: Path = CACHE_DIR, init_std: float = 0.15) -> Path:
    """Save (once) a tiny random pooling model: the bare decoder stack as Hugging Face's
    ``AutoModel`` saves it (e5-mistral's layout, no ``model.`` prefix); for
    ``Qwen2ForRewardModel`` the stack under ``model.`` plus Qwen2.5-Math-RM's score head
    (``score.0`` Linear, ReLU, ``score.2`` Linear to one reward)."""
    base, arch = EMBEDDING_MODELS[name]
    config = _configs()[base]
    config.initializer_range = init_std
    config.architectures = [arch]
    recipe = f"{config.to_json_string()}|{init_std}|{VOCAB_SIZE}|{_TOKENIZER_VERSION}"
    return cached_checkpoint(root, name, recipe,
                             lambda staging: _write_embedding_model(config, init_std, staging))


def _write_embedding_model(config, init_std: float, staging: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModel
    torch.manual_seed(0)
    model = AutoModel.from_config(config, dtype=torch.float32)
    score = torch.nn.Sequential(torch.nn.Linear(config.hidden_size, config.hidden_size),
                                torch.nn.ReLU(), torch.nn.Linear(config.hidden_size, 1))
    with torch.no_grad():
        for param in [*model.parameters(), *score.parameters()]:
            if param.dim() >= 2:
                param.normal_(0.0, init_std)
    if config.architectures == ["Qwen2ForRewardModel"]:
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update({f"score.{k}": v for k, v in score.state_dict().items()})
        config.save_pretrained(staging)
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  str(staging / "model.safetensors"))
    else:
        model.save_pretrained(staging)
