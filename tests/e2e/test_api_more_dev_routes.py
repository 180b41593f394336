"""vLLM 0.6.3's development routes on a real server (issue 20 items 6 and 10): the torch
profiler (/start_profile, /stop_profile under VLLM_TORCH_PROFILER_DIR) and runtime LoRA
(/v1/load_lora_adapter, /v1/unload_lora_adapter under VLLM_ALLOW_RUNTIME_LORA_UPDATING), plus
the JSON form of --lora-modules. LoRA outputs are checked against offline ``LLM.generate``
with the same adapter (tests/e2e/test_lora.py checks that against HF + PEFT)."""
import gzip
import json

import httpx
import pytest

from pagedllm import LLM, LoRARequest, SamplingParams
from tests.utils.server import RemoteServer
from tests.utils.tiny_models import build_tiny_model

MODEL = "tiny"
PROMPT = "The for statement"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model_path():
    return str(build_tiny_model("llama"))


def post(server, path, body=None):
    return httpx.post(server.url + path, json=body, timeout=60)


def _complete(server, model):
    return post(server, "/v1/completions", {"model": model, "prompt": PROMPT,
                                            "max_tokens": MAX_TOKENS, "temperature": 0})


@pytest.mark.parametrize("in_process", [False, True], ids=["core-process", "engine-thread"])
def test_profiler_writes_a_trace(model_path, tmp_path, monkeypatch, in_process):
    """vLLM 0.6.3 api_server.py: ``if envs.VLLM_TORCH_PROFILER_DIR:`` adds ``@router.post(
    "/start_profile")`` / ``"/stop_profile"``, each ``return Response(status_code=200)``; the
    worker's ``torch.profiler.profile(..., with_stack=True, on_trace_ready=torch.profiler.
    tensorboard_trace_handler(torch_profiler_trace_dir, use_gzip=True))`` writes the trace at
    ``self.profiler.stop()``. Here the profiler runs in the engine core (its process, or the
    engine thread with --disable-frontend-multiprocessing)."""
    trace_dir = tmp_path / "traces"
    monkeypatch.setenv("VLLM_TORCH_PROFILER_DIR", str(trace_dir))
    args = ["--served-model-name", MODEL, "--max-model-len", "128"]
    args += ["--disable-frontend-multiprocessing"] if in_process else []
    with RemoteServer(model_path, args) as server:
        stop_first = post(server, "/stop_profile")
        assert stop_first.status_code == 400 and "not running" in stop_first.json()["message"]
        start = post(server, "/start_profile")
        assert start.status_code == 200 and start.content == b""
        assert post(server, "/start_profile").status_code == 400  # already running
        assert _complete(server, MODEL).status_code == 200
        assert post(server, "/stop_profile").status_code == 200
        traces = sorted(trace_dir.glob("*.pt.trace.json.gz"))
        assert len(traces) == 1, list(trace_dir.iterdir())
        events = json.loads(gzip.decompress(traces[0].read_bytes()))["traceEvents"]
        assert any("aten::" in str(e.get("name", "")) for e in events)  # the model ran
        assert _complete(server, MODEL).status_code == 200  # serving goes on


@pytest.fixture(scope="module")
def loras(model_path, tmp_path_factory):
    from tests.e2e.test_lora import _make_lora
    root = tmp_path_factory.mktemp("dev-loras")
    return {"static": _make_lora(model_path, root / "static", 11, ["q_proj", "v_proj"]),
            "dyn": _make_lora(model_path, root / "dyn", 12, ["o_proj", "down_proj"])}


@pytest.fixture(scope="module")
def offline_texts(model_path, loras):
    llm = LLM(model=model_path, max_model_len=128, enable_lora=True, max_lora_rank=16)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    texts = {None: llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].text}
    for i, (name, path) in enumerate(loras.items(), start=1):
        out = llm.generate([PROMPT], params, use_tqdm=False,
                           lora_request=LoRARequest(name, i, path))
        texts[name] = out[0].outputs[0].text
    assert len(set(texts.values())) == 3  # the adapters change the output
    return texts


@pytest.fixture(scope="module")
def lora_server(model_path, loras):
    module = json.dumps({"name": "static", "path": loras["static"], "base_model_name": MODEL})
    args = ["--served-model-name", MODEL, "--max-model-len", "128", "--enable-lora",
            "--max-lora-rank", "16", "--lora-modules", module]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "true")
        with RemoteServer(model_path, args) as server:
            yield server


