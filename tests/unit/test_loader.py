"""Weight loading: sharded safetensors, .bin, dummy, and errors that name the tensor."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedllm import LLM, SamplingParams
from tests.utils.tiny_models import build_tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPT = "The for statement"


@pytest.fixture(scope="module")
def source():
    path = build_tiny_model("qwen2")
    return path, LLM(model=str(path)).generate([PROMPT], GREEDY, use_tqdm=False)[0]


def _copy_without_weights(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return load_file(str(src / "model.safetensors"))


def _tokens(path, **kwargs):
    out = LLM(model=str(path), **kwargs).generate([PROMPT], GREEDY, use_tqdm=False)[0]
    return out.outputs[0].token_ids


def test_sharded_safetensors_with_index(source, tmp_path):
    src, expected = source
    state = _copy_without_weights(src, tmp_path / "m")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / "m" / file))
        weight_map.update({k: file for k in keys})
    (tmp_path / "m" / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert _tokens(tmp_path / "m") == expected.outputs[0].token_ids


@pytest.mark.parametrize("load_format", ["auto", "pt"])
def test_pytorch_bin(source, tmp_path, load_format):
    src, expected = source
    state = _copy_without_weights(src, tmp_path / "m")
    torch.save(state, tmp_path / "m" / "pytorch_model.bin")
    assert _tokens(tmp_path / "m", load_format=load_format) == expected.outputs[0].token_ids


def test_missing_tensor_is_named(source, tmp_path):
    src, _ = source
    state = _copy_without_weights(src, tmp_path / "m")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        LLM(model=str(tmp_path / "m"))


def test_misshaped_tensor_is_named(source, tmp_path):
    src, _ = source
    state = _copy_without_weights(src, tmp_path / "m")
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        LLM(model=str(tmp_path / "m"))


def test_no_weights_is_a_clear_error(source, tmp_path):
    src, _ = source
    _copy_without_weights(src, tmp_path / "m")
    with pytest.raises(ValueError, match="no weights"):
        LLM(model=str(tmp_path / "m"), load_format="safetensors")


def test_dummy_weights_are_seeded(source):
    src, _ = source
    a = _tokens(src, load_format="dummy", seed=3)
    assert a == _tokens(src, load_format="dummy", seed=3) and len(a) == 8


def test_unknown_architecture_lists_supported(source, tmp_path):
    src, _ = source
    shutil.copytree(src, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(model=str(tmp_path / "m"))
