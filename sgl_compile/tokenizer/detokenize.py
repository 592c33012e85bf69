"""Incremental detokenization for streaming.

Decoding one token at a time is wrong twice over: a multi-byte UTF-8 character
can span several byte-level tokens, and tokenizers drop or add a leading space
depending on what precedes a token. So we decode a short window that starts a
few tokens back (`prefix_offset`), compare it with the same window without the
new tokens, and emit the difference, holding text back while it ends in an
incomplete character (U+FFFD).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

_CONTEXT = 5  # tokens of already-emitted context decoded with each step


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass
class IncrementalDetokenizer:
    tokenizer: Decoder
    prompt_ids: list[int] = field(default_factory=list)
    skip_special_tokens: bool = True
    ids: list[int] = field(init=False)
    prefix_offset: int = field(init=False)
    read_offset: int = field(init=False)

    def __post_init__(self) -> None:
        self.ids = list(self.prompt_ids)
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - _CONTEXT, 0)

    def _window(self, end: int) -> str:
        return self.tokenizer.decode(self.ids[self.prefix_offset : end], self.skip_special_tokens)

    def push(self, *token_ids: int) -> str:
        """Append generated tokens; return the text they complete (possibly empty)."""
        self.ids.extend(token_ids)
        before = self._window(self.read_offset)
        after = self._window(len(self.ids))
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Text still held back at the end of the stream (an incomplete character decodes as U+FFFD)."""
        before = self._window(self.read_offset)
        after = self._window(len(self.ids))
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before) :]
