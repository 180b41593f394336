"""The engine-core process's configuration without transformers (`pagedllm.models.plain_config`).

Oracles:
1. Every tiny architecture of the model tests builds the same model from the plain snapshot as
   from the transformers config: the same parameter names, shapes and dtypes, equal buffers
   (rotary tables, ...) and equal plain attributes on every module (eps, scales, windows,
   soft caps, activation names).
2. An engine built in a fresh interpreter from the pickled plain configuration gives the same
   greedy tokens as one built from the transformers configuration here, and never imports
   transformers.
"""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pagedllm.models.plain_config import PlainConfig, to_plain


def _all_configs() -> dict:
    from tests.models import (test_deepseek_models, test_dense_models_more,
                              test_dense_models_new, test_moe_models)
    from tests.utils import tiny_models
    configs = dict(tiny_models._configs())
    for module in (test_moe_models, test_deepseek_models, test_dense_models_new,
                   test_dense_models_more):
        for name, config in {**module._configs(), **module._variant_configs()}.items():
            configs[f"{module.__name__.rsplit('_', 1)[-1]}:{name}"] = config
    return configs


CONFIGS = _all_configs()


def _with_architecture(config):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not getattr(config, "architectures", None):
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    return config


def _plain_attributes(module: torch.nn.Module) -> dict:
    """A module's attributes that are plain values (configs and tensors left out)."""
    kept = {}
    for key, value in vars(module).items():
        if key.startswith("_") or isinstance(value, (torch.Tensor, torch.nn.Module)):
            continue
        if isinstance(value, (bool, int, float, str, type(None), tuple, list, torch.dtype)):
            kept[key] = value
    return kept


def _build(config):
    from pagedllm.models.registry import resolve_model_class
    torch.manual_seed(0)
    return resolve_model_class(config.architectures)(config, 256)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_plain_snapshot_builds_the_same_model(name):
    config = _with_architecture(CONFIGS[name])
    plain = pickle.loads(pickle.dumps(to_plain(config)))
    assert isinstance(plain, PlainConfig)
    reference, rebuilt = _build(config), _build(plain)
    ref_params = {k: (v.shape, v.dtype) for k, v in reference.named_parameters()}
    assert ref_params == {k: (v.shape, v.dtype) for k, v in rebuilt.named_parameters()}
    ref_buffers, new_buffers = dict(reference.named_buffers()), dict(rebuilt.named_buffers())
    assert ref_buffers.keys() == new_buffers.keys()
    for key, buffer in ref_buffers.items():
        assert torch.equal(buffer, new_buffers[key]), key
    new_modules = dict(rebuilt.named_modules())
    for key, module in reference.named_modules():
        assert _plain_attributes(module) == _plain_attributes(new_modules[key]), key


def test_snapshot_keeps_properties_aliases_and_nested_configs():
    from transformers import DeepseekV3Config, Gemma3Config
    deepseek = to_plain(DeepseekV3Config(n_routed_experts=8))
    assert deepseek.num_local_experts == 8  # an attribute_map alias
    assert deepseek.model_type == "deepseek_v3"  # a class attribute
    assert deepseek.rope_scaling == DeepseekV3Config(n_routed_experts=8).rope_scaling
    gemma = to_plain(Gemma3Config())
    assert isinstance(gemma.text_config, PlainConfig)
    assert gemma.get_text_config().model_type == "gemma3_text"
    assert "model_type" in json.dumps(gemma.to_dict(), default=str)
    with pytest.raises(AttributeError, match="no attribute 'not_a_field'"):
        _ = gemma.not_a_field
    assert _modules_in(pickle.dumps({"c": to_plain(Gemma3Config())})) == \
        {"pagedllm.models.plain_config"}


def _modules_in(data: bytes) -> set[str]:
    """The modules an unpickling of ``data`` imports classes from."""
    import io
    seen: set[str] = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add(module)
            return super().find_class(module, name)
    Recorder(io.BytesIO(data)).load()
    return seen


_CHILD = """
import pickle, sys
config = pickle.loads(open(sys.argv[1], "rb").read())
from pagedllm.engine.engine import LLMEngine
from pagedllm.sampling_params import SamplingParams
engine = LLMEngine(config)
params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
engine.add_request("0", {"prompt_token_ids": [5, 9, 13, 17, 21]}, params)
tokens = []
while engine.has_unfinished_requests():
    for out in engine.step():
        if out.finished:
            tokens = list(out.outputs[0].token_ids)
print(tokens, sorted(m for m in sys.modules if m.split(".")[0] == "transformers")[:3])
"""


