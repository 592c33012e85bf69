"""Batched sampling with per-request parameters: penalties, temperature, top-k / top-p / min-p, seeds.

Logprobs are reported from the model's raw distribution (log_softmax of the
logits, before penalties and temperature), as OpenAI and SGLang report them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sgl_compile.runtime.sampling_params import SamplingParams


@dataclass
class SampleInput:
    """One row to sample: its parameters, RNG, and token history for penalties."""

    params: SamplingParams
    generator: torch.Generator
    prompt_ids: list[int]
    output_ids: list[int]


@dataclass
class SampleOutput:
    tokens: list[int]
    logprobs: list[float] | None = None  # of the chosen tokens
    top_logprobs: list[list[tuple[int, float]]] | None = None


def apply_penalties(
    logits: Tensor, history_all: list[int], history_out: list[int], p: SamplingParams
) -> Tensor:
    """Repetition penalty on every token seen (prompt and output, as HF/vLLM); frequency and presence
    penalties on output counts (OpenAI: logit -= frequency * count + presence * [count > 0])."""
    if p.repetition_penalty != 1.0 and history_all:
        ids = torch.tensor(sorted(set(history_all)), device=logits.device)
        seen = logits[ids]
        logits[ids] = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and history_out:
        counts = torch.bincount(torch.tensor(history_out, device=logits.device), minlength=logits.shape[-1])
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


def filtered_probs(logits: Tensor, p: SamplingParams) -> Tensor:
    """Softmax at temperature, then top-k, top-p (smallest set reaching p) and min-p, renormalised."""
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_k > 0 and p.top_k < probs.shape[-1]:
        kth = torch.topk(probs, p.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
        probs = probs / probs.sum()  # top-p then measures mass within the top k
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
        keep_sorted = before < p.top_p  # the first token is always kept
        keep = torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
    if p.min_p > 0:
        probs = torch.where(probs >= p.min_p * probs.max(), probs, 0.0)
    return probs / probs.sum()


def sample(logits: Tensor, rows: list[SampleInput]) -> SampleOutput:
    """logits [len(rows), vocab] (any float dtype) -> one token per row."""
    logits = logits.float()
    want_logprobs = any(r.params.return_logprob for r in rows)
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    plain = [r.params.greedy and not r.params.penalized for r in rows]
    # One argmax for the whole batch, read back in one transfer; per-row work only where a row needs it.
    tokens = logits.argmax(dim=-1).tolist() if any(plain) else [0] * len(rows)
    for i, r in enumerate(rows):
        if plain[i]:
            continue
        row = logits[i]
        if r.params.penalized:
            row = apply_penalties(row.clone(), r.prompt_ids + r.output_ids, r.output_ids, r.params)
        if r.params.greedy:
            tokens[i] = int(row.argmax())
        else:
            probs = filtered_probs(row, r.params).to(r.generator.device)  # seeded per request
            tokens[i] = int(torch.multinomial(probs, 1, generator=r.generator))
    out = SampleOutput(tokens)
    if logprobs is not None:
        out.logprobs = [float(logprobs[i, t]) for i, t in enumerate(tokens)]
        out.top_logprobs = [top_logprobs(logprobs[i], r.params.top_logprobs_num) for i, r in enumerate(rows)]
    return out


def top_logprobs(row: Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    values, ids = torch.topk(row, k)
    return list(zip(ids.tolist(), values.tolist(), strict=True))
