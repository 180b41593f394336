"""GET /v1/models, POST /tokenize and POST /detokenize; the development routes
/start_profile, /stop_profile, /v1/load_lora_adapter and /v1/unload_lora_adapter."""
from __future__ import annotations

import logging
from typing import Optional

from pagedllm.entrypoints.openai.protocol import (DetokenizeRequest, DetokenizeResponse,
                                                  LoadLoraAdapterRequest,
                                                  ModelCard, ModelList, ModelPermission,
                                                  UnloadLoraAdapterRequest,
                                                  TokenizeChatRequest, TokenizeRequest,
                                                  TokenizeResponse)
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_engine import OpenAIError, OpenAIServing


class OpenAIServingModels(OpenAIServing):
    def list_models(self) -> dict:
        root = self.ctx.engine.config.model.model
        cards = [ModelCard(id=name, root=root, max_model_len=self.ctx.max_model_len,
                           permission=[ModelPermission()])
                 for name in self.ctx.served_model_names]
        cards += [ModelCard(id=name, root=self.ctx.model_name,
                            max_model_len=self.ctx.max_model_len,
                            permission=[ModelPermission()])
                  for name in self.ctx.prompt_adapters]  # --prompt-adapters, as vLLM lists them
        cards += [ModelCard(id=name, root=lora.path, parent=self._lora_parent(lora),
                            max_model_len=self.ctx.max_model_len,
                            permission=[ModelPermission()])
                  for name, lora in self.ctx.lora_modules.items()]  # --lora-modules
        return ModelList(data=cards).model_dump()

    def _lora_parent(self, lora) -> str:
        """vLLM 0.6.3: a LoRA module's ``base_model_name`` if it is a served name, else the
        first served name."""
        name = getattr(lora, "base_model_name", None)
        return name if name in self.ctx.served_model_names else self.ctx.model_name