def test_engine_from_the_plain_configuration_in_a_fresh_process(tmp_path):
    from pagedllm.arg_utils import EngineArgs
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.sampling_params import SamplingParams
    from tests.utils.tiny_models import build_tiny_model
    args = EngineArgs(model=str(build_tiny_model("gemma2")), dtype="float32",
                      skip_tokenizer_init=True, disable_log_stats=True)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = LLM.from_engine_args(args).generate(
        prompt_token_ids=[[5, 9, 13, 17, 21]], sampling_params=params, use_tqdm=False)
    path = tmp_path / "config.pkl"
    path.write_bytes(pickle.dumps(args.create_engine_config()))
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True,
                         text=True, cwd=root, timeout=300,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == \
        f"{list(expected[0].outputs[0].token_ids)} []"


def _load(path, **kw):
    from pagedllm.models.hf_config import load_hf_config
    return load_hf_config(str(path), model=str(path), revision=kw.get("revision"),
                          trust_remote_code=kw.get("trust_remote_code", False),
                          code_revision=None)


def test_config_cache_reads_back_the_same_snapshot(tmp_path, monkeypatch):
    """The second load of a config.json comes from the cache (transformers not called), equal
    to the first; another config.json, revision or a damaged entry is built again; the
    cache can be turned off; a config with its own code is never cached."""
    from pagedllm.models import hf_config
    from tests.utils.tiny_models import build_tiny_model
    monkeypatch.setenv("PAGEDLLM_CACHE_ROOT", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    source = build_tiny_model("gemma2") / "config.json"
    (model / "config.json").write_bytes(source.read_bytes())
    first = _load(model)
    entries = list((tmp_path / "cache" / "configs").glob("*.pkl"))
    assert len(entries) == 1
    built = []
    real = hf_config._transformers_config
    monkeypatch.setattr(hf_config, "_transformers_config",
                        lambda *a, **kw: built.append(1) or real(*a, **kw))
    again = _load(model)
    assert built == [] and again.to_dict() == first.to_dict()
    assert again._plain_aliases == first._plain_aliases
    _load(model, revision="other")
    assert built == [1]
    entries[0].write_bytes(b"not a pickle")
    assert _load(model).to_dict() == first.to_dict() and built == [1, 1]
    raw = json.loads(source.read_text())
    (model / "config.json").write_text(json.dumps({**raw, "rms_norm_eps": 1e-3}))
    assert _load(model).rms_norm_eps == 1e-3 and built == [1, 1, 1]
    monkeypatch.setenv("PAGEDLLM_CONFIG_CACHE", "0")
    (model / "config.json").write_text(json.dumps({**raw, "rms_norm_eps": 1e-4}))
    _load(model)
    assert len(list((tmp_path / "cache" / "configs").glob("*.pkl"))) == 3
    monkeypatch.setenv("PAGEDLLM_CONFIG_CACHE", "sometimes")
    with pytest.raises(ValueError, match="PAGEDLLM_CONFIG_CACHE='sometimes': choose from"):
        _load(model)


def test_config_cache_refuses_other_classes(tmp_path, monkeypatch):
    """Entries are pickles: one naming any class but PlainConfig (and torch dtypes) is not
    loaded."""
    from pagedllm.models import config_cache
    monkeypatch.setenv("PAGEDLLM_CACHE_ROOT", str(tmp_path))
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "k.pkl").write_bytes(pickle.dumps(Path("/")))
    assert config_cache.load("k") is None
    config_cache.store("k", PlainConfig("X", {"dtype": torch.bfloat16, "n": {1, 2}}, ()))
    assert config_cache.load("k").dtype is torch.bfloat16


def test_a_cached_configuration_needs_no_transformers(tmp_path):
    """``pagedllm serve``'s resolution with a warm cache imports no transformers (the front
    end sends the result at once; the core never needed it)."""
    from tests.utils.tiny_models import build_tiny_model
    root = Path(__file__).resolve().parents[2]
    code = ("import sys\nfrom pagedllm.arg_utils import EngineArgs\n"
            f"EngineArgs(model={str(build_tiny_model('llama'))!r}, skip_tokenizer_init=True)"
            ".create_engine_config()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers')[:2])")
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin",
           "PAGEDLLM_CACHE_ROOT": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=root, timeout=300, env=env) for _ in range(2)]
    assert all(run.returncode == 0 for run in runs), runs[-1].stderr[-2000:]
    assert runs[0].stdout.split()[-1] != "[]" and runs[1].stdout.strip() == "[]"
