"""The generated parser, the `pagedllm` subcommands and the README flag table."""

import argparse
import importlib.util
import logging
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
from transformers import LlamaConfig

from pagedllm import arg_utils, cli, config
from pagedllm.arg_utils import EngineArgs, flags_markdown_table
from pagedllm.config import engine_option_fields, field_default, flag_name, option_fields
from pagedllm.entrypoints.openai.cli_args import ServerConfig, make_arg_parser

REPO = Path(__file__).parents[2]
SPEC = REPO.parent / "shared/spec/engine-args.zh.md"
SERVER_FLAGS = ["--host", "--port", "--api-key", "--chat-template", "--response-role",
                "--allowed-origins", "--root-path", "--ssl-keyfile", "--ssl-certfile",
                "--uvicorn-log-level", "--max-log-len", "--return-tokens-as-token-ids",
                "--lora-modules", "--prompt-adapters", "--enable-auto-tool-choice",
                "--tool-call-parser", "--disable-frontend-multiprocessing",
                "--disable-log-requests", "--served-model-name"]


@pytest.fixture(autouse=True)
def _cpu_only(monkeypatch):
    monkeypatch.setattr(config, "cuda_backend_available", lambda: False)
    monkeypatch.setattr(arg_utils, "cuda_backend_available", lambda: False)


def _serve_parser():
    return make_arg_parser(argparse.ArgumentParser(prog="serve", exit_on_error=False))


def _fields_by_flag():
    classes = list(config.ENGINE_CONFIG_CLASSES.values()) + [ServerConfig]
    out = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in option_fields(cls):
            for name in (flag_name(f.name), *f.metadata.get("aliases", ())):
                out[name] = (f, hints[f.name])
    return out


def _sample_argv(flag, f, tp):
    """Command-line words that set `flag` to some valid value."""
    md, default = f.metadata, field_default(f)
    base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    if default is True and not md.get("deprecated"):
        return [flag, "false"]
    if isinstance(default, bool) or f.name in ("enable_chunked_prefill",
                                               "disable_logprobs_during_spec_decoding"):
        return [flag]
    if md.get("choices"):
        return [flag, str(md["choices"][-1])]
    cli_type = md.get("cli_type")
    samples = {"json": '{"a": 1}', "kv_int": "image=2"}
    if cli_type in samples:
        return [flag, samples[cli_type]]
    if f.name in ("allowed_origins", "allowed_methods", "allowed_headers"):
        return [flag, '["x"]']
    if f.name in ("lora_modules", "prompt_adapters"):
        return [flag, "a=/p"]
    return [flag, {float: "0.5", int: "3"}.get(base, "x")]


def _spec_flags():
    if not SPEC.is_file():
        pytest.skip(f"spec file {SPEC} not found (it lives in the shared folder beside the repo)")
    return sorted(set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*[a-z0-9])", SPEC.read_text())))


def test_every_spec_flag_parses():
    flags, by_flag, parser = _spec_flags(), _fields_by_flag(), _serve_parser()
    assert len(flags) > 90
    for flag in flags:
        assert flag in by_flag, f"{flag} from the spec has no option"
        f, tp = by_flag[flag]
        args = parser.parse_args(_sample_argv(flag, f, tp))
        assert getattr(args, f.name) != field_default(f) or f.name == "use_v2_block_manager", flag
    declared = {flag_name(f.name) for f in engine_option_fields()}
    assert declared <= set(flags), "engine options missing from the spec"


def test_parser_defaults_equal_engine_args_defaults():
    args = _serve_parser().parse_args([])
    assert EngineArgs.from_cli_args(args).to_dict() == EngineArgs().to_dict()


