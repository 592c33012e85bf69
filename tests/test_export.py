"""The fake implementations let a model be exported with a symbolic token count (the compiler's input)."""

from __future__ import annotations

import torch

from sgl_compile.models import model_class
from sgl_compile.models.config import ModelConfig

TINY = ModelConfig("qwen3", 64, 32, 64, 2, 4, 2, 16, 1e-6, 10000.0, 128, False, qk_norm=True)


def test_export_with_dynamic_tokens_keeps_sglc_ops() -> None:
    torch.manual_seed(0)
    model = model_class(TINY)(TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    tokens = torch.export.Dim("tokens", min=2, max=128)
    example = (torch.randint(0, 64, (7,)), torch.arange(7))
    exported = torch.export.export(model, example, dynamic_shapes=({0: tokens}, {0: tokens}))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    for op in ("sglc.rms_norm", "sglc.rope", "sglc.attention", "sglc.silu_and_mul", "sglc.embedding"):
        assert any(t.startswith(op) for t in targets), op
    ids = torch.randint(0, 64, (19,))
    with torch.no_grad():
        assert torch.allclose(
            exported.module()(ids, torch.arange(19)), model(ids, torch.arange(19)), atol=1e-5
        )
