"""Programmatic dependent launch (Hopper and later) for the decode step's Triton kernels.

A batch-1 decode step is ~190 kernels of a few microseconds each; between two of them the GPU
drains the first grid, then launches and ramps up the second. A kernel launched with PDL may be
scheduled while the kernel before it on the stream is still running, as soon as every program of
that kernel has signalled (`gdc_launch_dependents`); it then blocks in `gdc_wait` until that kernel
has completed and its writes are visible. So launches and prologues overlap the previous kernel's
tail: on the H100, 808 -> 842 tok/s for the 1B shape at batch 1, the 8B's step unchanged
(docs/benchmarks.md, 2026-12-07 third session).

The contract every kernel launched through `launch_kwargs` keeps: nothing a preceding kernel
writes, and nothing it may still read, is touched before its wait (`wait_for_producers`, or
`wait_only` where the kernel releases its dependents at its end). Since each kernel
completes only after its own wait, waiting on the immediate predecessor orders it after all earlier
work too. Kernels launched without PDL (cuBLAS, torch) keep ordinary stream order.

Off on CPU, under the Triton interpreter (which has no grid-dependency ops), before compute
capability 9.0, on a Triton without `launch_pdl`, and where SGLC_DISABLE_PDL=1 (for A/B runs).
"""

from __future__ import annotations

import dataclasses
import os
from functools import cache

import torch
import triton
import triton.language as tl


@cache
def _triton_supports_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return any(f.name == "launch_pdl" for f in dataclasses.fields(CUDAOptions))


@cache
def _device_enabled(index: int) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("SGLC_DISABLE_PDL") == "1":
        return False
    if torch.version.hip is not None:  # ROCm reports "cuda" devices too, without griddepcontrol
        return False
    return torch.cuda.get_device_capability(index) >= (9, 0) and _triton_supports_pdl()


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with programmatic dependent launch."""
    if device.type != "cuda":
        return False
    return _device_enabled(device.index if device.index is not None else torch.cuda.current_device())


def launch_kwargs(device: torch.device) -> dict[str, bool]:
    """Keyword arguments for a kernel launch: the kernel's `PDL` constexpr, and Triton's launch
    option where it is on (absent otherwise, so Tritons without it never see the option)."""
    on = enabled(device)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def wait_for_producers(PDL: tl.constexpr):
    """Block until the preceding kernel has completed, then let the next kernel launch. Call it
    before the first access to memory that another kernel writes or reads."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_only(PDL: tl.constexpr):
    """`wait_for_producers` without letting the next kernel launch yet: for kernels whose programs
    should end (`release_dependents`) before the next kernel's are placed."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release_dependents(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
