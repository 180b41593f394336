"""The ``PAGEDLLM_*`` switches (issue 21 item 2): read in ``pagedllm/switches.py`` only,
parsed as documented there, and an unknown value is a ValueError naming the variable.
Oracles: the documented defaults and choices, and the AST of every module (no other module
reads a switch from the environment)."""
import ast
from pathlib import Path

import pytest

from pagedllm.switches import Switches

PKG = Path(__file__).resolve().parents[2] / "pagedllm"
NAMES = ("PAGEDLLM_DISABLE_FUSED_OPS", "PAGEDLLM_GEMV", "PAGEDLLM_PDL", "PAGEDLLM_DECODE_FOLD",
         "PAGEDLLM_ASYNC_OUTPUT_PROC", "PAGEDLLM_W4_MMA", "PAGEDLLM_MOE_ROUTED",
         "PAGEDLLM_DECODE_ROPE")


def test_defaults_are_the_tuned_behaviour():
    assert Switches.from_env({}) == Switches(fused_ops=True, gemv="tuned", pdl=True,
                                             decode_fold=True, async_output_proc=False,
                                             w4_mma=True, moe_routed=False, decode_rope=False)


def test_each_switch_parses_as_documented():
    got = Switches.from_env({"PAGEDLLM_DISABLE_FUSED_OPS": "1", "PAGEDLLM_GEMV": "off",
                             "PAGEDLLM_PDL": "0", "PAGEDLLM_DECODE_FOLD": "0",
                             "PAGEDLLM_ASYNC_OUTPUT_PROC": "1", "PAGEDLLM_W4_MMA": "0",
                             "PAGEDLLM_MOE_ROUTED": "1", "PAGEDLLM_DECODE_ROPE": "1"})
    assert got == Switches(False, "off", False, False, True, False, True, True)
    with pytest.raises(ValueError, match="PAGEDLLM_W4_MMA"):
        Switches.from_env({"PAGEDLLM_W4_MMA": "yes"})
    with pytest.raises(ValueError, match="PAGEDLLM_MOE_ROUTED"):
        Switches.from_env({"PAGEDLLM_MOE_ROUTED": "on"})
    with pytest.raises(ValueError, match="PAGEDLLM_DECODE_ROPE"):
        Switches.from_env({"PAGEDLLM_DECODE_ROPE": "yes"})
    assert Switches.from_env({"PAGEDLLM_GEMV": "all"}).gemv == "all"
    assert Switches.from_env({"PAGEDLLM_ASYNC_OUTPUT_PROC": "0"}).async_output_proc is False


def test_an_unknown_gemv_mode_names_the_variable():
    with pytest.raises(ValueError, match="PAGEDLLM_GEMV='fast': choose from tuned, off, all"):
        Switches.from_env({"PAGEDLLM_GEMV": "fast"})


def test_no_other_module_reads_a_switch():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "switches.py" and path.parent == PKG:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and node.value in NAMES:
                bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.value}")
    assert not bad, "read them through pagedllm.switches:\n" + "\n".join(bad)
