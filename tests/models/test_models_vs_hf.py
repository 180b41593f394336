"""Every supported architecture against Hugging Face transformers (the oracle), fp32 on CPU.

1. Greedy tokens: ``LLM.generate`` (temperature 0, 16 tokens, EOS ignored) over a batch of
   four prompts of 3..40 tokens equals HF ``generate(do_sample=False)`` run per prompt, for
   KV-cache block sizes 8 and 16 and several batch orders.
2. Logits: one batched prefill of the same prompts through the native model (a small harness
   around its paged KV cache) gives the same last-position log-probabilities as HF's forward
   (atol 1e-4).
Models are tiny random checkpoints from ``tests/utils/tiny_models.py``.
"""
from __future__ import annotations

import pytest
import torch

from pagedllm.attention.backend import AttentionMetadata, ForwardContext, PrefillSeq
from tests.utils.tiny_models import ARCHITECTURES, VOCAB_SIZE, build_tiny_model

PROMPT_LENS = [3, 11, 25, 40]
MAX_TOKENS = 16
BATCH_ORDERS = [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)]


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1234)
    # ids >= 3 avoid the pad/bos/eos specials of the tiny tokenizer
    return [torch.randint(3, VOCAB_SIZE, (n,), generator=generator).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return _prompts()


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_path(arch) -> str:
    return str(build_tiny_model(arch))


@pytest.fixture(scope="module")
def hf_model(model_path, arch):
    from transformers import AutoModelForCausalLM
    kwargs = {"attn_implementation": "eager"} if arch == "gemma2" else {}
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, **kwargs)
    model.generation_config.eos_token_id = None  # ignore EOS, as ignore_eos does
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompts) -> list[list[int]]:
    outputs = []
    for ids in prompts:  # one at a time: no padding in the oracle
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=MAX_TOKENS, do_sample=False)
        new = out[0, len(ids):].tolist()
        assert len(new) == MAX_TOKENS
        outputs.append(new)
    return outputs