class OpenAIServingTokenization(OpenAIServing):
    def __init__(self, ctx, chat: OpenAIServingChat) -> None:
        super().__init__(ctx)
        self.chat = chat

    async def tokenize_request(self, request: TokenizeRequest) -> dict:
        """Templates and long prompts are rendered / tokenized off the event loop (bounded,
        as for chat completions): /tokenize needs no key and must not freeze the server.
        A LoRA adapter's ``model`` name tokenizes with the adapter's own tokenizer (vLLM
        0.6.3's ``get_tokenizer(lora_request)``), when it ships one."""
        adapter = self.check_model(request.model)
        if isinstance(request, TokenizeChatRequest):
            if request.continue_final_message and request.add_generation_prompt:
                raise OpenAIError("Cannot set both `continue_final_message` and "
                                  "`add_generation_prompt` to True.")
            prompt = await self.chat.for_adapter(adapter).render_chat_template(
                request.messages, add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                chat_template=request.chat_template,
                chat_template_kwargs=request.chat_template_kwargs)
        else:
            prompt = request.prompt
        ids = await self.for_adapter(adapter).tokenize_async(prompt, request.add_special_tokens)
        return TokenizeResponse(tokens=ids, count=len(ids),
                                max_model_len=self.ctx.max_model_len).model_dump()

    def detokenize_request(self, request: DetokenizeRequest) -> dict:
        tokenizer = self.for_adapter(self.check_model(request.model)).require_tokenizer()
        vocab = len(tokenizer)
        bad = [t for t in request.tokens if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(f"tokens {bad[:5]} are outside the vocabulary [0, {vocab})")
        return DetokenizeResponse(prompt=tokenizer.decode(request.tokens)).model_dump()


logger = logging.getLogger("pagedllm.entrypoints.openai.serving_misc")


class OpenAIServingDevelopment(OpenAIServing):
    """The torch profiler of the engine core and runtime LoRA updates: both act in the core
    (``engine.call_core``), between steps. The server adds their routes only when
    VLLM_TORCH_PROFILER_DIR / VLLM_ALLOW_RUNTIME_LORA_UPDATING say so, as vLLM 0.6.3 does."""

    def __init__(self, ctx, trace_dir: Optional[str] = None) -> None:
        super().__init__(ctx)
        self.trace_dir = trace_dir
        # ids of runtime adapters: never reused, so the core's id -> adapter map stays true
        self.next_lora_id = max((r.lora_int_id for r in ctx.lora_modules.values()),
                                default=0) + 1

    async def _call_core(self, method: str, *args):
        """``call_core`` with the core's refusal as a 400 (a dead engine stays a 500)."""
        from pagedllm.engine.async_engine import EngineDeadError
        try:
            return await self.engine.call_core(method, *args)
        except EngineDeadError:
            raise
        except Exception as exc:  # noqa: BLE001 - the core's error, in words
            raise OpenAIError(f"{method}: {exc}", "InvalidUserInput") from exc

    async def start_profile(self) -> None:
        logger.info("Starting profiler (traces to %s)...", self.trace_dir)
        await self._call_core("start_profile", self.trace_dir)
        logger.info("Profiler started.")

    async def stop_profile(self) -> None:
        logger.info("Stopping profiler...")
        await self._call_core("stop_profile")
        logger.info("Profiler stopped; traces in %s.", self.trace_dir)

    async def load_lora_adapter(self, request: LoadLoraAdapterRequest) -> str:
        """vLLM 0.6.3's checks (both fields, a new name), then the adapter is loaded in the
        core at once, so a bad directory is this request's 400 rather than a later one's."""
        from pagedllm.core.adapters import LoRARequest
        if not request.lora_name or not request.lora_path:
            raise OpenAIError("Both 'lora_name' and 'lora_path' must be provided.",
                              "InvalidUserInput")
        if request.lora_name in self.ctx.lora_modules:
            raise OpenAIError(f"The lora adapter '{request.lora_name}' has already been "
                              "loaded.", "InvalidUserInput")
        if request.lora_name in self.ctx.served_model_names or \
                request.lora_name in self.ctx.prompt_adapters:
            raise OpenAIError(f"lora_name: {request.lora_name!r} already names a served "
                              "model or prompt adapter", "InvalidUserInput")
        if not self.engine.config.lora.enable_lora:
            raise OpenAIError("lora_path: loading a LoRA adapter needs the server to run "
                              "with --enable-lora", "InvalidUserInput")
        lora = LoRARequest(request.lora_name, self.next_lora_id, request.lora_path,
                           base_model_name=self.ctx.model_name)
        self.next_lora_id += 1
        await self._call_core("check_lora", lora)
        self.ctx.lora_modules[lora.lora_name] = lora
        return f"Success: LoRA adapter '{lora.lora_name}' added successfully."

    async def unload_lora_adapter(self, request: UnloadLoraAdapterRequest) -> str:
        """vLLM 0.6.3: by name (``lora_int_id`` alone is not enough); requests already
        running with it finish with it."""
        if not request.lora_name and not request.lora_int_id:
            raise OpenAIError("either 'lora_name' and 'lora_int_id' needs to be provided.",
                              "InvalidUserInput")
        lora = self.ctx.lora_modules.get(request.lora_name)
        if lora is None:
            raise OpenAIError(f"The lora adapter '{request.lora_name}' cannot be found.",
                              "InvalidUserInput")
        del self.ctx.lora_modules[request.lora_name]
        await self._call_core("remove_lora", lora.lora_int_id)
        return f"Success: LoRA adapter '{request.lora_name}' removed successfully."


def add_development_routes(app, ctx) -> None:
    """vLLM 0.6.3's routes for local development, present only when their variable is set
    (else 404, as there): the torch profiler and runtime LoRA loading."""
    from fastapi.responses import Response

    from pagedllm import envs
    trace_dir = envs.torch_profiler_dir()
    dev = OpenAIServingDevelopment(ctx, trace_dir)
    if trace_dir is not None:
        logger.warning("Torch Profiler is enabled in the API server (traces to %s). This "
                       "should ONLY be used for local development!", trace_dir)

        @app.post("/start_profile")
        async def start_profile():
            await dev.start_profile()
            return Response(status_code=200)

        @app.post("/stop_profile")
        async def stop_profile():
            await dev.stop_profile()
            return Response(status_code=200)

    if envs.allow_runtime_lora_updating():
        logger.warning("LoRA dynamic loading & unloading is enabled in the API server. This "
                       "should ONLY be used for local development!")

        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: LoadLoraAdapterRequest):
            return Response(status_code=200, content=await dev.load_lora_adapter(request))

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(request: UnloadLoraAdapterRequest):
            return Response(status_code=200, content=await dev.unload_lora_adapter(request))
