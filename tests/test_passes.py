"""The pass pipeline: after every pass the program still computes the reference model's logits."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from sgl_compile.ir.capture import capture, input_names
from sgl_compile.models.loading import LoadedModel, load_model
from sgl_compile.passes import DEFAULT_PASSES, run_passes
from sgl_compile.passes.lower_attention import prefill_inputs


def _run(gm: fx.GraphModule, m: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """One sequence through the program at whatever stage it is (before or after attention lowering)."""
    c = m.config
    dtype = next(m.model.parameters()).dtype
    available = prefill_inputs([ids.tolist()], (c.num_layers, c.num_kv_heads, c.head_dim), dtype, "cpu", True)
    with torch.no_grad():
        return gm(**{name: available[name] for name in input_names(gm)}).float()


def _check_every_pass(m: LoadedModel, rtol: float) -> list:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, m.config.vocab_size, (n,), generator=gen) for n in (1, 7, 40)]
    with torch.no_grad():
        refs = [m.model(ids, torch.arange(len(ids))).float() for ids in batches]
    checked = []

    def check(label: str, gm: fx.GraphModule) -> None:
        for ids, ref in zip(batches, refs, strict=True):
            got = _run(gm, m, ids)
            diff = (got - ref).abs().max().item()
            assert diff <= rtol * ref.abs().max().item(), f"{label}: max |diff| {diff}"
            assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= (1.0 if rtol < 1e-3 else 0.9), label
        checked.append(label)

    gm = capture(m.model, m.config.max_position_embeddings)
    reports = run_passes(gm, DEFAULT_PASSES, check)
    assert checked == ["captured"] + [f"after {name}" for name, _ in DEFAULT_PASSES]
    return reports


def _counts(reports) -> dict[str, int]:
    return {k: v for r in reports for k, v in r.counts.items()}


@pytest.mark.parametrize("name", ["smollm2", "qwen05"])
def test_every_pass_preserves_fp32_logits_and_fuses_every_layer(
    name: str, request: pytest.FixtureRequest
) -> None:
    m = request.getfixturevalue(name)
    layers = m.config.num_layers
    counts = _counts(_check_every_pass(m, rtol=1e-5))
    assert counts == {
        "logits_pruned": 1,
        "qkv_merged": layers,
        "gate_up_merged": layers,
        "fused_add_rms_norm": 2 * layers - 1,  # every residual add but the last, whose norm sees pruned rows
        "paged_attention": layers,
        "rope_store_kv": layers,
        "rms_norm_linear": 2,  # the first layer's input norm (no residual yet) and the final norm + LM head
        "add_rms_norm_linear": 2 * layers - 1,
        "silu_and_mul_fused": layers,
    }


def test_every_pass_preserves_bf16_logits(smollm2_gguf) -> None:
    """bf16: each pass reorders roundings (a merged GEMM, a fused add), so logits move by a few bf16 ulps
    of their magnitude; 2% of the largest logit is far above that and far below a wrong program's error."""
    _check_every_pass(load_model(str(smollm2_gguf), "bfloat16"), rtol=2e-2)


def test_merged_weights_replace_the_originals(smollm2) -> None:
    gm = capture(smollm2.model, 8192)
    run_passes(gm, DEFAULT_PASSES)
    names = {n for n, _ in gm.named_parameters()}
    assert (
        "model.layers.0.self_attn.qkv_proj_weight" in names
        and "model.layers.0.mlp.gate_up_proj_weight" in names
    )
    assert not any(n.endswith(("q_proj.weight", "gate_proj.weight", "up_proj.weight")) for n in names)
    n_params = sum(p.numel() for p in gm.parameters())
    assert n_params == sum(p.numel() for p in smollm2.model.parameters())


def test_compile_frees_the_weights_it_replaced() -> None:
    """The weights the passes replaced must be gone when compile_model returns, without the caller
    collecting garbage: the GPU runtime sizes the KV pool from the memory free at that point. (Automatic
    collection is off here, so only compile_model's own can free what reference cycles hold.)"""
    import gc
    import weakref

    from sgl_compile.driver import compile_model

    captured: list[weakref.ref] = []

    def observe(label: str, gm: fx.GraphModule) -> None:
        if not captured:
            captured.extend(weakref.ref(p) for p in gm.parameters())

    gc.disable()
    try:
        compiled = compile_model(model="dummy:smollm2-135m", observe=observe)
        kept = {id(p) for p in compiled.program.parameters()}
        alive = [r() for r in captured if r() is not None and id(r()) not in kept]
    finally:
        gc.enable()
    assert len(captured) > 100
    assert not alive, f"{len(alive)} replaced weights still alive ({sum(t.numel() for t in alive)} elements)"


def test_cli_print_ir_shows_each_pass(smollm2_gguf) -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "sgl_compile.cli", "compile", "--model", str(smollm2_gguf), "--print-ir"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    sections = r.stdout.split("==== ")
    labels = [s.split(" ====")[0] for s in sections[1:]]
    assert labels == ["captured"] + [f"after {name}" for name, _ in DEFAULT_PASSES]
    captured, final = sections[1], sections[-1]
    assert captured.count("= sglc.attention(") == 30 and "sglc.fused_add_rms_norm" not in captured
    assert final.count("= sglc.add_rms_norm_linear(") == 59 and final.count("= sglc.paged_attention(") == 30
    assert final.count("= sglc.rope_store_kv(") == 30 and "= sglc.rope(" not in final
    assert "= sglc.fused_add_rms_norm(" not in final and "= sglc.silu_and_mul(" not in final
    assert final.count("qkv_proj_weight, None, 'none')") == 30 and "fused_add_rms_norm=59" in r.stdout
