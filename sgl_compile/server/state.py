"""What the HTTP handlers share: the engine client, the tokenizer, input checks, and fan-out of n samples."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sgl_compile.errors import SglcError
from sgl_compile.runtime.grammar import GrammarBackend
from sgl_compile.server.client import EngineClient
from sgl_compile.server.metrics import Metrics
from sgl_compile.tokenizer import Tokenizer


class RequestError(SglcError):
    """A 4xx: what is wrong with the request and which field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


@dataclass
class ServerState:
    client: EngineClient
    tokenizer: Tokenizer
    metrics: Metrics
    model: str  # the spec it was started with
    served_model_name: str
    max_queued_requests: int
    _grammar: GrammarBackend | None = field(default=None, init=False, repr=False)
    _grammar_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def context_length(self) -> int:
        return self.client.ready.context_length

    # -- input checks -------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name not in (self.served_model_name, self.model):
            raise RequestError(
                f"model {name!r} is not served here (this server serves {self.served_model_name!r})", "model"
            )

    def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens)
        if not ids:
            raise RequestError(f"{param} must not be empty", param)
        return self.check_ids(ids, param)

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = self.client.ready.vocab_size
        if not ids:
            raise RequestError(f"{param} must not be empty", param)
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise RequestError(f"{param}: token ids must be in [0, {vocab})", param)
        if len(ids) >= self.context_length:
            raise RequestError(
                f"{param} has {len(ids)} tokens; this model's context length is {self.context_length}", param
            )
        return ids

    def check_budget(self, ids: list[int], max_tokens: int | None, param: str) -> int:
        """max new tokens for a prompt: the request's, or whatever the context and KV pool leave."""
        room = min(self.context_length, self.client.ready.max_total_tokens) - len(ids)
        if max_tokens is None:
            return max(room, 1)
        if max_tokens > room:
            raise RequestError(
                f"{param}={max_tokens} plus the prompt's {len(ids)} tokens exceeds the limit of "
                f"{min(self.context_length, self.client.ready.max_total_tokens)} tokens",
                param,
            )
        return max_tokens

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages)
        except SglcError as e:
            raise RequestError(str(e), "messages") from None

    def _grammar_backend(self) -> GrammarBackend:
        with self._grammar_lock:  # built on first use, in a worker thread
            if self._grammar is None:
                self._grammar = GrammarBackend(self.tokenizer, self.client.ready.vocab_size)
            return self._grammar

    async def check_constraint(self, spec: tuple[str, str] | None, param: str) -> None:
        """Compile a structured-output constraint here (off the event loop), so that an invalid one is a
        400 naming `param`; the scheduler compiles it again for the mask."""
        if spec is None:
            return
        try:
            await asyncio.to_thread(lambda: self._grammar_backend().compile(*spec))
        except SglcError as e:
            raise RequestError(str(e), param) from None

    def _admit(self, count: int) -> None:
        if self.client.running() + count > self.max_queued_requests:
            raise RequestError("the server is overloaded; retry later", None, status=503)

    # -- running requests ---------------------------------------------------------
    async def _one(self, rid: str, ids: list[int], params: dict) -> AsyncIterator[dict]:
        self.metrics.start(rid)
        async for out in self.client.generate(rid, ids, params):
            finish = out["meta_info"]["finish_reason"]
            if finish is not None and finish["type"] == "error":
                raise RequestError(finish.get("message", "request failed"))
            yield out

    async def _share_prompt(self, rid: str, ids: list[int], params: dict, n: int) -> None:
        """n > 1: run the prompt once so that the n samples find it in the radix cache."""
        if n > 1:
            async for _ in self._one(
                f"{rid}-prefill", ids, {**params, "max_new_tokens": 0, "return_logprob": False}
            ):
                pass

    def _jobs(
        self, rid: str, prompts: list[list[int]], params: list[dict], n: int
    ) -> list[tuple[str, list[int], dict]]:
        jobs = []
        for p, (ids, prm) in enumerate(zip(prompts, params, strict=True)):
            for i in range(n):
                seed = prm.get("seed")
                sample = {**prm, "seed": None if seed is None else seed + i}
                jobs.append((rid if len(prompts) * n == 1 else f"{rid}-{p}-{i}", ids, sample))
        return jobs

    async def run_all(self, rid: str, prompts: list[list[int]], params: list[dict], n: int) -> list[dict]:
        """Final outputs, prompt-major then sample order."""
        self._admit(len(prompts) * n)
        for ids, prm in zip(prompts, params, strict=True):
            await self._share_prompt(rid, ids, prm, n)

        async def last(job: tuple[str, list[int], dict]) -> dict:
            outs = [out async for out in self._one(*job)]
            return outs[-1]

        return list(await asyncio.gather(*(last(j) for j in self._jobs(rid, prompts, params, n))))

    async def stream_all(
        self, rid: str, prompts: list[list[int]], params: list[dict], n: int
    ) -> AsyncIterator[tuple[int, str | None, dict]]:
        """(choice index, new text, snapshot) as outputs arrive; (index, None, final) closes each choice.
        Cancelling the consumer (a client that disconnected) cancels and aborts every sample."""
        self._admit(len(prompts) * n)
        for ids, prm in zip(prompts, params, strict=True):
            await self._share_prompt(rid, ids, prm, n)
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, job: tuple[str, list[int], dict]) -> None:
            try:
                async for out in self._one(*job):
                    await queue.put((index, out, None))
            except Exception as e:  # surfaced to the consumer
                await queue.put((index, None, e))
            await queue.put((index, None, None))

        jobs = self._jobs(rid, prompts, params, n)
        tasks = [asyncio.create_task(pump(i, j)) for i, j in enumerate(jobs)]
        sent, last, open_ = [0] * len(jobs), [None] * len(jobs), len(jobs)
        try:
            while open_:
                index, out, error = await queue.get()
                if error is not None:
                    raise error
                if out is None:
                    open_ -= 1
                    yield index, None, last[index]
                    continue
                last[index] = out
                delta = out["text"][sent[index] :]
                if delta or out["meta_info"]["finish_reason"] is not None:
                    sent[index] = len(out["text"])
                    yield index, delta, out
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
