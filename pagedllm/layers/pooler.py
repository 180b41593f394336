"""How a pooling model turns the final hidden states of one prompt into its output.

vLLM 0.6.3's pooling types that its decoder embedding models use:

* ``LAST``: the hidden state of the prompt's last token (e5-mistral-style ``MistralModel`` /
  ``LlamaModel`` checkpoints, ``Gemma2Model``), L2-normalised;
* ``ALL``: every prompt token's row (``Qwen2ForRewardModel``: one reward per token), as is.

The runner hands the pooler only the rows it needs (``keeps_all_rows``): the last row of the
prompt's final chunk, or every row of every chunk (chunked prefill), in prompt order.
"""
from __future__ import annotations

import enum

import torch


class PoolingType(enum.Enum):
    LAST = "last"
    ALL = "all"


class Pooler:
    def __init__(self, pooling_type: PoolingType, normalize: bool) -> None:
        self.pooling_type = pooling_type
        self.normalize = normalize

    @property
    def keeps_all_rows(self) -> bool:
        """True when every prompt row is pooled (the runner keeps earlier chunks' rows)."""
        return self.pooling_type is PoolingType.ALL

    def pool(self, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
        """The outputs of the prompts completed in one step, on the host in float32.
        ``prompts[i]`` [num_rows, dim]: the rows the runner kept for prompt i (its last
        chunk, or all its chunks' rows for ALL). Returns [dim] (LAST) or
        [num_prompt_tokens, dim] (ALL) per prompt; one device-to-host copy for them all."""
        if self.pooling_type is PoolingType.LAST:
            data = torch.stack([rows[-1] for rows in prompts]).float()  # [num_prompts, dim]
        else:
            data = torch.cat(prompts).float()  # [sum(num_prompt_tokens), dim]
        if self.normalize:
            data = torch.nn.functional.normalize(data, p=2, dim=-1)
        data = data.cpu()
        if self.pooling_type is PoolingType.LAST:
            return list(data.unbind(0))
        return list(data.split([len(rows) for rows in prompts]))
