"""Triton kernels first built inside a timed region: their names and seconds.

A kernel specialization is compiled (or loaded from Triton's disk cache) the first time a process
launches it. Inside a timed benchmark that is start-up work counted as serving time: a cold kernel
cache cost the qwen3 offline run ~2 s of its ~8 (docs/benchmarks.md). `record_builds` makes the
benchmark say so instead of leaving it to a comparison of runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class Builds:
    """Kernels built while recording: (kernel name, seconds), in order."""

    kernels: list[tuple[str, float]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(s for _, s in self.kernels)

    def summary(self) -> dict[str, object]:
        by_name: dict[str, float] = {}
        for name, s in self.kernels:
            by_name[name] = by_name.get(name, 0.0) + s
        return {
            "kernel_builds": len(self.kernels),
            "kernel_build_s": self.seconds,
            "kernel_builds_by_name": {
                n: round(s, 3) for n, s in sorted(by_name.items(), key=lambda x: -x[1])
            },
        }


def timed(build: Callable, builds: Builds) -> Callable:
    """`build` (a JITFunction's compile-or-load step, called as a method) that also records its time."""

    def wrapper(jit_fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return build(jit_fn, *args, **kwargs)
        finally:
            name = getattr(getattr(jit_fn, "fn", None), "__name__", type(jit_fn).__name__)
            builds.kernels.append((name, time.perf_counter() - start))

    return wrapper


@contextlib.contextmanager
def record_builds() -> Iterator[Builds]:
    """Record the Triton kernels built in the block (none where kernels are interpreted, or where this
    Triton has no per-specialization build step to wrap)."""
    builds = Builds()
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:  # (no Triton: nothing is built)
        yield builds
        return
    original = getattr(JITFunction, "_do_compile", None)
    if original is None:
        yield builds
        return
    JITFunction._do_compile = timed(original, builds)
    try:
        yield builds
    finally:
        JITFunction._do_compile = original
