"""Driving a Scheduler by hand in tests."""

from __future__ import annotations

from sgl_compile.runtime.request import Req
from sgl_compile.runtime.scheduler import Scheduler


def drain(sched: Scheduler) -> None:
    """Step until nothing is left, then drop the cache and check that no slot, row or grammar leaked."""
    while sched.has_work():
        sched.step()
    sched.cache.flush()
    sched.check_no_leaks()


def run_to_completion(sched: Scheduler, reqs: list[Req]) -> None:
    for r in reqs:
        sched.add(r)
    drain(sched)
