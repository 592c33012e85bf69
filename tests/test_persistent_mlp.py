"""The persistent o + MLP kernel of benchmarks/persistent_mlp.py (a measurement probe) computes the
layer's tail: o projection, residual add, RMS norm, gate/up with SiLU and down, each program walking
several row blocks. The interpreter runs one phase a launch (a program spinning on a grid barrier
would never return there); the barriers themselves run on the GPU probe. fp16: the interpreter's bf16
is not the GPU's."""

from __future__ import annotations

import pytest
import torch

from benchmarks.persistent_mlp import EPS, Config, Fused


def _reference(a, wo, r, nw, wgu, wd, dt):
    o = (a.double() @ wo.double().t()).to(dt)
    s = (o.double() + r.double()).to(dt)
    rstd = torch.rsqrt(s.double().pow(2).mean(-1, keepdim=True) + EPS)
    gu = (s.double() * nw.double()) @ wgu.double().t() * rstd
    inter = wgu.shape[0] // 2
    gate, up = gu[:, :inter].to(dt).double(), gu[:, inter:].to(dt).double()
    h = ((gate / (1 + torch.exp(-gate))).to(dt).double() * up).to(dt)
    return o, s, h, (h.double() @ wd.double().t()).to(dt)


@pytest.mark.parametrize(
    ("hidden", "inter", "bn", "bn_gu", "bk", "grid", "fuse_o"),
    [(64, 96, 4, 8, 32, 3, True), (64, 128, 2, 4, 64, 5, True), (32, 64, 8, 16, 16, 2, False)],
)
def test_phases_match_the_reference(hidden, inter, bn, bn_gu, bk, grid, fuse_o) -> None:
    torch.manual_seed(hidden + inter)
    dt = torch.float16
    a, r = torch.randn(1, hidden).to(dt), torch.randn(1, hidden).to(dt)
    wo = (torch.randn(hidden, hidden) * 0.1).to(dt)
    wgu = (torch.randn(2 * inter, hidden) * 0.1).to(dt)
    wd = (torch.randn(hidden, inter) * 0.1).to(dt)
    nw = (1 + 0.1 * torch.randn(hidden)).to(dt)
    o_ref, s_ref, h_ref, out_ref = _reference(a, wo, r, nw, wgu, wd, dt)
    o = o_ref.clone() if not fuse_o else torch.full((1, hidden), float("nan"), dtype=dt)
    hb = torch.full((1, inter), float("nan"), dtype=dt)
    out, s = torch.full((1, hidden), float("nan"), dtype=dt), torch.full((1, hidden), float("nan"), dtype=dt)
    cfg = Config(fuse_o, 4, bn, bn_gu, bk, bn, bk=bk)
    Fused(cfg, hidden, inter).phases(a, wo, o, r, nw, wgu, hb, wd, out, s, grid=grid)
    # fp32 sums in another order than float64's, then each output's rounding
    close = {"atol": 1e-3, "rtol": 2**-9}
    torch.testing.assert_close(o.double(), o_ref.double(), **close)
    torch.testing.assert_close(s.double(), s_ref.double(), atol=0, rtol=0)
    torch.testing.assert_close(hb.double(), h_ref.double(), **close)
    torch.testing.assert_close(out.double(), out_ref.double(), **close)
