"""The HTTP process's handle on the scheduler process: spawn it, submit, stream, abort, watch it."""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import zmq
import zmq.asyncio

from sgl_compile.errors import SglcError
from sgl_compile.runtime.launch import EngineArgs
from sgl_compile.server.scheduler_process import (
    Abort,
    Failed,
    Query,
    Ready,
    Reply,
    Submit,
    Updates,
    run_scheduler,
)

log = logging.getLogger(__name__)


class SchedulerDied(SglcError):
    pass


class EngineClient:
    def __init__(self, args: EngineArgs, on_update: Callable[[dict, float], None] | None = None) -> None:
        self.args = args
        self.on_update = on_update  # metrics hook: (snapshot, arrival time)
        self._dir = tempfile.mkdtemp(prefix="sglc-ipc-")
        self._inbound, self._outbound = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        self._proc = mp.get_context("spawn").Process(
            target=run_scheduler, args=(args, self._inbound, self._outbound), daemon=True
        )
        self._spawned = False
        self._ctx: zmq.asyncio.Context | None = None  # sockets are made inside the event loop (start)
        self._streams: dict[str, asyncio.Queue] = {}
        self._queries: dict[int, asyncio.Future] = {}
        self._tokens = itertools.count()
        self.ready: Ready | None = None
        self.stats: dict[str, float] = {}
        self.dead = False
        self._tasks: list[asyncio.Task] = []

    def spawn(self) -> None:
        """Start the scheduler process now, before the event loop runs: it loads the model while this
        process goes on (importing the HTTP stack). Its sockets connect and wait until `start` binds."""
        if not self._spawned:
            self._proc.start()
            self._spawned = True

    async def start(self, on_death: Callable[[], None]) -> Ready:
        """Bind the sockets, spawn the process if `spawn` did not, and wait for its Ready."""
        self._ctx = zmq.asyncio.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._pull = self._ctx.socket(zmq.PULL)
        self._push.bind(self._inbound)
        self._pull.bind(self._outbound)
        self.spawn()
        while True:
            if await self._pull.poll(200):
                msg = await self._pull.recv_pyobj()
                break
            if not self._proc.is_alive():
                raise SglcError(f"the scheduler process exited during start-up (code {self._proc.exitcode})")
        if isinstance(msg, Failed):
            raise SglcError(msg.message)
        assert isinstance(msg, Ready)
        self.ready = msg
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._watch(on_death))]
        return msg

    async def _read(self) -> None:
        while True:
            msg = await self._pull.recv_pyobj()
            now = time.perf_counter()
            if isinstance(msg, Updates):
                self.stats = msg.stats
                for out in msg.outputs:
                    if self.on_update:
                        self.on_update(out, now)
                    queue = self._streams.get(out["meta_info"]["id"])
                    if queue is not None:
                        queue.put_nowait(out)
            elif isinstance(msg, Reply) and msg.token in self._queries:
                self._queries.pop(msg.token).set_result(msg.value)

    async def _watch(self, on_death: Callable[[], None]) -> None:
        while self._proc.is_alive():
            await asyncio.sleep(0.2)
        if self.dead:  # we stopped it
            return
        self.dead = True
        log.error("the scheduler process died (exit code %s); shutting down", self._proc.exitcode)
        for queue in self._streams.values():
            queue.put_nowait(None)
        for fut in self._queries.values():
            fut.set_exception(SchedulerDied("the scheduler process died"))
        on_death()

    def _check(self) -> None:
        if self.dead:
            raise SchedulerDied("the scheduler process died")

    async def generate(self, rid: str, input_ids: list[int], params: dict[str, Any]) -> AsyncIterator[dict]:
        """Snapshots of the request as it progresses; the last has a finish_reason. Leaving early aborts."""
        self._check()
        if rid in self._streams:
            raise SglcError(f"request id {rid!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = queue
        finished = False
        try:
            await self._push.send_pyobj(Submit(rid, input_ids, params))
            while not finished:
                out = await queue.get()
                if out is None:
                    raise SchedulerDied("the scheduler process died")
                finished = out["meta_info"]["finish_reason"] is not None
                yield out
        finally:
            del self._streams[rid]
            if not finished and not self.dead:
                await self._push.send_pyobj(Abort(rid))

    async def abort(self, rid: str) -> None:
        self._check()
        await self._push.send_pyobj(Abort(rid))

    async def query(self, kind: str) -> Any:
        """Ask the scheduler between steps: "flush" -> whether the cache was flushed, "stats" -> dict."""
        self._check()
        token = next(self._tokens)
        fut = asyncio.get_running_loop().create_future()
        self._queries[token] = fut
        await self._push.send_pyobj(Query(token, kind))
        return await fut

    def running(self) -> int:
        return len(self._streams)

    async def shutdown(self) -> None:
        self.dead = True
        for task in self._tasks:
            task.cancel()
        if self._proc.is_alive() and self._ctx is not None:
            await self._push.send_pyobj(None)
            await asyncio.to_thread(self._proc.join, 10)
        if self._proc.is_alive():
            self._proc.terminate()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)