def test_value_parsing():
    parser = _serve_parser()
    a = parser.parse_args(["-tp", "2", "-pp", "3", "-q", "awq", "-spec-draft-tp", "1",
                           "--rope-scaling", '{"type":"dynamic","factor":2.0}',
                           "--limit-mm-per-prompt", "image=16,video=2",
                           "--served-model-name", "a", "b", "--ignore-patterns", "x/*",
                           "--ignore-patterns", "y/*", "--enable-chunked-prefill",
                           "--multi-step-stream-outputs", "false", "--lora-modules", "l=/p"])
    assert (a.tensor_parallel_size, a.pipeline_parallel_size, a.quantization) == (2, 3, "awq")
    assert a.speculative_draft_tensor_parallel_size == 1
    assert a.rope_scaling == {"type": "dynamic", "factor": 2.0}
    assert a.limit_mm_per_prompt == {"image": 16, "video": 2}
    assert a.served_model_name == ["a", "b"] and a.ignore_patterns == ["x/*", "y/*"]
    assert a.enable_chunked_prefill is True and a.multi_step_stream_outputs is False
    assert a.lora_modules == [("l", "/p")]
    assert parser.parse_args(["--quantization", "None"]).quantization is None
    assert parser.parse_args(["--enable-chunked-prefill", "false"]).enable_chunked_prefill is False
    for bad in (["--rope-scaling", "{bad"], ["--block-size", "7"], ["--limit-mm-per-prompt", "x"]):
        with pytest.raises((argparse.ArgumentError, SystemExit)):
            parser.parse_args(bad)


def test_serve_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for f in engine_option_fields():
        assert flag_name(f.name) in out, f.name
    for flag in SERVER_FLAGS:
        assert flag in out, flag
    assert "demo_model" in out and "not yet: LoRA adapters" in out


def test_serve_help_lists_every_architecture(capsys):
    from pagedllm.models.registry import supported_architectures
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at spaces
    assert "Supported architectures" in out
    for architecture in supported_architectures():
        assert architecture in out, architecture


