"""The scheduler process: owns the compiled model and the Scheduler; talks to the HTTP process over ZeroMQ.

Inbound (PULL): `Submit`, `Abort`, `Query`. Outbound (PUSH): one `Updates` message
per step with a snapshot of every request that changed, plus the scheduler's
stats, and a `Reply` to each `Query`. The first message out is `Ready` (or `Failed`).
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from typing import Any

import zmq

from sgl_compile.errors import SglcError
from sgl_compile.runtime.launch import EngineArgs


@dataclass
class Submit:
    rid: str
    input_ids: list[int]
    params: dict[str, Any]


@dataclass
class Abort:
    rid: str


@dataclass
class Query:
    """A question answered between steps: "flush" (-> bool) or "stats" (-> dict)."""

    token: int
    kind: str


@dataclass
class Reply:
    token: int
    value: Any


@dataclass
class Ready:
    max_total_tokens: int
    context_length: int
    vocab_size: int
    eos_ids: list[int]


@dataclass
class Failed:
    message: str


@dataclass
class Updates:
    outputs: list[dict[str, Any]]  # engine.output_dict snapshots (text held back for stop strings)
    stats: dict[str, float] = field(default_factory=dict)


def run_scheduler(args: EngineArgs, inbound: str, outbound: str) -> None:
    """Process entry point. Exits when the parent closes the inbound socket or on SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s scheduler: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and tells us to stop
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(inbound)
    push.connect(outbound)
    try:
        core = _build(args)
    except SglcError as e:
        push.send_pyobj(Failed(str(e)))
        return
    push.send_pyobj(core.ready())
    core.serve(pull, push)


def _build(args: EngineArgs) -> Any:
    from sgl_compile.server.core import SchedulerCore

    return SchedulerCore(args)
