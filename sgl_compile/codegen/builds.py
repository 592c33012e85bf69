"""Triton kernels first built inside a region: their names, seconds and specializations.

A kernel specialization is compiled (or loaded from Triton's disk cache) the first time a process
launches it. Inside a timed benchmark that is start-up work counted as serving time: a cold kernel
cache cost the qwen3 offline run ~2 s of its ~8 (docs/benchmarks.md). `record_builds` makes the
benchmark say so instead of leaving it to a comparison of runs, and the server's start-up log name
the kernels it compiled (seconds each) that a compiled artifact should have carried.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache

# A load from Triton's disk cache takes milliseconds, a compile a second or more.
COMPILE_S = 0.2


@dataclass
class Builds:
    """Kernels built while recording: (kernel name, seconds), in order."""

    kernels: list[tuple[str, float]] = field(default_factory=list)
    specializations: list[str] = field(default_factory=list)  # each build's constexprs, in order

    @property
    def seconds(self) -> float:
        return sum(s for _, s in self.kernels)

    def compiled(self, threshold_s: float = COMPILE_S) -> list[tuple[str, float, str]]:
        """The builds slower than a load from the disk cache (milliseconds): real compiles."""
        return [(n, t, spec) for (n, t), spec in zip(self.kernels, self.specializations, strict=True)
                if t >= threshold_s]  # fmt: skip

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
    """`build` (a JITFunction's compile-or-load step, called as a method: key, signature, device,
    constexprs, ...) that also records its time and constexprs."""

    def wrapper(jit_fn, *args, **kwargs):
        _hash_triton()  # (once a process, untimed; nothing to hash where nothing is built)
        start = time.perf_counter()
        try:
            return build(jit_fn, *args, **kwargs)
        finally:
            name = getattr(getattr(jit_fn, "fn", None), "__name__", type(jit_fn).__name__)
            builds.kernels.append((name, time.perf_counter() - start))
            names = getattr(jit_fn, "arg_names", [])
            constexprs = kwargs.get("constexprs", args[3] if len(args) > 3 else None)
            attrs = kwargs.get("attrs", args[5] if len(args) > 5 else None)
            spec = "; ".join(filter(None, (_constexprs(names, constexprs), _attrs(names, attrs))))
            builds.specializations.append(spec)

    return wrapper


def _arg_name(arg_names: list[str], path: object) -> str:
    """The argument an index path (Triton's key for constexprs and attributes) names."""
    if isinstance(path, tuple) and len(path) == 1 and isinstance(path[0], int) and path[0] < len(arg_names):
        return arg_names[path[0]]
    return str(path)


def _constexprs(arg_names: list[str], constexprs: object) -> str:
    """ "NAME=value, ..." of a build's constexprs, or ""."""
    if not isinstance(constexprs, dict):
        return ""
    return ", ".join(f"{_arg_name(arg_names, k)}={v}" for k, v in constexprs.items())


def _attrs(arg_names: list[str], attrs: object) -> str:
    """ "NAME%16, ..." of the arguments Triton specialized as divisible by 16 (pointers and integers),
    which its cache key includes as well as the constexprs; or ""."""
    if not isinstance(attrs, dict):
        return ""
    out = []
    for path, specs in attrs.items():
        for spec in specs or ():
            if isinstance(spec, (list, tuple)) and len(spec) == 2 and spec[0] == "tt.divisibility":
                out.append(f"{_arg_name(arg_names, path)}%{spec[1]}")
    return ", ".join(out)


@cache
def _hash_triton() -> None:
    """Triton's first build in a process hashes its own installation (`triton_key`, cached after: 0.4 s,
    most of it libtriton), a one-time cost that would read as the first kernel's compile."""
    import importlib

    for module in ("triton.runtime.cache", "triton.compiler.compiler"):
        try:
            key = getattr(importlib.import_module(module), "triton_key", None)
        except ImportError:
            continue
        if key is not None:
            key()
            return


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