def test_json_lora_module_serves_and_lists(lora_server, offline_texts, loras):
    """vLLM 0.6.3 serving_engine.py: ``LoRARequest(lora_name=lora.name, ..., base_model_name=
    lora.base_model_name if lora.base_model_name and self._is_model_supported(...) else
    self.base_model_paths[0].name)``; /v1/models shows ``ModelCard(id=lora.lora_name, root=
    lora.local_path, parent=lora.base_model_name ...)``."""
    cards = {c["id"]: c for c in httpx.get(lora_server.url + "/v1/models").json()["data"]}
    assert cards["static"]["parent"] == MODEL and cards["static"]["root"] == loras["static"]
    response = _complete(lora_server, "static")
    assert response.json()["choices"][0]["text"] == offline_texts["static"]


def test_load_and_unload_at_runtime(lora_server, offline_texts, loras):
    """vLLM 0.6.3 serving_engine.py ``load_lora_adapter``: ``return f"Success: LoRA adapter
    '{lora_name}' added successfully."`` (api_server: ``Response(status_code=200, content=
    response)``); ``unload_lora_adapter`` removes it by name: ``f"Success: LoRA adapter
    '{lora_name}' removed successfully."``; afterwards the name is an unknown model (404)."""
    assert _complete(lora_server, "dyn").status_code == 404
    loaded = post(lora_server, "/v1/load_lora_adapter",
                  {"lora_name": "dyn", "lora_path": loras["dyn"]})
    assert loaded.status_code == 200
    assert loaded.text == "Success: LoRA adapter 'dyn' added successfully."
    assert _complete(lora_server, "dyn").json()["choices"][0]["text"] == offline_texts["dyn"]
    assert "dyn" in [c["id"] for c in httpx.get(lora_server.url + "/v1/models").json()["data"]]
    unloaded = post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "dyn"})
    assert unloaded.status_code == 200
    assert unloaded.text == "Success: LoRA adapter 'dyn' removed successfully."
    assert _complete(lora_server, "dyn").status_code == 404
    assert _complete(lora_server, MODEL).json()["choices"][0]["text"] == offline_texts[None]
    # loaded again (a fresh id): the same outputs
    assert post(lora_server, "/v1/load_lora_adapter",
                {"lora_name": "dyn", "lora_path": loras["dyn"]}).status_code == 200
    assert _complete(lora_server, "dyn").json()["choices"][0]["text"] == offline_texts["dyn"]
    assert post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "dyn"}).status_code == 200


def test_lora_route_errors(lora_server, loras, tmp_path):
    """vLLM 0.6.3 serving_engine.py: ``f"The lora adapter '{request.lora_name}' has already
    been" "loaded."`` and ``f"The lora adapter '{request.lora_name}' cannot be found."``, both
    ``err_type="InvalidUserInput"``, 400. pagedllm also loads the adapter at once, so a bad
    directory is the load request's 400 (vLLM finds out at the first request using it)."""
    again = post(lora_server, "/v1/load_lora_adapter",
                 {"lora_name": "static", "lora_path": loras["static"]})
    assert again.status_code == 400
    # vLLM's text lacks the space between "been" and "loaded"; pagedllm has it
    assert again.json()["message"] == "The lora adapter 'static' has already been loaded."
    assert again.json()["type"] == "InvalidUserInput"
    missing = post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "nope"})
    assert missing.status_code == 400
    assert missing.json()["message"] == "The lora adapter 'nope' cannot be found."
    bad = post(lora_server, "/v1/load_lora_adapter",
               {"lora_name": "bad", "lora_path": str(tmp_path / "no-such-dir")})
    assert bad.status_code == 400 and "check_lora" in bad.json()["message"]
    assert _complete(lora_server, "bad").status_code == 404
    empty = post(lora_server, "/v1/load_lora_adapter", {"lora_name": "", "lora_path": ""})
    assert empty.json()["message"] == "Both 'lora_name' and 'lora_path' must be provided."
    assert post(lora_server, "/v1/load_lora_adapter", {"lora_name": "x"}).status_code == 400


def test_routes_absent_without_their_variables(lora_server):
    """vLLM 0.6.3 adds /start_profile only ``if envs.VLLM_TORCH_PROFILER_DIR:``: without it
    the route is unknown (an OpenAI-style 404 here)."""
    response = post(lora_server, "/start_profile")
    assert response.status_code == 404 and response.json()["object"] == "error"
