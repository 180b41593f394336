"""Offline beam search on top of the engine (vLLM 0.6.3's ``LLM.beam_search`` design).

Each step runs every live beam for one token with ``logprobs = 2 * beam_width`` and extends
beams from those candidates in Python; the engine needs no beam-specific code. The selection
rules follow Hugging Face transformers' ``generate(num_beams=..., do_sample=False)`` (default
``early_stopping=False``), so the results are the same:
1. candidates: every beam x each of its top ``2 * beam_width`` tokens, scored by cumulative
   logprob; keep the global top ``2 * beam_width``;
2. a candidate "hits" when its token is EOS (unless ``ignore_eos``) or it reaches
   ``max_tokens``; hits ranked within the top ``beam_width`` become finished hypotheses with
   score ``cum_logprob / num_generated_tokens ** length_penalty`` (EOS counted), keeping the
   best ``beam_width``;
3. the best ``beam_width`` non-hit candidates are the next beams;
4. stop when all candidates hit, or once ``beam_width`` hypotheses are finished and the best
   live beam, scored at its current length, cannot beat the worst of them (HF's heuristic).
vLLM 0.6.3 differs slightly: it scores with the prompt included in the length and EOS
excluded, and finishes every EOS candidate; without EOS the two agree.

``beam_search_async`` is the same search over an async engine's ``generate`` (the server's
``use_beam_search``, as vLLM 0.6.3 runs it in the front end): each step sends every live beam
as its own one-token request, concurrently, so the engine batches them with other traffic.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pagedllm.sampling_params import BeamSearchParams, SamplingParams


@dataclass
class BeamSearchSequence:
    tokens: list[int]  # prompt + generated tokens, like vLLM
    cum_logprob: float = 0.0
    text: str | None = None
    score: float | None = None  # cum_logprob / num_generated ** length_penalty


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first


@dataclass
class _Instance:
    prompt_len: int
    beams: list[BeamSearchSequence]
    finished: list[BeamSearchSequence] = field(default_factory=list)
    open: bool = True  # HF: improvement over the finished hypotheses is still possible


def _step(inst: _Instance, outputs, params: BeamSearchParams, eos_id: int | None,
          num_generated: int) -> None:
    """Advance one instance by one token given its beams' RequestOutputs (in beam order)."""
    width = params.beam_width
    cands = []
    for beam, out in zip(inst.beams, outputs):
        for token_id, lp in out.outputs[0].logprobs[0].items():
            cands.append((beam.cum_logprob + lp.logprob, beam, token_id))
    cands.sort(key=lambda c: c[0], reverse=True)
    cands = cands[:2 * width]
    at_max = num_generated + 1 >= params.max_tokens
    hits = [at_max or (not params.ignore_eos and tok == eos_id) for _, _, tok in cands]
    new = [BeamSearchSequence(beam.tokens + [tok], cum) for cum, beam, tok in cands]
    if inst.open:
        for rank, (seq, hit) in enumerate(zip(new, hits)):
            if hit and rank < width:
                seq.score = seq.cum_logprob / (num_generated + 1) ** params.length_penalty
                inst.finished.append(seq)
        inst.finished.sort(key=lambda s: s.score, reverse=True)
        del inst.finished[width:]
    inst.beams = [seq for seq, hit in zip(new, hits) if not hit][:width]
    if all(hits) or not inst.beams:
        inst.open, inst.beams = False, []
        return
    if inst.open and len(inst.finished) == width:
        best = inst.beams[0].cum_logprob / (num_generated + 1) ** params.length_penalty
        inst.open = best > inst.finished[-1].score
    if not inst.open:
        inst.beams = []


def check_beam_width(params: BeamSearchParams, max_logprobs: int) -> None:
    """Each step asks for ``2 * beam_width`` logprobs, which --max-logprobs must allow."""
    if 2 * params.beam_width > max_logprobs:
        raise ValueError(f"BeamSearchParams.beam_width={params.beam_width} needs "
                         f"{2 * params.beam_width} logprobs per step but --max-logprobs is "
                         f"{max_logprobs}")


def step_params(params: BeamSearchParams) -> SamplingParams:
    """The one-token request every beam runs per step (EOS is handled by the search)."""
    return SamplingParams(logprobs=2 * params.beam_width, max_tokens=1,
                          temperature=params.temperature, detokenize=False, ignore_eos=True)


def beam_search(llm, prompts: list, params: BeamSearchParams) -> list[BeamSearchOutput]:
    """prompts: strings or token-id lists. Returns one BeamSearchOutput per prompt."""
    engine = llm.llm_engine
    check_beam_width(params, engine.config.model.max_logprobs)
    tokenizer = engine.tokenizer
    eos_id = tokenizer.eos_token_id if tokenizer is not None else \
        min(engine.inputs.eos_token_ids, default=None)
    one_step = step_params(params)
    instances = []
    for prompt in prompts:
        ids = list(prompt) if isinstance(prompt, list) else engine.inputs.process(prompt)[1]
        instances.append(_Instance(len(ids), [BeamSearchSequence(ids)]))
    for num_generated in range(params.max_tokens):
        live = [inst for inst in instances if inst.beams]
        if not live:
            break
        batch = [{"prompt_token_ids": b.tokens} for inst in live for b in inst.beams]
        outputs = iter(llm.generate(batch, one_step, use_tqdm=False))
        for inst in live:
            _step(inst, [next(outputs) for _ in inst.beams], params, eos_id, num_generated)
    results = []
    for inst in instances:
        for seq in inst.finished:
            if tokenizer is not None:
                seq.text = tokenizer.decode(seq.tokens)  # prompt included, like vLLM
        results.append(BeamSearchOutput(inst.finished))
    return results


async def _one_token(engine, tokens: list[int], params: SamplingParams, request_id: str,
                     adapters: dict):
    """The final RequestOutput of one beam's one-token request."""
    final = None
    async for output in engine.generate({"prompt_token_ids": tokens}, params, request_id,
                                        **adapters):
        final = output
    return final


async def beam_search_async(engine, prompt_ids: list[int], params: BeamSearchParams,
                            eos_id: int | None, request_id: str,
                            **adapters) -> BeamSearchOutput:
    """``beam_search`` for one prompt over an async engine's ``generate``: the same steps
    (``_step``), so the same sequences as ``LLM.beam_search``. ``text`` is left unset (the
    caller decodes what it answers). ``adapters``: ``lora_request`` /
    ``prompt_adapter_request`` for every step. Leaving early aborts the step's requests."""
    inst = _Instance(len(prompt_ids), [BeamSearchSequence(list(prompt_ids))])
    one_step = step_params(params)
    for num_generated in range(params.max_tokens):
        if not inst.beams:
            break
        outputs = await asyncio.gather(*(
            _one_token(engine, beam.tokens, one_step, f"{request_id}-{num_generated}-{i}",
                       adapters) for i, beam in enumerate(inst.beams)))
        _step(inst, outputs, params, eos_id, num_generated)
    return BeamSearchOutput(inst.finished)
