"""The loop inside the scheduler process: commands in, one step, snapshots out."""

from __future__ import annotations

import logging
import signal

import zmq

from sgl_compile.errors import SglcError
from sgl_compile.runtime.engine import output_dict
from sgl_compile.runtime.launch import EngineArgs, freeze_gc, launch
from sgl_compile.runtime.request import FinishReason, Req
from sgl_compile.runtime.sampling_params import SamplingParams
from sgl_compile.server.scheduler_process import Abort, Query, Ready, Reply, Submit, Updates

log = logging.getLogger(__name__)


class SchedulerCore:
    def __init__(self, args: EngineArgs) -> None:
        launched = launch(args)
        freeze_gc()  # (this process only serves from here on; its exit thaws it)
        self.compiled, self.scheduler = launched.compiled, launched.scheduler
        self.context_length, self.eos_ids = launched.context_length, launched.eos_ids
        self.stopping = False

    def ready(self) -> Ready:
        c = self.compiled.config
        return Ready(self.scheduler.kv.size, self.context_length, c.vocab_size, sorted(self.eos_ids))

    def handle(self, msg: object, push: zmq.Socket) -> list[Req]:
        """Apply one command; return requests that finished because of it (rejected or aborted)."""
        if isinstance(msg, Submit):
            try:
                params = SamplingParams.from_dict(msg.params)
            except SglcError as e:  # the HTTP side validates first; never let a request kill the loop
                params, error = SamplingParams(), str(e)
            else:
                error = None
            req = Req(msg.rid, msg.input_ids, params, self.compiled.tokenizer, self.eos_ids)
            if error:
                req.finish = FinishReason("error", message=error)
            else:
                self.scheduler.add(req)
            return [req] if req.finished else []
        if isinstance(msg, Abort):
            req = self.scheduler.abort(msg.rid)
            return [req] if req else []
        if isinstance(msg, Query):
            answer = self.scheduler.flush_cache() if msg.kind == "flush" else self.scheduler.stats()
            push.send_pyobj(Reply(msg.token, answer))
        elif msg is None:
            self.stopping = True
        return []

    def serve(self, pull: zmq.Socket, push: zmq.Socket) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        while not self.stopping:
            timeout = 0 if self.scheduler.has_work() else 100
            changed: list[Req] = []
            while poller.poll(timeout):
                changed += self.handle(pull.recv_pyobj(), push)
                timeout = 0
            if self.scheduler.has_work():
                changed += self.scheduler.step()
            if changed:
                outputs = [output_dict(r, r.stream_safe_len()) for r in changed]
                push.send_pyobj(Updates(outputs, self.scheduler.stats()))
