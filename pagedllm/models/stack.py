"""A decoder stack whose layers keep the residual inside (Falcon, GPT-J, Cohere).

Each layer maps one hidden tensor to the next (``x + attn(...) + mlp(...)``), so a pipeline
stage sends only the hidden states on (the Llama stack sends hidden and residual). The
submodule names are the checkpoint's (``word_embeddings`` / ``h`` / ``ln_f`` for Falcon,
``wte`` / ``h`` / ``ln_f`` for GPT-J, ...), so checkpoint keys line up without renaming and
a pipeline stage can tell which tensors another stage holds.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pagedllm.attention.backend import ForwardContext
from pagedllm.distributed import (
    is_first_stage,
    is_last_stage,
    recv_from_prev_stage,
    send_to_next_stage,
)
from pagedllm.layers.parallel import VocabParallelEmbedding, stage_layer_list


class HiddenStack(nn.Module):
    """Embedding (first stage; the last too when the LM head is tied to it), this stage's
    layers (``build_layer(i)``), and the final norm (last stage, ``build_norm()``)."""

    def __init__(self, config, tied: bool, build_layer: Callable[[int], nn.Module],
                 build_norm: Callable[[], nn.Module],
                 names: tuple[str, str, str] = ("embed_tokens", "layers", "norm")) -> None:
        super().__init__()
        self.names = names
        self.hidden_size, self.dtype = config.hidden_size, torch.get_default_dtype()
        embed = (VocabParallelEmbedding(config.vocab_size, config.hidden_size)
                 if is_first_stage() or (tied and is_last_stage()) else None)
        self.stage_layers, layers = stage_layer_list(config.num_hidden_layers, build_layer)
        setattr(self, names[0], embed)
        setattr(self, names[1], layers)
        setattr(self, names[2], build_norm() if is_last_stage() else None)

    @property
    def embedding(self) -> VocabParallelEmbedding | None:
        return getattr(self, self.names[0])

    def forward(self, input_ids, positions, ctx: ForwardContext) -> torch.Tensor:
        if is_first_stage():
            hidden = self.embedding(input_ids)
        else:
            hidden = recv_from_prev_stage((input_ids.shape[0], self.hidden_size), self.dtype,
                                          input_ids.device)
        layers = getattr(self, self.names[1])
        for i in self.stage_layers:
            hidden = layers[i](positions, hidden, ctx)
        if not is_last_stage():
            send_to_next_stage(hidden, ctx.sends)
            return hidden
        return getattr(self, self.names[2])(hidden)
