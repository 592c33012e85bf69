"""Structured outputs: JSON schema, regex and EBNF constraints as per-token masks (xgrammar).

One `GrammarBackend` per process holds the vocabulary as xgrammar sees it and
compiles constraints (LRU-cached by kind and text). Each constrained request owns
a `Constraint`: it follows the request's output tokens and fills the request's
row of the batch bitmask (`allocate_mask`), which `apply_mask` turns into -inf
logits. The bitmask has one bit per logits column, so ids the tokenizer does not
know (a model's padded vocabulary) and the tokenizer's special tokens are never
allowed; a finished grammar allows only the stop tokens.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xgrammar as xgr

from sgl_compile.errors import SglcError
from sgl_compile.runtime.grammar_vocab import tokenizer_info
from sgl_compile.tokenizer import Tokenizer

KINDS = ("json_schema", "json_object", "regex", "ebnf")
JSON_OBJECT_SCHEMA = '{"type": "object"}'
# xgrammar's compile time grows steeply with schema nesting (1000 levels: ~50 s; 5000: a crash), so
# the HTTP process refuses deeper schemas before compiling them. 128 levels compile in ~0.1 s.
MAX_SCHEMA_DEPTH = 128

_LOG_PREFIX = re.compile(r"^\[[\d:.]+\] \S+:\d+: (Check failed: .*? is false: )?")


def _xgr_message(e: Exception) -> str:
    """xgrammar's error text without its C++ log prefix ("[12:00:00] /project/cpp/x.cc:83: ")."""
    return _LOG_PREFIX.sub("", str(e).strip()).strip()


def _json_depth(value: Any) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [
            child
            for v in level
            if isinstance(v, dict | list)
            for child in (v.values() if isinstance(v, dict) else v)
        ]
    return depth


def _check_schema(text: str) -> None:
    try:
        schema = json.loads(text)
    except RecursionError:
        raise SglcError(f"invalid json_schema: nested deeper than {MAX_SCHEMA_DEPTH} levels") from None
    except ValueError as e:
        raise SglcError(f"invalid json_schema: not JSON ({e})") from None
    if not isinstance(schema, dict | bool):
        raise SglcError(
            f"invalid json_schema: a schema is an object or a boolean, not {type(schema).__name__}"
        )
    if _json_depth(schema) > MAX_SCHEMA_DEPTH:
        raise SglcError(f"invalid json_schema: nested deeper than {MAX_SCHEMA_DEPTH} levels")


# -- compiling --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grammar:
    """A compiled constraint. `allowed` (JSON kinds): a bitmask row of the tokens that may appear at all,
    ANDed into every mask. xgrammar 0.2.8 lets strings with minLength / maxLength hold raw control
    characters (mlc-ai/xgrammar#800), which JSON forbids; so JSON masks drop every token holding one
    (compact JSON has no raw tab or newline either)."""

    kind: str
    compiled: xgr.CompiledGrammar
    allowed: torch.Tensor | None = None