@pytest.mark.parametrize("block_size", [8, 16])
def test_greedy_matches_hf(model_path, prompts, hf_greedy, block_size):
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.sampling_params import SamplingParams
    llm = LLM(model=model_path, block_size=block_size, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for order in BATCH_ORDERS:
        outs = llm.generate(prompt_token_ids=[prompts[i] for i in order],
                            sampling_params=params, use_tqdm=False)
        for i, out in zip(order, outs):
            assert list(out.outputs[0].token_ids) == hf_greedy[i], (
                f"prompt {i} (len {len(prompts[i])}) differs from HF in batch order {order}")


def _native_model(model_path: str):
    from pagedllm.arg_utils import EngineArgs
    from pagedllm.models.loader import load_model
    config = EngineArgs(model=model_path, dtype="float32").create_engine_config()
    model = load_model(config.model, config.load, torch.device("cpu"))
    return model, config.model


def _prefill_context(model_config, prompts: list[list[int]], block_size: int = 8):
    """A ForwardContext for one step prefilling every prompt, with a fresh paged cache.

    Each prompt gets its own run of blocks, handed out in reverse order so that slots are
    not contiguous across block boundaries.
    """
    num_blocks = sum(-(-len(p) // block_size) for p in prompts)
    free_blocks = list(range(num_blocks))[::-1]
    slot_mapping, prefills, start = [], [], 0
    for ids in prompts:
        blocks = [free_blocks.pop(0) for _ in range(-(-len(ids) // block_size))]
        slots = torch.tensor([blocks[i // block_size] * block_size + i % block_size
                              for i in range(len(ids))])
        prefills.append(PrefillSeq(start, len(ids), len(ids), torch.tensor(blocks)))
        slot_mapping.append(slots)
        start += len(ids)
    meta = AttentionMetadata(block_size, torch.cat(slot_mapping), 0, None, None, prefills)
    kv_caches = [torch.zeros(2, num_blocks * block_size, model_config.num_kv_heads,
                             model_config.head_dim) for _ in range(model_config.num_hidden_layers)]
    return ForwardContext(meta, kv_caches)


def test_last_position_logits_match_hf(model_path, prompts, hf_model):
    model, model_config = _native_model(model_path)
    ctx = _prefill_context(model_config, prompts)
    input_ids = torch.tensor([t for ids in prompts for t in ids])
    positions = torch.cat([torch.arange(len(ids)) for ids in prompts])
    last_rows = torch.tensor(PROMPT_LENS).cumsum(0) - 1
    with torch.no_grad():
        hidden = model(input_ids, positions, ctx)
        ours = torch.log_softmax(model.compute_logits(hidden[last_rows]), dim=-1)
        for i, ids in enumerate(prompts):
            theirs = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, -1].float(), -1)
            torch.testing.assert_close(ours[i], theirs, atol=1e-4, rtol=0,
                                       msg=lambda m, i=i: f"prompt {i}: {m}")


def _variant_configs():
    """Config shapes the tiny checkpoints do not cover."""
    from transformers import GPT2Config, OPTConfig, Phi3Config
    return {
        # opt-350m: project_in/out and post-LN blocks without a final LayerNorm
        "opt-350m-like": OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                   num_attention_heads=4, word_embed_proj_dim=32,
                                   do_layer_norm_before=False, vocab_size=VOCAB_SIZE,
                                   max_position_embeddings=128),
        "gpt2-scaled-by-layer": GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=96,
                                           vocab_size=VOCAB_SIZE, n_positions=128,
                                           scale_attn_by_inverse_layer_idx=True),
        "phi3-partial-rotary": Phi3Config(hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=VOCAB_SIZE,
                                          max_position_embeddings=128,
                                          partial_rotary_factor=0.5, pad_token_id=0,
                                          bos_token_id=1, eos_token_id=2),
    }


@pytest.mark.parametrize("variant", sorted(_variant_configs()))
def test_config_variants_match_hf(variant, prompts):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from pagedllm.models.registry import resolve_model_class
    config = _variant_configs()[variant]
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in hf.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.15)
            else:  # random norms and biases too, so their loading is checked
                param.uniform_(-0.5, 0.5)
    model = resolve_model_class(hf.config.architectures or [type(hf).__name__])(
        hf.config, hf.config.max_position_embeddings)
    params = set(dict(model.named_parameters()))
    assert model.load_weights(hf.state_dict().items()) == params
    heads = hf.config.num_attention_heads
    model_config = SimpleNamespace(num_kv_heads=getattr(hf.config, "num_key_value_heads", heads),
                                   head_dim=hf.config.hidden_size // heads,
                                   num_hidden_layers=hf.config.num_hidden_layers)
    with torch.no_grad():
        hidden = model(torch.tensor([t for ids in prompts for t in ids]),
                       torch.cat([torch.arange(len(ids)) for ids in prompts]),
                       _prefill_context(model_config, prompts))
        ours = torch.log_softmax(model.compute_logits(hidden[torch.tensor(PROMPT_LENS).cumsum(0)
                                                             - 1]), -1)
        for i, ids in enumerate(prompts):
            theirs = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].float(), -1)
            torch.testing.assert_close(ours[i], theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,prefix", [("opt", "model."), ("gpt2", "transformer.")])
def test_checkpoint_keys_without_prefix(name, prefix):
    """facebook/opt-125m stores ``decoder.*`` and openai gpt2 bare ``h.*`` keys plus mask
    buffers; both load into the same parameters as the prefixed HF layout."""
    from safetensors.torch import load_file

    from pagedllm.models.registry import resolve_model_class
    from transformers import AutoConfig
    path = build_tiny_model(name)
    config = AutoConfig.from_pretrained(path)
    state = load_file(str(path / "model.safetensors"))
    bare = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    if name == "gpt2":
        bare["h.0.attn.bias"] = torch.ones(1, 1, 8, 8)
        bare["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    models = [resolve_model_class(config.architectures)(config, 512) for _ in range(2)]
    loaded = [m.load_weights(s.items()) for m, s in zip(models, (state, bare))]
    assert loaded[0] == loaded[1] == set(dict(models[0].named_parameters()))
    for (n, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.equal(a, b), n
