"""The in-process engine: compile a model, run the scheduler on its own thread, generate.

`generate` returns SGLang-style dicts: `text`, `output_ids`, `meta_info`
(`prompt_tokens`, `completion_tokens`, `cached_tokens`, `finish_reason`,
`e2e_latency`, and logprobs when asked). `async_generate` streams.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from sgl_compile.errors import SglcError
from sgl_compile.runtime.launch import EngineArgs, freeze_gc, launch, thaw_gc
from sgl_compile.runtime.request import Req
from sgl_compile.runtime.sampling_params import SamplingParams

log = logging.getLogger(__name__)

Listener = Callable[[Req], None]


def output_dict(req: Req, text_len: int | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": req.rid,
        "prompt_tokens": len(req.prompt_ids),
        "completion_tokens": len(req.output_ids),
        "cached_tokens": req.cached_tokens,
        "finish_reason": req.finish.to_dict() if req.finish else None,
        "e2e_latency": time.perf_counter() - req.created,
    }
    if req.params.return_logprob:
        meta["input_token_logprobs"] = list(req.input_logprobs)
        meta["output_token_logprobs"] = list(req.output_logprobs)
        if req.params.top_logprobs_num:
            meta["input_top_logprobs"] = list(req.input_top_logprobs)
            meta["output_top_logprobs"] = list(req.output_top_logprobs)
    text = req.text if text_len is None else req.text[:text_len]
    return {"text": text, "output_ids": list(req.output_ids), "meta_info": meta}


class Engine:
    """Engine(model=..., dtype=..., max_total_tokens=..., ...): the options of `EngineArgs`, named like the
    CLI flags; or Engine(EngineArgs(...))."""

    def __init__(self, args: EngineArgs | None = None, **options: Any) -> None:
        gc.collect()  # an engine shut down and dropped before this one: its memory, before the plan
        launched = launch(args or EngineArgs(**options))
        freeze_gc()
        self.compiled, self.scheduler = launched.compiled, launched.scheduler
        self.tokenizer = self.compiled.tokenizer
        self.context_length, self.eos_ids = launched.context_length, launched.eos_ids
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._listeners: dict[str, Listener] = {}
        self._error: BaseException | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sglc-scheduler", daemon=True)
        self._thread.start()
        self._started = time.perf_counter()

    # -- the scheduler thread -------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stopped.is_set():
                self._drain_commands(block=not self.scheduler.has_work())
                if self.scheduler.has_work():
                    for req in self.scheduler.step():
                        self._notify(req)
        except BaseException as e:  # never die silently: fail everything in flight
            log.exception("scheduler failed")
            self._error = e
            for rid in list(self._listeners):
                self._listeners.pop(rid)(None)

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        command()
        while True:
            try:
                self._commands.get_nowait()()
            except queue.Empty:
                return

    def _notify(self, req: Req) -> None:
        listener = self._listeners.get(req.rid)
        if listener is not None:
            if req.finished:
                del self._listeners[req.rid]
            listener(req)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the scheduler thread and return its result."""
        if self._error is not None:
            raise SglcError(f"engine is dead: {self._error}")
        done: queue.Queue = queue.Queue()

        def call() -> None:  # an exception goes back to the caller, not into the scheduler loop
            try:
                done.put((fn(), None))
            except Exception as e:
                done.put((None, e))

        self._commands.put(call)
        result, error = done.get()
        if error is not None:
            raise error
        return result

    # -- requests -------------------------------------------------------------------
    def _make_req(self, prompt: str | list[int], params: SamplingParams, rid: str | None) -> Req:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if any(not 0 <= t < self.compiled.config.vocab_size for t in ids):
            raise SglcError(f"input_ids must be in [0, {self.compiled.config.vocab_size})")
        return Req(rid or uuid.uuid4().hex, ids, params, self.tokenizer, self.eos_ids)

    def _submit(self, req: Req, listener: Listener) -> None:
        def add() -> None:
            self.scheduler.add(req)
            if req.finished:  # rejected at once
                listener(req)
            else:
                self._listeners[req.rid] = listener

        if self._error is not None:
            raise SglcError(f"engine is dead: {self._error}")
        self._commands.put(add)

    def _expand(self, prompt: str | list[int], params: SamplingParams, rid: str | None) -> list[Req]:
        """One Req per sample; n > 1 runs the prompt once first so that the samples share its KV."""
        if params.n == 1:
            return [self._make_req(prompt, params, rid)]
        self._wait(
            [self._make_req(prompt, replace(params, max_new_tokens=0, n=1, return_logprob=False), None)]
        )
        return [
            self._make_req(
                prompt,
                replace(params, n=1, seed=None if params.seed is None else params.seed + j),
                f"{rid}-{j}" if rid else None,
            )
            for j in range(params.n)
        ]

    def _wait(self, reqs: list[Req]) -> list[Req]:
        done: queue.Queue = queue.Queue()
        for req in reqs:
            self._submit(req, lambda r, req=req: done.put(req) if r is None or r.finished else None)
        for _ in reqs:
            done.get()
        if self._error is not None:
            raise SglcError(f"engine is dead: {self._error}")
        return reqs

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        rid: str | list[str] | None = None,
        **logprob_options: Any,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Generate for one prompt (a dict back) or a list (a list back; n > 1 gives n per prompt).
        `sampling_params` may be a list, one per prompt."""
        prompts, batched = _prompts(prompt, input_ids)
        per_prompt = (
            sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        )
        if len(per_prompt) != len(prompts):
            raise SglcError(f"{len(per_prompt)} sampling_params for {len(prompts)} prompts")
        params = [SamplingParams.from_dict({**(p or {}), **logprob_options}) for p in per_prompt]
        rids = [rid] if isinstance(rid, str) else rid
        reqs = []
        for i, (p, prm) in enumerate(zip(prompts, params, strict=True)):
            reqs += self._expand(p, prm, rids[i] if rids else None)
        reqs = self._wait(reqs)
        for req in reqs:
            if req.finish is not None and req.finish.kind == "error":
                raise SglcError(req.finish.message or "request failed")
        outputs = [output_dict(r) for r in reqs]
        return outputs if batched or params[0].n > 1 else outputs[0]

    async def async_generate(
        self,
        prompt: str | None = None,
        sampling_params: dict[str, Any] | None = None,
        input_ids: list[int] | None = None,
        rid: str | None = None,
        stream: bool = True,
        **logprob_options: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream one request: each item is the output so far (`text` held back where it could still
        turn into a stop string); the last has `finish_reason` set. Closing the iterator aborts."""
        prompts, _ = _prompts(prompt, input_ids)
        params = SamplingParams.from_dict({**(sampling_params or {}), **logprob_options})
        if params.n != 1:
            raise SglcError("async_generate streams one sample; use n=1")
        req = self._make_req(prompts[0], params, rid)
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()

        def listener(r: Req | None) -> None:
            # Snapshot on the scheduler thread: the Req keeps changing after this returns.
            item = None if r is None else output_dict(r, r.stream_safe_len())
            loop.call_soon_threadsafe(updates.put_nowait, item)

        self._submit(req, listener)
        finished = False
        try:
            while not finished:
                item = await updates.get()
                if item is None:
                    raise SglcError(f"engine is dead: {self._error}")
                finish = item["meta_info"]["finish_reason"]
                finished = finish is not None
                if finished and finish["type"] == "error":
                    raise SglcError(finish.get("message", "request failed"))
                if stream or finished:
                    yield item
        finally:
            if not finished:
                self.abort(req.rid)

    def abort(self, rid: str) -> bool:
        def do() -> bool:
            req = self.scheduler.abort(rid)
            if req is not None:
                self._notify(req)
            return req is not None

        return self._call(do)

    def flush_cache(self) -> bool:
        return self._call(self.scheduler.flush_cache)

    def get_stats(self) -> dict[str, float]:
        stats = self._call(self.scheduler.stats)
        stats["gen_throughput"] = stats["generated_tokens"] / max(time.perf_counter() - self._started, 1e-9)
        return stats

    def check_no_leaks(self) -> None:
        self._call(self.scheduler.check_no_leaks)

    def shutdown(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._thread.join(timeout=10)
        if self._error is None:  # later calls fail at once instead of waiting for a thread that is gone
            self._error = SglcError("the engine was shut down")
        thaw_gc()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _prompts(prompt: Any, input_ids: Any) -> tuple[list[str | list[int]], bool]:
    if (prompt is None) == (input_ids is None):
        raise SglcError("give exactly one of prompt and input_ids")
    if prompt is not None:
        if isinstance(prompt, str):
            return [prompt], False
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return list(prompt), True
        raise SglcError("prompt must be a string or a non-empty list of strings")
    if isinstance(input_ids, list) and input_ids and all(isinstance(t, int) for t in input_ids):
        return [input_ids], False
    if isinstance(input_ids, list) and input_ids and all(isinstance(x, list) for x in input_ids):
        return list(input_ids), True
    raise SglcError("input_ids must be a list of ints or a non-empty list of lists of ints")
