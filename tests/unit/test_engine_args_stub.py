"""``pagedllm/_engine_args.pyi`` (what type checkers see of the generated ``EngineArgs``)
matches the options: oracle, the stub rendered afresh from ``pagedllm/config.py`` and the
runtime dataclass's own fields."""
import dataclasses
import importlib.util
from pathlib import Path

from pagedllm.arg_utils import EngineArgs

REPO = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_stub", REPO / "scripts" /
                                                  "gen_engine_args_stub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_stub_is_up_to_date():
    gen = _generator()
    assert gen.STUB.read_text() == gen.render(), \
        "stale: run python scripts/gen_engine_args_stub.py"


def test_the_stub_declares_every_field_in_order():
    lines = (REPO / "pagedllm" / "_engine_args.pyi").read_text().splitlines()
    declared = [line.split(":")[0].strip() for line in lines
                if line.startswith("    ") and ": " in line]
    assert declared == [f.name for f in dataclasses.fields(EngineArgs)]
