"""Per-request sampling parameters (SGLang's native names), validated on construction."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

from sgl_compile.errors import SglcError

MAX_N = 64
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = whole vocabulary
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    seed: int | None = None
    # logprobs (SGLang passes these beside sampling_params; both spellings are accepted)
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1  # -1: no prompt logprobs
    # structured outputs: at most one (runtime/grammar.py compiles them)
    json_schema: str | None = None  # a JSON schema, as JSON text
    regex: str | None = None
    ebnf: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SglcError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        if isinstance(d.get("stop"), str):
            d["stop"] = [d["stop"]]
        for key in ("stop", "stop_token_ids"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
            else:
                d.pop(key, None)
        if isinstance(d.get("json_schema"), dict | bool):  # SGLang wants the text; accept the object too
            d["json_schema"] = json.dumps(d["json_schema"])
        return cls(**d)

    def __post_init__(self) -> None:
        checks = [
            (
                isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
                "max_new_tokens must be >= 0",
            ),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k == -1 or self.top_k >= 1, "top_k must be -1 or >= 1"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (1 <= self.n <= MAX_N, f"n must be in [1, {MAX_N}]"),
            (
                0 <= self.top_logprobs_num <= MAX_TOP_LOGPROBS,
                f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}]",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
            (
                all(isinstance(v, str | None) for v in (self.json_schema, self.regex, self.ebnf)),
                "json_schema, regex and ebnf must be strings",
            ),
            (
                sum(v is not None for v in (self.json_schema, self.regex, self.ebnf)) <= 1,
                "give at most one of json_schema, regex and ebnf",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise SglcError(message)

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(kind, text) of the structured-output constraint: kind is json_schema, regex or ebnf."""
        for kind in ("json_schema", "regex", "ebnf"):
            if getattr(self, kind) is not None:
                return kind, getattr(self, kind)
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @cached_property  # (asked of every request every step)
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)

    @cached_property
    def argmax_only(self) -> bool:
        """A draw is the argmax of the logits as given: greedy, unpenalized, without logprobs."""
        return self.greedy and not self.penalized and not self.return_logprob
