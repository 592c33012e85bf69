"""A request's state inside the scheduler: tokens, KV bookkeeping, output text, logprobs, finish."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from sgl_compile.runtime.radix_cache import Node
from sgl_compile.runtime.sampling_params import SamplingParams
from sgl_compile.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(frozen=True)
class FinishReason:
    kind: str  # "stop" | "length" | "abort" | "error"
    matched: int | str | None = None  # the stop token id or stop string
    message: str | None = None

    def to_dict(self) -> dict:
        d: dict = {"type": self.kind}
        if self.matched is not None:
            d["matched"] = self.matched
        if self.message is not None:
            d["message"] = self.message
        return d


@dataclass(eq=False)
class Req:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    tokenizer: Tokenizer
    eos_ids: frozenset[int] = frozenset()
    output_ids: list[int] = field(default_factory=list)

    # KV bookkeeping (owned by the scheduler)
    row: int | None = None  # row in the request-to-token table while admitted
    kv_len: int = 0  # leading tokens of all_ids whose KV is in the pool
    prefix_len: int = 0  # leading tokens whose slots belong to the radix cache (locked via last_node)
    last_node: Node | None = None
    cached_tokens: int = 0  # prompt tokens served from the cache at first admission
    admitted: bool = False  # holds a table row (is in the running list)
    ever_admitted: bool = False

    finish: FinishReason | None = None
    text: str = ""  # output text so far (stop strings cut off)
    input_logprobs: list[tuple[float | None, int]] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    output_logprobs: list[tuple[float, int]] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    generator: torch.Generator = field(init=False)
    detok: IncrementalDetokenizer = field(init=False)

    def __post_init__(self) -> None:
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.detok = IncrementalDetokenizer(self.tokenizer, [], self.params.skip_special_tokens)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish is not None

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.return_logprob and self.params.logprob_start_len >= 0

    def add_token(self, token: int, context_len: int) -> None:
        """Record a sampled token and decide whether the request is finished."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.output_ids.append(token)
        p = self.params
        if (not p.ignore_eos and token in self.eos_ids) or token in p.stop_token_ids:
            self.finish = FinishReason("stop", token)
        else:
            self.text += self.detok.push(token)
            self._check_stop_strings()
        if self.finish is None and (len(self.output_ids) >= p.max_new_tokens or self.seq_len >= context_len):
            self.finish = FinishReason("length")
        if self.finish is not None and not isinstance(self.finish.matched, str):
            self.text += self.detok.flush()  # an incomplete character at the very end

    def _check_stop_strings(self) -> None:
        hits = [(i, s) for s in self.params.stop if (i := self.text.find(s)) >= 0]
        if hits:
            index, stop = min(hits)
            self.text = self.text[:index]
            self.finish = FinishReason("stop", stop)

    def stream_safe_len(self) -> int:
        """How much of `text` can be streamed: hold back what could still become a stop string."""
        if self.finished or not self.params.stop:
            return len(self.text)
        hold = max(len(s) for s in self.params.stop) - 1
        return max(len(self.text) - hold, 0)
