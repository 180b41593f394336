from dataclasses import dataclass, field

from pagedllm.sampling_params import SamplingParams


@dataclass
class FakeState:
    """The fields of the runner's per-request state that sampling reads."""
    sampling_params: SamplingParams
    token_ids: list = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    req_id: str = "r"
