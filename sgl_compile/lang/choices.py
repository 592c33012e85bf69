"""`select`: score every choice's tokens under the prompt in one batched prefill, pick the best mean.

Tokenizers merge across the prompt/choice boundary ("Answer: " + "yes" -> ... "Answer", ":", " yes"),
so a choice's tokens are those of prompt+choice after its common prefix with the prompt's tokens.
"""

from __future__ import annotations

import math
from typing import Any

from sgl_compile.errors import SglcError
from sgl_compile.lang.backend import Backend
from sgl_compile.runtime.radix_cache import common_prefix


def _mean(logprobs: list[float]) -> float:
    return sum(logprobs) / len(logprobs) if logprobs else -math.inf


def score_choices(backend: Backend, text: str, choices: tuple[str, ...]) -> tuple[int, dict[str, Any]]:
    """(index of the best choice, meta info with each choice's token logprobs and normalized score)."""
    if not text:
        raise SglcError("select needs some text before it to condition on")
    prompt = backend.encode(text)
    full = [backend.encode(text + c) for c in choices]
    starts = [common_prefix(prompt, ids) for ids in full]
    for choice, ids, k in zip(choices, full, starts, strict=True):
        if k == len(ids):
            raise SglcError(f"select: choice {choice!r} adds no tokens to the prompt")
    first = min(starts)
    outs = backend.generate(
        full, {"max_new_tokens": 0, "temperature": 0}, return_logprob=True, logprob_start_len=first
    )
    token_logprobs = []
    for ids, k, out in zip(full, starts, outs, strict=True):
        scored = [(lp, tok) for lp, tok in out["meta_info"]["input_token_logprobs"][k - first :]]
        if [tok for _, tok in scored] != ids[k:]:
            raise SglcError("select: the backend scored other tokens than were sent")
        token_logprobs.append(scored)
    normalized = [_mean([lp for lp, _ in scored if lp is not None]) for scored in token_logprobs]
    best = max(range(len(choices)), key=lambda i: normalized[i])  # ties: the first
    meta = {
        "normalized_prompt_logprobs": normalized,
        "input_token_logprobs": token_logprobs,
        "cached_tokens": [out["meta_info"]["cached_tokens"] for out in outs],
        "prompt_tokens": [out["meta_info"]["prompt_tokens"] for out in outs],
    }
    return best, meta
