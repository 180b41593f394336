"""pagedllm.envs: vLLM 0.6.3's environment variables, honoured, refused or warned about at
server start-up, in both VLLM_* and PAGEDLLM_* spellings (issue 20, item 5)."""
import argparse
import logging
from types import SimpleNamespace

import pytest

from pagedllm import cli, envs
from pagedllm.entrypoints.openai.cli_args import add_server_args, server_config_from_args
from pagedllm.models.hf_config import derive_max_model_len
from tests.utils.tiny_models import build_tiny_model


def test_switches_read_as_vllm_reads_them():
    """vLLM 0.6.3 envs.py: ``os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0")
    .strip().lower() in ("1", "true")``."""
    assert [envs.is_true(v) for v in ("1", " TRUE ", "true", "0", "false", "yes", None)] == \
        [True, True, True, False, False, False, False]
    assert envs.allow_long_max_model_len({"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "True"})
    assert not envs.allow_long_max_model_len({"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "0"})


def test_pagedllm_spelling_wins():
    environ = {"VLLM_API_KEY": "a", "PAGEDLLM_API_KEY": "b"}
    assert envs.api_key(environ) == "b" and envs.api_key({"VLLM_API_KEY": "a"}) == "a"
    assert envs.api_key({}) is None and envs.api_key({"VLLM_API_KEY": ""}) is None


@pytest.mark.parametrize("environ, named", [
    ({"VLLM_USE_MODELSCOPE": "True"}, "VLLM_USE_MODELSCOPE"),
    ({"VLLM_PLUGINS": "my_plugin"}, "VLLM_PLUGINS"),
])
def test_unsupported_features_fail_at_start_up(environ, named):
    """Features pagedllm does not have (ModelScope downloads, vLLM plugins): refused."""
    with pytest.raises(ValueError, match=f"{named} is set, but pagedllm does not support"):
        envs.check_server_environment(environ)


def test_switched_off_features_start():
    findings = envs.check_server_environment({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "0",
                                              "VLLM_API_KEY": "k", "HOME": "/root"})
    assert sorted(f.spelling for f in findings) == ["VLLM_ALLOW_RUNTIME_LORA_UPDATING",
                                                    "VLLM_API_KEY"]


def test_start_up_log_names_each_variable(caplog):
    findings = envs.read_environment({"VLLM_API_KEY": "secret-value", "VLLM_RPC_TIMEOUT": "5",
                                      "VLLM_NOT_A_THING": "1", "PAGEDLLM_GEMV": "off"})
    with caplog.at_level(logging.INFO, logger="pagedllm.envs"):
        envs.log_environment(findings)
    text = caplog.text
    assert "read VLLM_API_KEY: honoured" in text and "secret-value" not in text
    assert "VLLM_RPC_TIMEOUT is set, but pagedllm has no counterpart" in text
    assert "VLLM_NOT_A_THING is set but is not a vLLM 0.6.3 variable" in text
    assert "PAGEDLLM_GEMV" not in text  # pagedllm's own variables are not vLLM's
    levels = {r.getMessage().split()[0]: r.levelno for r in caplog.records}
    assert levels["VLLM_RPC_TIMEOUT"] == logging.WARNING


def _server_args(argv):
    return add_server_args(argparse.ArgumentParser()).parse_args(argv)


def test_vllm_api_key_fills_the_server_config(monkeypatch):
    """vLLM 0.6.3 api_server.py: ``if token := envs.VLLM_API_KEY or args.api_key:``."""
    assert server_config_from_args(_server_args([])).api_key is None
    monkeypatch.setenv("VLLM_API_KEY", "env-key")
    assert server_config_from_args(_server_args([])).api_key == "env-key"
    assert server_config_from_args(_server_args(["--api-key", "flag"])).api_key == "env-key"


def test_serve_refuses_plugins(monkeypatch, capsys):
    monkeypatch.setenv("VLLM_PLUGINS", "my_plugin")
    assert cli.main(["serve", str(build_tiny_model("llama"))]) == 2
    assert "VLLM_PLUGINS is set, but pagedllm does not support it yet" \
        in capsys.readouterr().err


def test_allow_long_max_model_len(monkeypatch):
    """vLLM 0.6.3 envs.py: "If the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN is set, it allows
    the user to specify a max sequence length greater than the max length derived from the
    model's config.json": a warning, not an error."""
    hf_config = SimpleNamespace(max_position_embeddings=64)
    with pytest.raises(ValueError):
        derive_max_model_len(hf_config, 128, False)
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    assert derive_max_model_len(hf_config, 128, False) == 128
