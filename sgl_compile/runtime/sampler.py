"""Batched sampling on the logits' device: penalties, temperature, top-k / top-p / min-p, seeds.

Nothing here reads the device: the result is a set of tensors that the scheduler
copies back once per step (and one step late when scheduling overlaps the GPU).
Random draws are a counter-based hash of (request seed, output index, token id),
so a request's samples depend only on its seed and its own history, never on
which other requests share the batch, nor on the device.

Logprobs are reported from the model's raw distribution (log_softmax of the
logits, before penalties and temperature), as OpenAI and SGLang report them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from sgl_compile.codegen import argmax as argmax_kernel
from sgl_compile.runtime.kv_pool import to_device
from sgl_compile.runtime.sampling_params import SamplingParams

_M32 = 0xFFFFFFFF


class SampleRow(Protocol):
    """One row to sample, as the sampler reads it: its parameters, seed and draw index, and the token
    history for penalties. The scheduler's requests are rows themselves (no per-step copy)."""

    params: SamplingParams
    seed: int
    prompt_ids: list[int]
    output_ids: list[int]

    @property
    def draw_index(self) -> int: ...  # the index of the token being drawn in the request's output


@dataclass
class SampleInput:
    """A row on its own (for callers without a request)."""

    params: SamplingParams
    seed: int
    draw_index: int
    prompt_ids: list[int]
    output_ids: list[int]


@dataclass
class DeviceSample:
    """A batch's draws, still on the device."""

    tokens: Tensor  # [B] int64
    logprobs: Tensor | None = None  # [B] of the chosen tokens
    top_ids: Tensor | None = None  # [B, k] for the largest top_logprobs_num asked
    top_values: Tensor | None = None

    def to_host(self, rows: list[SampleRow]) -> SampleOutput:
        """Read back (synchronises with the device)."""
        out = SampleOutput(self.tokens.tolist())
        if self.logprobs is not None:
            out.logprobs = self.logprobs.tolist()
            ids = self.top_ids.tolist() if self.top_ids is not None else [[] for _ in rows]
            values = self.top_values.tolist() if self.top_values is not None else [[] for _ in rows]
            out.top_logprobs = [
                list(zip(ids[i][:k], values[i][:k], strict=True))
                for i, k in enumerate(r.params.top_logprobs_num for r in rows)
            ]
        return out


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
        ids = to_device(sorted(set(history_all)), logits.device)
        seen = logits[ids]
        logits[ids] = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and history_out:
        counts = torch.bincount(to_device(history_out, logits.device), minlength=logits.shape[-1])
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


def filtered_probs(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """[B, V] logits -> probabilities at each row's temperature after its top-k, top-p (smallest set
    reaching p, measured within the top k) and min-p, renormalised. Batched: one sort for the batch."""
    dev = logits.device
    temperature = to_device([p.temperature for p in params], dev, torch.float32)
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    top_k = [p.top_k if 0 < p.top_k < probs.shape[-1] else 0 for p in params]
    top_p = [p.top_p for p in params]
    if any(top_k) or any(p < 1.0 for p in top_p):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        if any(top_k):
            k = to_device(top_k, dev)
            kth = sorted_p.gather(1, (k - 1).clamp(min=0)[:, None])
            kth = torch.where(k[:, None] > 0, kth, 0.0)
            sorted_p = torch.where(sorted_p >= kth, sorted_p, 0.0)  # ties with the k-th stay
            sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
        if any(p < 1.0 for p in top_p):
            tp = to_device(top_p, dev, torch.float32)[:, None]
            before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
            sorted_p = torch.where((before < tp) | (tp >= 1.0), sorted_p, 0.0)  # the first always stays
        probs = torch.zeros_like(probs).scatter(1, order, sorted_p)
    min_p = [p.min_p for p in params]
    if any(min_p):
        floor = to_device(min_p, dev, torch.float32)[:, None] * probs.amax(-1, keepdim=True)
        probs = torch.where(probs >= floor, probs, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def _mul32(x: Tensor | int, c: int) -> Tensor | int:
    """(x * c) mod 2^32 for x in [0, 2^32), without overflowing int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor | int) -> Tensor | int:
    """A 32-bit avalanche hash (xorshift-multiply, 'lowbias32' constants); on tensors or Python ints."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _row_key(seed: int, step: int) -> int:
    """A 32-bit key per (seed, step), mixed on the host with the same hash."""
    k = _mix32((seed & _M32) ^ 0x9E3779B9)
    k = _mix32(k ^ ((seed >> 32) & _M32))
    return _mix32((k + step) & _M32)


def unit_interval(x: Tensor) -> Tensor:
    """32-bit hashes -> float32 uniforms strictly inside (0, 1): the top 23 bits plus a half step, exact
    in float32. (24 bits are not: (2^24 - 1 + 0.5) / 2^24 rounds to 1.0, whose -log is 0, and then a
    zero-probability token wins the race below with 0 / 0 = nan, one draw in ~300 over a 49k vocab.)"""
    return ((x >> 9).float() + 0.5) * (1.0 / (1 << 23))


def uniform_noise(rows: list[SampleRow], vocab: int, device: torch.device) -> Tensor:
    """[B, V] uniforms in (0, 1) from (seed, draw index, token id)."""
    keys = to_device([_row_key(r.seed, r.draw_index) for r in rows], device)
    x = _mix32(keys[:, None] ^ torch.arange(vocab, dtype=torch.int64, device=device))
    x = _mix32(x ^ (keys[:, None] >> 7))
    return unit_interval(x)


def argmax(logits: Tensor) -> Tensor:
    """Each row's first index of its maximum: torch's argmax gives a row one block (slow over a large
    vocabulary at small batches), so CUDA runs the two-pass kernel."""
    if logits.device.type == "cuda":
        return argmax_kernel.argmax(logits)
    return logits.argmax(dim=-1)


def sample(logits: Tensor, rows: list[SampleRow]) -> DeviceSample:
    """logits [len(rows), vocab] (any float dtype, any device) -> one token per row, on that device."""
    if all(r.params.argmax_only for r in rows):  # (the usual batch: one pass over the rows)
        return DeviceSample(argmax(logits))
    want_logprobs = any(r.params.return_logprob for r in rows)
    penalized = any(r.params.penalized for r in rows)
    drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
    if want_logprobs or penalized or drawn:  # greedy rows alone take the argmax of the logits as given
        logits = logits.float()
    raw = logits
    if penalized:
        logits = logits.clone()
        for i, r in enumerate(rows):
            if r.params.penalized:
                apply_penalties(logits[i], r.prompt_ids + r.output_ids, r.output_ids, r.params)
    tokens = argmax(logits)
    if drawn:
        # Exponential race: argmax p / E with E ~ Exp(1) draws from p (the Gumbel-max trick).
        index = to_device(drawn, logits.device) if len(drawn) < len(rows) else None
        sub = logits if index is None else logits[index]
        sub_rows = [rows[i] for i in drawn]
        probs = filtered_probs(sub, [r.params for r in sub_rows])
        race = probs / -torch.log(uniform_noise(sub_rows, logits.shape[-1], logits.device))
        picked = argmax(race)
        tokens = picked if index is None else tokens.index_copy(0, index, picked)
    out = DeviceSample(tokens)
    if want_logprobs:
        logprobs = torch.log_softmax(raw, dim=-1)
        out.logprobs = logprobs.gather(1, tokens[:, None])[:, 0]
        k = max(r.params.top_logprobs_num for r in rows)
        if k:
            out.top_values, out.top_ids = torch.topk(logprobs, k, dim=-1)
    return out