class GrammarBackend:
    """Compiles constraints for one tokenizer and logits width. `compile` is thread-safe, and xgrammar
    compiles without holding the GIL, so servers may call it from a worker thread."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        *,
        any_whitespace: bool = False,
        cache_size: int = 256,
        max_threads: int = 2,
    ) -> None:
        # Compact JSON by default: free whitespace lets small models pad with newlines until max_tokens.
        self.vocab_size, self.any_whitespace, self.cache_size = vocab_size, any_whitespace, cache_size
        self.info = tokenizer_info(tokenizer, vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str], Grammar] = OrderedDict()
        self._json_tokens: torch.Tensor | None = None
        self._token_bytes: list[bytes] | None = None
        self._lock = threading.Lock()

    @property
    def stop_token_ids(self) -> list[int]:
        return self.info.stop_token_ids

    @property
    def token_bytes(self) -> list[bytes]:
        """Each logits column's bytes as the grammar reads them ("" for special and padding ids). Built
        once: xgrammar builds the list anew on every `decoded_vocab` read (~35 ms for 49k tokens)."""
        with self._lock:
            if self._token_bytes is None:
                self._token_bytes = list(self.info.decoded_vocab)
            return self._token_bytes

    def compile(self, kind: str, text: str) -> Grammar:
        """The compiled grammar of a constraint; an invalid one raises SglcError with the compiler's
        message. `json_object` (any JSON object) ignores `text`."""
        key = (kind, "" if kind == "json_object" else text)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        compiled = self._compile(*key)
        allowed = self._json_token_row() if kind in ("json_schema", "json_object") else None
        with self._lock:  # a racing compile of the same key: keep one
            grammar = self._cache.setdefault(key, Grammar(kind, compiled, allowed))
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _compile(self, kind: str, text: str) -> xgr.CompiledGrammar:
        if kind not in KINDS:
            raise SglcError(f"unknown constraint kind {kind!r} (one of {', '.join(KINDS)})")
        if kind == "json_schema":
            _check_schema(text)
        try:
            if kind == "regex":
                return self.compiler.compile_regex(text)
            if kind == "ebnf":
                return self.compiler.compile_grammar(text)
            schema = JSON_OBJECT_SCHEMA if kind == "json_object" else text
            return self.compiler.compile_json_schema(schema, any_whitespace=self.any_whitespace)
        except (RuntimeError, ValueError) as e:
            raise SglcError(f"invalid {kind}: {_xgr_message(e)}") from None

    def _json_token_row(self) -> torch.Tensor:
        """The tokens without a control character JSON output cannot hold raw (see `Grammar`)."""
        with self._lock:
            if self._json_tokens is None:
                bad = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]" if self.any_whitespace else rb"[\x00-\x1f]")
                allowed = np.ones(allocate_mask(1, self.vocab_size).shape[-1] * 32, dtype=bool)
                allowed[[i for i, t in enumerate(self.info.decoded_vocab) if bad.search(t)]] = False
                row = np.packbits(allowed, bitorder="little").view(np.int32)
                self._json_tokens = torch.from_numpy(row.copy())
            return self._json_tokens


# -- one request's matcher --------------------------------------------------------------------------------
class Constraint:
    """The grammar state of one request's output. Not thread-safe: one scheduler thread drives it.

    Protocol per decode step: `fill_mask(bitmask, row)` before sampling, `accept(token)` after. The
    grammar lets a stop token through only where the text is complete, and `is_terminated()` turns true
    once one is accepted."""

    def __init__(self, grammar: Grammar, stop_token_ids: Sequence[int] | None = None) -> None:
        stops = list(stop_token_ids) if stop_token_ids else None  # None: the tokenizer's eos ids
        self._matcher: xgr.GrammarMatcher | None = xgr.GrammarMatcher(
            grammar.compiled, override_stop_tokens=stops
        )
        info = grammar.compiled.tokenizer_info
        self._stop_ids = stops if stops is not None else info.stop_token_ids
        self._vocab_size = info.vocab_size
        self._allowed = grammar.allowed

    @property
    def matcher(self) -> xgr.GrammarMatcher:
        if self._matcher is None:
            raise RuntimeError("this constraint was released")
        return self._matcher

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False (state unchanged) if the grammar does not allow it."""
        if self._allowed is not None and not _has_bit(self._allowed, token_id):
            return False
        return self.matcher.accept_token(token_id)

    def accept_string(self, text: str) -> bool:
        """Advance by a string (one rollback step); False (state unchanged) if the grammar rejects it."""
        return self.matcher.accept_string(text)

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write the allowed next tokens into `bitmask[row]` (a CPU tensor from `allocate_mask`). Returns
        whether the row restricts anything. After termination only the stop tokens are allowed."""
        if self.matcher.is_terminated():
            bitmask[row].zero_()
            for t in self._stop_ids:
                bitmask[row, t // 32] |= _bit(t % 32)
            return True
        restricts = self.matcher.fill_next_token_bitmask(bitmask, row)
        if self._allowed is not None:
            bitmask[row] &= self._allowed
        return restricts or self._allowed is not None

    def is_terminated(self) -> bool:
        """A stop token was accepted: the output is complete."""
        return self.matcher.is_terminated()

    def is_completed(self) -> bool:
        """The output so far is a complete match (a stop token would be accepted now)."""
        return self.matcher.is_completed()

    def forced_stop(self) -> int | None:
        """The stop token if the output is complete and the grammar allows nothing else next (so the
        request may end without sampling it); else None."""
        if self.matcher.is_terminated() or not self.matcher.is_completed():
            return None
        row = allocate_mask(1, self._vocab_size)
        self.fill_mask(row, 0)
        allowed = [t for t in self._stop_ids if _has_bit(row[0], t)]
        for t in allowed:
            row[0, t // 32] &= ~_bit(t % 32)
        return allowed[0] if allowed and not bool(row.any()) else None

    def jump_forward(self) -> str:
        """The text the grammar forces next, whatever the model would pick ("" if none). The state is
        unchanged: tokenize the text and `accept` its tokens, or `retokenize` the output with it."""
        return self.matcher.find_jump_forward_string() if not self.matcher.is_terminated() else ""

    def rollback(self, steps: int) -> None:
        """Undo the last `steps` accepts (each accepted token or string is one step)."""
        if steps:
            self.matcher.rollback(steps)

    def retokenize(self, old_ids: Sequence[int], new_ids: Sequence[int]) -> bool:
        """The output was `old_ids` (every token accepted here) and is now `new_ids` (e.g. re-tokenized
        after a jump-forward): roll back past the common prefix and accept the rest. False if the
        grammar rejects a new token; the tokens before it stay accepted."""
        common = 0
        for a, b in zip(old_ids, new_ids, strict=False):
            if a != b:
                break
            common += 1
        self.rollback(len(old_ids) - common)
        return all(self.accept(t) for t in new_ids[common:])

    def release(self) -> None:
        """Drop the matcher (its memory goes with it); any later call raises."""
        self._matcher = None


def _bit(position: int) -> int:
    """Bit `position` of an int32 bitmask word, as the signed value torch stores."""
    return (1 << position) - (1 << 32) * (position == 31)


def _has_bit(row: torch.Tensor, token_id: int) -> bool:
    return 0 <= token_id < row.shape[-1] * 32 and bool((int(row[token_id // 32]) >> (token_id % 32)) & 1)


# -- the batch bitmask ------------------------------------------------------------------------------------
def allocate_mask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """A CPU int32 bitmask [batch, ceil(vocab/32)] with every token allowed (unconstrained rows stay so)."""
    return xgr.allocate_token_bitmask(batch_size, vocab_size)


def reset_mask(bitmask: torch.Tensor) -> None:
    """Allow every token in every row again."""
    xgr.reset_token_bitmask(bitmask)


def apply_mask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int] | None = None) -> None:
    """Set the logits of disallowed tokens to -inf in place. `logits` [B, V] (float32/16, bf16) on CPU or
    CUDA; `bitmask` from `allocate_mask` (copied to the logits' device if needed); `rows`: only these
    rows (default: all). Columns beyond the bitmask's width are disallowed too."""
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    width = bitmask.shape[-1] * 32
    indices = None if rows is None else list(rows)
    if indices == []:
        return
    if logits.shape[-1] > width:
        logits[indices if indices is not None else slice(None), width:] = float("-inf")
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=min(width, logits.shape[-1]), indices=indices)


