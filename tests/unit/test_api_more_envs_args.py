"""VLLM_TORCH_PROFILER_DIR and VLLM_ALLOW_RUNTIME_LORA_UPDATING honoured (issue 20 items 5, 6,
10) and the JSON form of --lora-modules, read as vLLM 0.6.3 reads them."""
import argparse
import os

import pytest

from pagedllm import envs
from pagedllm.entrypoints.openai.cli_args import add_server_args, parse_lora_module


def test_profiler_dir_and_lora_updating_are_honoured():
    """vLLM 0.6.3 envs.py: ``"VLLM_TORCH_PROFILER_DIR": lambda: (None if
    os.getenv("VLLM_TORCH_PROFILER_DIR", None) is None else os.path.expanduser(...))`` and
    ``"VLLM_ALLOW_RUNTIME_LORA_UPDATING": ... .strip().lower() in ("1", "true")``; both add
    routes in api_server.py, so start-up accepts them now."""
    environ = {"VLLM_TORCH_PROFILER_DIR": "~/traces", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    findings = envs.check_server_environment(environ)
    assert {f.var.action for f in findings} == {envs.HONOURED}
    assert envs.torch_profiler_dir(environ) == os.path.expanduser("~/traces")
    assert envs.torch_profiler_dir({"VLLM_TORCH_PROFILER_DIR": ""}) is None
    assert envs.torch_profiler_dir({}) is None
    assert envs.torch_profiler_dir({"VLLM_TORCH_PROFILER_DIR": "a",
                                    "PAGEDLLM_TORCH_PROFILER_DIR": "/b"}) == "/b"
    assert envs.allow_runtime_lora_updating(environ)
    assert envs.allow_runtime_lora_updating({"PAGEDLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"})
    assert not envs.allow_runtime_lora_updating({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "0"})
    assert not envs.allow_runtime_lora_updating({})


def test_lora_modules_both_forms():
    """vLLM 0.6.3 cli_args.py LoRAParserAction: ``if '=' in item and ',' not in item:  # Old
    format: name=path`` else ``LoRAModulePath(**json.loads(item))`` with fields name, path,
    base_model_name."""
    args = add_server_args(argparse.ArgumentParser()).parse_args([
        "--lora-modules", "a=/p/a",
        '{"name": "b", "path": "/p/b", "base_model_name": "tiny"}',
        '{"name": "c", "path": "/p/c"}'])
    assert args.lora_modules == [("a", "/p/a"), ("b", "/p/b", "tiny"), ("c", "/p/c")]


@pytest.mark.parametrize("text, message", [
    ("{not json", "Invalid JSON format for --lora-modules"),
    ('{"name": "a", "path": "/p", "rank": 8}', "unknown field(s) rank"),
    ('{"name": "a"}', "path must be non-empty strings"),
    ('{"name": "a", "path": "/p", "base_model_name": 3}', "base_model_name must be a string"),
    ('["a", "/p"]', "expected NAME=PATH or a JSON object"),
])
def test_bad_lora_modules_name_the_problem(text, message):
    """vLLM 0.6.3: ``parser.error(f"Invalid JSON format for --lora-modules: {item}")`` and
    ``f"Invalid fields for --lora-modules: {item} - {str(e)}"``."""
    with pytest.raises(argparse.ArgumentTypeError, match=message.replace("(", r"\(")
                       .replace(")", r"\)").replace("[", r"\[")):
        parse_lora_module(text)