def test_python_dash_m_runs():
    result = subprocess.run([sys.executable, "-m", "pagedllm", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "serve" in result.stdout and "generate" in result.stdout


def test_serve_without_server_module(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "SERVER_MODULE", "pagedllm.entrypoints.openai.no_such_server")
    assert cli.main(["serve", str(tmp_path)]) == 1
    assert "not built yet (issue #4)" in capsys.readouterr().err


def test_serve_without_a_server_package_stops_before_configuring(monkeypatch, capsys,
                                                                 tmp_path):
    """A missing serve dependency is reported before the engine core gets its arguments (it
    would load the model for nothing)."""
    from pagedllm.engine.core_client import MPCoreClient
    monkeypatch.setattr(cli, "_SERVE_DEPS", ("no_such_package_xyz",))
    monkeypatch.setattr(MPCoreClient, "start_with_args",
                        lambda *a: pytest.fail("configured before the check"))
    assert cli.main(["serve", str(tmp_path)]) == 1
    assert "needs no_such_package_xyz; install the serve extra" in capsys.readouterr().err


def test_serve_calls_run_server_with_model_tag(monkeypatch):
    calls = []
    fake = types.ModuleType("fake_api_server")
    fake.run_server = lambda args, core_client=None: calls.append((args, core_client))
    monkeypatch.setitem(sys.modules, "fake_api_server", fake)
    monkeypatch.setattr(cli, "SERVER_MODULE", "fake_api_server")
    from pagedllm.engine.core_client import MPCoreClient
    resolved = []
    monkeypatch.setattr(MPCoreClient, "start_with_args",
                        lambda self, engine_args: resolved.append(engine_args.model))
    assert cli.main(["serve", "my/model", "--model", "other", "--port", "9000"]) == 0
    args, core = calls[0]
    assert args.model == "my/model" and args.port == 9000
    # the engine core process was started before the imports, handed the arguments before
    # the server module was imported, then handed to the server; main stopped it since
    # nothing (here) configured it
    assert resolved == ["my/model"]
    assert core is not None and not core.configured
    assert not core.proc.is_alive()


def test_serve_starts_no_core_process_for_the_thread_engine_or_help(monkeypatch):
    assert cli._prestart_core(["serve", "--disable-frontend-multiprocessing"]) is None
    assert cli._prestart_core(["serve", "--help"]) is None
    assert cli._prestart_core(["generate", "--prompt", "x"]) is None


def test_serve_rejects_not_built_flags(capsys):
    assert cli.main(["serve", "--speculative-model", "facebook/opt-125m"]) == 2
    assert "--speculative-model facebook/opt-125m is not supported yet" in \
        capsys.readouterr().err
    assert cli.main(["serve", "--lora-modules", "a=/b"]) == 2
    assert "--lora-modules" in capsys.readouterr().err


class _FakeLLM:
    instances = []

    def __init__(self, engine_args):
        self.engine_args = engine_args
        self.chats = []
        _FakeLLM.instances.append(self)

    @classmethod
    def from_engine_args(cls, engine_args):
        return cls(engine_args)

    @staticmethod
    def _out(text):
        return types.SimpleNamespace(outputs=[types.SimpleNamespace(text=text)])

    def generate(self, prompts, params):
        self.params = params
        return [self._out(p.upper()) for p in prompts]

    def chat(self, messages, params):
        self.chats.append([dict(m) for m in messages])
        return [self._out(f"reply {len(self.chats)}")]


@pytest.fixture
def fake_llm(monkeypatch):
    module = types.ModuleType("pagedllm.entrypoints.llm")
    module.LLM = _FakeLLM
    monkeypatch.setitem(sys.modules, "pagedllm.entrypoints.llm", module)
    _FakeLLM.instances.clear()
    return _FakeLLM


def test_generate(fake_llm, capsys):
    assert cli.main(["generate", "--prompt", "hi", "--prompt", "yo", "--max-tokens", "5",
                     "--temperature", "0", "--block-size", "8"]) == 0
    llm = fake_llm.instances[0]
    assert llm.engine_args.model == str(cli.DEMO_MODEL_DIR) and llm.engine_args.block_size == 8
    assert (llm.params.max_tokens, llm.params.temperature, llm.params.top_p) == (5, 0.0, 1.0)
    out = capsys.readouterr().out
    assert "Prompt: 'hi'" in out and "Completion: 'HI'" in out and "Completion: 'YO'" in out


def test_generate_model_tag_and_startup_error(fake_llm, capsys):
    assert cli.main(["generate", "some/model"]) == 0
    assert fake_llm.instances[0].engine_args.model == "some/model"
    assert cli.main(["generate", "--model", "m", "--device", "tpu"]) == 2
    assert "--device tpu is not supported yet" in capsys.readouterr().err


def test_chat(fake_llm, monkeypatch, capsys):
    lines = iter(["hello", "", "again", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["chat", "--system-prompt", "be brief"]) == 0
    chats = fake_llm.instances[0].chats
    assert [m["role"] for m in chats[1]] == ["system", "user", "assistant", "user"]
    assert chats[1][2]["content"] == "reply 1"
    assert "assistant> reply 2" in capsys.readouterr().out


def test_deprecated_cli_flag_warns_once(tmp_path, caplog):
    LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                num_hidden_layers=1, vocab_size=50, max_position_embeddings=64).save_pretrained(
                    tmp_path)
    args = _serve_parser().parse_args(["--model", str(tmp_path), "--use-v2-block-manager"])
    with caplog.at_level(logging.WARNING, logger="pagedllm"):
        EngineArgs.from_cli_args(args).create_engine_config()
    assert sum("--use-v2-block-manager" in r.getMessage() for r in caplog.records) == 1


def _load_update_script():
    spec = importlib.util.spec_from_file_location("update_flag_table",
                                                  REPO / "scripts/update_flag_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flags_table_has_every_flag():
    table = flags_markdown_table()
    rows = table.strip().splitlines()[2:]
    assert len(rows) == len(list(engine_option_fields()))
    assert "| `--block-size` `{8,16,32}` | `16` | works |" in table
    assert "not yet: LoRA adapters" in table and "not yet: draft models" in table


def test_update_flag_table_script(tmp_path):
    script = _load_update_script()
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- flags:start -->\nold\n<!-- flags:end -->\ntail\n")
    assert script.main(["--check", "--readme", str(readme)]) == 1
    assert script.main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    assert flags_markdown_table() in text and text.endswith("<!-- flags:end -->\ntail\n")
    assert script.main(["--check", "--readme", str(readme)]) == 0
    readme.write_text("no markers\n")
    assert script.main(["--check", "--readme", str(readme)]) == 2


def test_repo_readme_table_is_current():
    readme = REPO / "README.md"
    if not readme.is_file() or "<!-- flags:start -->" not in readme.read_text():
        pytest.skip("README.md with flag markers not created yet")
    assert _load_update_script().main(["--check", "--readme", str(readme)]) == 0, \
        "README flag table is stale: run python scripts/update_flag_table.py"