# -- request fields -> a constraint -----------------------------------------------------------------------
def constraint_spec(
    *,
    json_schema: str | None = None,
    regex: str | None = None,
    ebnf: str | None = None,
    response_format: Mapping[str, Any] | None = None,
) -> tuple[str, str] | None:
    """(kind, text) from SGLang's fields (`json_schema` a JSON string, `regex`, `ebnf`) and OpenAI's
    `response_format`; None if unconstrained. More than one constraint is an SglcError."""
    given = {
        k: v for k, v in (("json_schema", json_schema), ("regex", regex), ("ebnf", ebnf)) if v is not None
    }
    fmt = _response_format(response_format) if response_format is not None else None
    if fmt is not None:
        given["response_format"] = fmt
    if len(given) > 1:
        raise SglcError(
            f"give at most one of json_schema, regex, ebnf, response_format (got {', '.join(given)})"
        )
    if not given:
        return None
    name, value = next(iter(given.items()))
    return value if name == "response_format" else (name, value)


def _response_format(fmt: Mapping[str, Any]) -> tuple[str, str] | None:
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ("json_object", "")
    if kind != "json_schema":
        raise SglcError(f"response_format.type must be text, json_object or json_schema, not {kind!r}")
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if schema is None:
        raise SglcError("response_format.json_schema.schema is required for type json_schema")
    return ("json_schema", schema if isinstance(schema, str) else json.dumps(schema))


def sampling_fields(spec: tuple[str, str] | None) -> dict[str, str]:
    """The native sampling parameters that carry a constraint (`json_object` is a `{"type": "object"}`
    schema, as in SGLang)."""
    if spec is None:
        return {}
    kind, text = spec
    return {"json_schema": JSON_OBJECT_SCHEMA} if kind == "json_object" else {kind: text}
