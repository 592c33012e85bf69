"""Benchmark workloads: random lengths, groups sharing a system prompt, and ShareGPT conversations."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from sgl_compile.errors import SglcError
from sgl_compile.tokenizer import Tokenizer


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    input_ids: list[int]
    output_len: int


def _random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    # Stay clear of the low ids where special tokens usually live.
    return [rng.randrange(min(1000, vocab // 2), vocab) for _ in range(n)]


def random_dataset(
    tok: Tokenizer, num: int, input_len: int, output_len: int, range_ratio: float = 1.0, seed: int = 0
) -> list[BenchRequest]:
    """Lengths uniform in [len * range_ratio, len]; prompts are random tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        n_in = rng.randint(max(int(input_len * range_ratio), 1), input_len)
        n_out = rng.randint(max(int(output_len * range_ratio), 1), output_len)
        ids = _random_ids(rng, n_in, tok.vocab_size)
        out.append(BenchRequest(tok.decode(ids), ids, n_out))
    return out


def shared_prefix_dataset(
    tok: Tokenizer,
    groups: int,
    prompts_per_group: int,
    system_len: int,
    question_len: int,
    output_len: int,
    seed: int = 0,
) -> list[BenchRequest]:
    """`groups` system prompts of system_len tokens, each followed by prompts_per_group random questions."""
    rng = random.Random(seed)
    out = []
    for _ in range(groups):
        system = _random_ids(rng, system_len, tok.vocab_size)
        for _ in range(prompts_per_group):
            ids = system + _random_ids(rng, question_len, tok.vocab_size)
            out.append(BenchRequest(tok.decode(ids), ids, output_len))
    rng.shuffle(out)
    return out


def sharegpt_dataset(
    tok: Tokenizer, path: Path, num: int, max_len: int = 4096, seed: int = 0
) -> list[BenchRequest]:
    """First human turn as the prompt, the reply's token count as the output length."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SglcError(f"{path}: cannot read ShareGPT JSON ({e})") from None
    rng = random.Random(seed)
    rng.shuffle(data)
    out = []
    for conv in data:
        turns = conv.get("conversations") or conv.get("conversation") or []
        if len(turns) < 2:
            continue
        ids, reply = tok.encode(turns[0]["value"]), tok.encode(turns[1]["value"], False)
        if len(ids) < 4 or len(reply) < 4 or len(ids) + len(reply) > max_len:
            continue
        out.append(BenchRequest(turns[0]["value"], ids, len(reply)))
        if len(out) == num:
            break
    if not out:
        raise SglcError(f"{path}: no usable conversations")
    return out
