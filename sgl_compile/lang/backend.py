"""Where a program's calls go: the contract, and the in-process `Engine` behind it.

Every call carries token ids, tokenized here with the model's tokenizer, so `select` can find where the
prompt ends and a choice begins, and forks send identical prefixes that the radix cache shares.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

from sgl_compile.runtime.engine import Engine
from sgl_compile.tokenizer import Tokenizer


class Backend(ABC):
    """A model to run program calls on. Implementations must be safe to call from many threads at once
    (forks and `run_batch` do): that is what lets concurrent calls batch in the engine.

    Outputs are SGLang's native dicts: `text`, `output_ids`, `meta_info` (with `prompt_tokens`,
    `completion_tokens`, `cached_tokens`, `finish_reason`, and `input_token_logprobs`, a list of
    (logprob, token id) from `logprob_start_len` on, when logprobs were asked for)."""

    @property
    @abstractmethod
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer (its chat template renders role blocks)."""

    @abstractmethod
    def generate(
        self,
        input_ids: list[list[int]],
        sampling_params: dict[str, Any],
        return_logprob: bool = False,
        logprob_start_len: int = -1,
    ) -> list[dict[str, Any]]:
        """One batched request: an output per prompt, in order."""

    @abstractmethod
    def stream(self, input_ids: list[int], sampling_params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Outputs of one request as it runs, each with the whole `text` so far; the last has a
        `finish_reason`. Closing the iterator early aborts the request."""

    def encode(self, text: str) -> list[int]:
        """Token ids of a program's text, with BOS added per the tokenizer unless the text has it."""
        tok = self.tokenizer
        bos = tok.backend.id_to_token(tok.bos_token_id) if tok.bos_token_id is not None else None
        return tok.encode(text, add_special_tokens=not (bos and text.startswith(bos)))


class EngineBackend(Backend):
    """The in-process engine: `EngineBackend(Engine(model=...))`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        input_ids: list[list[int]],
        sampling_params: dict[str, Any],
        return_logprob: bool = False,
        logprob_start_len: int = -1,
    ) -> list[dict[str, Any]]:
        return self.engine.generate(
            input_ids=[list(ids) for ids in input_ids],
            sampling_params=sampling_params,
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
        )

    def stream(self, input_ids: list[int], sampling_params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        # Each calling thread drives the engine's async stream on an event loop of its own.
        loop = asyncio.new_event_loop()
        outputs = self.engine.async_generate(input_ids=list(input_ids), sampling_params=sampling_params)
        try:
            while True:
                try:
                    yield loop.run_until_complete(anext(outputs))
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(outputs.aclose())
            loop.close()

    def close(self) -> None:
        """Shut the engine down."""
        self.engine.shutdown()
