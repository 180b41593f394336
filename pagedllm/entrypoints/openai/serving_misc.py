"""GET /v1/models, POST /tokenize and POST /detokenize."""
from __future__ import annotations

from pagedllm.entrypoints.openai.protocol import (DetokenizeRequest, DetokenizeResponse,
                                                  ModelCard, ModelList, ModelPermission,
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
        cards += [ModelCard(id=name, root=lora.path, parent=self.ctx.model_name,
                            max_model_len=self.ctx.max_model_len,
                            permission=[ModelPermission()])
                  for name, lora in self.ctx.lora_modules.items()]  # --lora-modules
        return ModelList(data=cards).model_dump()


class OpenAIServingTokenization(OpenAIServing):
    def __init__(self, ctx, chat: OpenAIServingChat) -> None:
        super().__init__(ctx)
        self.chat = chat

    def tokenize_request(self, request: TokenizeRequest) -> dict:
        self.check_model(request.model)
        if isinstance(request, TokenizeChatRequest):
            if request.continue_final_message and request.add_generation_prompt:
                raise OpenAIError("Cannot set both `continue_final_message` and "
                                  "`add_generation_prompt` to True.")
            prompt = self.chat.apply_chat_template(
                request.messages, add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                chat_template=request.chat_template,
                chat_template_kwargs=request.chat_template_kwargs)
        else:
            prompt = request.prompt
        ids = self.tokenize(prompt, request.add_special_tokens)
        return TokenizeResponse(tokens=ids, count=len(ids),
                                max_model_len=self.ctx.max_model_len).model_dump()

    def detokenize_request(self, request: DetokenizeRequest) -> dict:
        self.check_model(request.model)
        tokenizer = self.require_tokenizer()
        vocab = len(tokenizer)
        bad = [t for t in request.tokens if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(f"tokens {bad[:5]} are outside the vocabulary [0, {vocab})")
        return DetokenizeResponse(prompt=tokenizer.decode(request.tokens)).model_dump()
