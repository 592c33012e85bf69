"""Programmatic dependent launch: off wherever it cannot run, and on Hopper a chain of kernels that
each read the previous one's output stays ordered inside a CUDA graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sgl_compile.codegen import norm, norm_linear, pdl, rope
from sgl_compile.ir import ops

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def test_off_on_cpu_and_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pdl.launch_kwargs(torch.device("cpu")) == {"PDL": False}
    assert not pdl.enabled(torch.device("cpu"))
    check = pdl._device_enabled.__wrapped__  # uncached: the environment is read per call here
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not check(0)
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("SGLC_DISABLE_PDL", "1")
    assert not check(0)


@pytest.mark.skipif(not HOPPER, reason="needs a GPU of compute capability 9.0 or later")
def test_chained_kernels_in_a_graph_read_their_producers_output() -> None:
    """GEMV -> norm -> GEMV -> rope ..., each kernel consuming the last one's output, captured once and
    replayed on fresh inputs: a kernel that ran ahead of its producer would read the previous
    replay's values (or the poison) and miss the reference."""
    assert pdl.enabled(torch.device("cuda")), "PDL should be on for Hopper with this Triton"
    torch.manual_seed(0)
    dev, dt, hidden, heads, d = "cuda", torch.bfloat16, 1024, 8, 128
    ws = [torch.randn(hidden, hidden, device=dev, dtype=dt) / hidden**0.5 for _ in range(6)]
    nw = torch.rand(hidden, device=dev, dtype=dt) + 0.5
    cos_sin = torch.randn(64, d, device=dev, dtype=torch.float32)
    positions = torch.tensor([17], device=dev)
    x = torch.empty(1, hidden, device=dev, dtype=dt)

    def chain(linear, rms_norm, rotate) -> torch.Tensor:
        h = x
        for w in ws:
            h = rms_norm(linear(h, w), nw, 1e-6)
            q = h.view(1, heads, d)
            h = rotate(q, q[:, :1], positions, cos_sin)[0].view(1, hidden)
        return h

    def kernels() -> torch.Tensor:
        return chain(norm_linear.linear, norm.rms_norm, lambda q, k, p, cs: rope.rope(q, k, p, cs))

    def reference() -> torch.Tensor:  # the ops' reference math, in plain torch
        def rms_norm(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
            hf = h.float()
            return w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)

        def rotate(q, k, p, cs):
            cos, sin = cs[p].unsqueeze(1).chunk(2, dim=-1)
            return ops._rotate(q, cos, sin), ops._rotate(k, cos, sin)

        return chain(lambda h, w: F.linear(h, w), rms_norm, rotate)

    x.copy_(torch.randn_like(x))
    kernels()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels()
    for _ in range(5):
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference()
        rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        assert rel < 2e-2, rel
