"""A request's state inside the scheduler: tokens, KV bookkeeping, output text, logprobs, finish."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sgl_compile.runtime.radix_cache import Node
from sgl_compile.runtime.sampling_params import SamplingParams
from sgl_compile.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from sgl_compile.runtime.grammar import Constraint

# Requests whose prompts agree on this many leading tokens are taken to share a system prompt: the lpm
# policy ranks a long queue with one tree walk per such run.
PROMPT_HEAD = 256


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
    # Sampled tokens; the last `pending` are placeholders (-1 - i: row i of the runner's future-token
    # buffer) for draws still on the device, resolved when the step's results are read back.
    output_ids: list[int] = field(default_factory=list)
    pending: int = 0
    # structured output: the grammar state, following every resolved output token (runtime/structured.py)
    constraint: Constraint | None = None

    # KV bookkeeping (owned by the scheduler)
    row: int | None = None  # row in the request-to-token table while admitted
    kv_len: int = 0  # leading tokens of all_ids whose KV is in the pool
    prefix_len: int = 0  # leading tokens whose slots belong to the radix cache (locked via last_node)
    last_node: Node | None = None
    cached_tokens: int = 0  # prompt tokens served from the cache at first admission
    admitted: bool = False  # holds a table row (is in the running list)
    ever_admitted: bool = False

    finish: FinishReason | None = None
    _text: str = ""  # output text decoded so far (stop strings cut off); read through `text`
    _decoded: int = 0  # output tokens fed to the detokenizer
    input_logprobs: list[tuple[float | None, int]] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    output_logprobs: list[tuple[float, int]] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    seed: int = field(init=False)
    detok: IncrementalDetokenizer = field(init=False)
    prompt_head: int = field(init=False)  # hash of the first PROMPT_HEAD prompt tokens

    def __post_init__(self) -> None:
        self.prompt_head = hash(tuple(self.prompt_ids[:PROMPT_HEAD]))
        self.seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.detok = IncrementalDetokenizer(self.tokenizer, [], self.params.skip_special_tokens)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def ids_between(self, start: int, end: int) -> list[int]:
        """all_ids[start:end] without building all_ids (a copy of the whole sequence)."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n : end - n]
        if end <= n:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    @property
    def text(self) -> str:
        """The output text so far. Detokenized when read (or every token when stop strings need it), so
        that requests nobody watches cost nothing per token."""
        end = len(self.output_ids) - self.pending
        if self.finish is not None and self.finish.kind == "stop" and isinstance(self.finish.matched, int):
            end -= 1  # a stop token is not text
        if end > self._decoded:
            self._text += self.detok.push(*self.output_ids[self._decoded : end])
            self._decoded = end
        return self._text

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish is not None

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.return_logprob and self.params.logprob_start_len >= 0

    @property
    def num_output(self) -> int:
        """Tokens sampled so far, pending ones included."""
        return len(self.output_ids)

    draw_index = num_output  # the index in the output of the token its next draw samples (a SampleRow)

    def can_extend(self, context_len: int) -> bool:
        """Whether another token may be drawn before the pending ones are known (they could still finish
        the request by EOS or a stop string; then the extra draw is dropped)."""
        return self.num_output < self.params.max_new_tokens and self.seq_len < context_len

    def decodes_next(self, context_len: int) -> bool:
        """Whether the next step is a decode row for it: only its last token lacks KV, and it may draw
        another (can_extend, inlined: the scheduler asks this of every running request every step)."""
        n_out = len(self.output_ids)
        seq_len = len(self.prompt_ids) + n_out
        return seq_len - self.kv_len == 1 and n_out < self.params.max_new_tokens and seq_len < context_len

    def tokens_to_come(self, context_len: int) -> int:
        """The most tokens the request may still draw."""
        return max(0, min(self.params.max_new_tokens - self.num_output, context_len - self.seq_len))

    @property
    def runs_to_its_limit(self) -> bool:
        """Nothing but the length limit can end it (ignore_eos, no stops): its KV need is exact."""
        p = self.params
        return p.ignore_eos and not p.stop and not p.stop_token_ids and self.constraint is None

    def add_pending(self, future_row: int) -> None:
        self.output_ids.append(-1 - future_row)
        self.pending += 1

    def drop_pending(self) -> None:
        if self.pending:
            del self.output_ids[-self.pending :]
            self.pending = 0

    def add_token(self, token: int, context_len: int) -> None:
        """Record a sampled token (the oldest pending one if any) and decide whether the request is finished;
        a finished request drops the draws still pending after it."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.pending:
            self.output_ids[len(self.output_ids) - self.pending] = token
            self.pending -= 1
        else:
            self.output_ids.append(token)
        n_out = len(self.output_ids) - self.pending
        p = self.params
        if (not p.ignore_eos and token in self.eos_ids) or token in p.stop_token_ids:
            self.finish = FinishReason("stop", token)
        elif p.stop:
            self._check_stop_strings()
        if self.finish is None and (n_out >= p.max_new_tokens or len(self.prompt_ids) + n_out >= context_len):
            self.finish = FinishReason("length")
        if self.finish is not None:
            self.end(self.finish)

    def end(self, reason: FinishReason) -> None:
        """Finish now (as add_token does when a check fires): drop pending draws, complete the text."""
        self.finish = reason
        self.drop_pending()
        if not isinstance(reason.matched, str):
            self._text = self.text + self.detok.flush()  # an incomplete character at the very end

    def replace_output_tail(self, start: int, ids: list[int], context_len: int) -> None:
        """Jump-forward: output_ids[start:] becomes `ids`, tokens nobody sampled that spell the old tail's
        text and more (no draw may be pending). Then the finish checks of `add_token` (stop strings,
        length). The detokenizer restarts after the new tokens: the text so far is decoded whole."""
        assert not self.pending, "jump-forward with a draw in flight"
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.output_ids[start:] = ids
        skip = self.params.skip_special_tokens
        self._text = self.tokenizer.decode(self.output_ids, skip)
        self.detok = IncrementalDetokenizer(self.tokenizer, list(self.output_ids), skip)
        self._decoded = n_out = len(self.output_ids)
        p = self.params
        if p.stop:
            self._check_stop_strings()
        if self.finish is None and (n_out >= p.max_new_tokens or len(self.prompt_ids) + n_out >= context_len):
            self.finish = FinishReason("length")

    def _check_stop_strings(self) -> None:
        text = self.text
        hits = [(i, s) for s in self.params.stop if (i := text.find(s)) >= 0]
        if hits:
            index, stop = min(hits)
            self._text = text[:index]
            self.finish = FinishReason("stop", stop)

    def stream_safe_len(self) -> int:
        """How much of `text` can be streamed: hold back what could still become a stop string."""
        if self.finished or not self.params.stop:
            return len(self.text)
        hold = max(len(s) for s in self.params.stop) - 1
        return max(len(self.text) - hold, 0)
