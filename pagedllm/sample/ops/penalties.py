"""Repetition, frequency and presence penalties (vLLM 0.6.3 / OpenAI definitions).

For a row with prompt tokens P, output tokens O, ``count[t]`` = occurrences of t in O:
1. repetition (CTRL paper): for every t in P or O, ``logit > 0 ? logit / r : logit * r``;
2. frequency: ``logit[t] -= frequency_penalty * count[t]``;
3. presence: ``logit[t] -= presence_penalty * (count[t] > 0)``.
The op is sparse: ``PenaltyHistory`` keeps, on the host, each distinct (row, token) of the
rows' histories with its output count (updated with each step's new tokens); the op gathers
those logits, penalises them and scatters them back (on CPU with numpy on the logits'
memory). Nothing is proportional to the vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PenaltyInputs:
    """Each distinct (row, token) of the penalised rows' histories, on the host."""
    flat_ids: np.ndarray  # [num_entries] row * vocab + token
    repetition: np.ndarray  # [num_entries] float32, the row's repetition penalty
    subtract: np.ndarray  # [num_entries] float32, frequency * count + presence * (count > 0)


def distinct(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values (``np.unique`` hashes: ~10x slower on arrays this small)."""
    keys = np.sort(keys)
    return keys[np.concatenate([[True], keys[1:] != keys[:-1]])] if keys.size else keys


class PenaltyHistory:
    """The distinct (row, token) pairs of the penalised rows' histories with their output
    counts, kept across steps by the metadata builder: a step only adds its new output tokens
    (one ``searchsorted`` into the sorted prompt pairs; a dict for pairs first seen in an
    output), so the host work does not grow with the history."""

    def __init__(self, prompts: list, rows: np.ndarray, presence: np.ndarray,
                 frequency: np.ndarray, repetition: np.ndarray, vocab_size: int) -> None:
        """prompts: each penalised row's prompt ids; rows: their rows in the batch."""
        self.radix, self.vocab_size = vocab_size + 1, vocab_size
        self.rows, self.presence, self.frequency = rows, presence, frequency
        self.repetition = repetition.astype(np.float32)
        # key: i * (vocab + 1) + token, i: index of the penalised row
        self.prompt_keys = distinct(np.concatenate(
            [np.asarray(ids, dtype=np.int64) + i * self.radix for i, ids in enumerate(prompts)]
            + [np.empty(0, dtype=np.int64)]))
        self.prompt_counts = np.zeros(len(self.prompt_keys), dtype=np.int64)
        self.output_index: dict[int, int] = {}  # keys not in a prompt -> position below
        self.output_keys: list[int] = []
        self.output_counts: list[int] = []

    def add_outputs(self, local: np.ndarray, tokens: np.ndarray) -> None:
        """New output tokens (``local``: index of their penalised row, repeats allowed)."""
        new = local * self.radix + tokens
        pos = np.searchsorted(self.prompt_keys, new)
        hit = pos < len(self.prompt_keys)
        hit[hit] = self.prompt_keys[pos[hit]] == new[hit]
        np.add.at(self.prompt_counts, pos[hit], 1)
        for key in new[~hit].tolist():
            at = self.output_index.get(key)
            if at is None:
                self.output_index[key] = len(self.output_keys)
                self.output_keys.append(key)
                self.output_counts.append(1)
            else:
                self.output_counts[at] += 1

    def inputs(self) -> PenaltyInputs:
        keys = np.concatenate([self.prompt_keys, np.array(self.output_keys, dtype=np.int64)])
        counts = np.concatenate([self.prompt_counts,
                                 np.array(self.output_counts, dtype=np.int64)])
        local = keys // self.radix
        subtract = self.frequency[local] * counts + self.presence[local] * (counts > 0)
        return PenaltyInputs(self.rows[local] * self.vocab_size + keys % self.radix,
                             self.repetition[local], subtract.astype(np.float32))


def apply_penalties(logits: torch.Tensor, p: PenaltyInputs) -> torch.Tensor:
    """logits [num_rows, vocab] (modified in place)."""
    if logits.device.type == "cpu" and logits.is_contiguous():  # numpy on the same memory
        flat = logits.numpy().reshape(-1)
        values = flat[p.flat_ids]
        flat[p.flat_ids] = np.where(values > 0, values / p.repetition,
                                    values * p.repetition) - p.subtract
        return logits
    vocab = logits.shape[1]
    index = (torch.from_numpy(p.flat_ids // vocab).to(logits.device),
             torch.from_numpy(p.flat_ids % vocab).to(logits.device))
    rep = torch.from_numpy(p.repetition).to(logits.device)
    values = logits[index]
    logits[index] = torch.where(values > 0, values / rep, values * rep) - \
        torch.from_numpy(p.subtract).to(logits.device)
    return logits
