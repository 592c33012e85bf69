"""The stream-K GEMV of benchmarks/gemv_balance.py (a measurement probe) computes the GEMV: row blocks
whole in one program and row blocks split between two (summed from two partial slots) alike, and the
arrival counters are back at zero for the next launch. fp16: the interpreter's bf16 is not the GPU's."""

from __future__ import annotations

import pytest
import torch

from benchmarks.gemv_balance import streamk_gemv


@pytest.mark.parametrize(
    ("n", "k", "gated", "bn", "bk", "sms"),
    [
        (48, 256, False, 4, 64, 5),
        (40, 200, True, 4, 64, 3),
        (64, 512, False, 2, 128, 7),
        (36, 128, True, 8, 32, 4),
    ],
)
def test_streamk_gemv_matches_the_matmul(n, k, gated, bn, bk, sms) -> None:
    torch.manual_seed(n + k)
    dt = torch.float16
    w = (torch.randn(2 * n if gated else n, k) * 0.1).to(dt)
    x = torch.randn(1, k).to(dt)
    y = x.double() @ w.double().t()
    if gated:  # the engine's epilogue: gate and up rounded, silu rounded, then the product
        gate, up = y[:, :n].to(dt).double(), y[:, n:].to(dt).double()
        y = (gate / (1 + torch.exp(-gate))).to(dt).double() * up
    cfg = {"c": 1, "BN": bn, "BK": bk, "warps": 4, "stages": 1}
    for _ in range(2):  # the second launch reads counters the first left
        out = torch.full((1, n), float("nan"), dtype=dt)
        streamk_gemv(x, w, out, gated, cfg, sms)
        # fp32 sums in another order than float64's, then the output's rounding
        torch.testing.assert_close(out.double(), y, atol=1e-6, rtol=2**-10)
