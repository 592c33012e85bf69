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
        "rope_attention": layers,  # ... then folded into the attention, which rotates q and k itself
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
    assert "= sglc.rope_store_kv(" not in final and "= sglc.rope(" not in final
    assert "= sglc.fused_add_rms_norm(" not in final and "= sglc.silu_and_mul(" not in final
    assert final.count("qkv_proj_weight, None, 'none')") == 30 and "fused_add_rms_norm=59" in r.stdout


def _prefill(gm: fx.GraphModule, m: LoadedModel, batch: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """Every position's logits for `batch` (several sequences), then the KV pool the program wrote."""
    c = m.config
    dtype = next(m.model.parameters()).dtype
    available = prefill_inputs(batch, (c.num_layers, c.num_kv_heads, c.head_dim), dtype, "cpu", True)
    with torch.no_grad():
        logits = gm(**{name: available[name] for name in input_names(gm)})
    return logits, available["k_cache"], available["v_cache"]


def _rotating_inputs(gm: fx.GraphModule) -> list[str]:
    """The ops feeding q and k of every op that rotates them (rope_store_kv, or the attention given
    positions), with the op and its number of arguments."""
    rotating = (torch.ops.sglc.rope_store_kv.default, torch.ops.sglc.paged_attention.default)
    return [
        f"{n.target.name()} {a.target} {b.target} {len(n.args)}"
        for n in gm.graph.nodes
        if n.target in rotating and isinstance(n.args[1], fx.Node)
        for a, b in [n.args[:2]]
    ]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qk_norm_fuses_into_rope_store_kv_without_moving_the_logits(dtype: str) -> None:
    """Qwen3's q/k norms go into rope_store_kv on every layer, and the program computes exactly what the
    unfused one does (the op's reference is the norms composed with it): logits and the KV pool."""
    m = load_model("dummy:qwen3-0.6b", dtype)
    without = [p for p in DEFAULT_PASSES if p[0] != "fuse_qk_norm_rope"]
    assert len(without) == len(DEFAULT_PASSES) - 1
    unfused, fused = capture(m.model, 4096), capture(m.model, 4096)
    run_passes(unfused, without)
    counts = _counts(run_passes(fused, DEFAULT_PASSES))
    assert counts["qk_norm_fused"] == m.config.num_layers
    view = str(torch.ops.aten.view.default)
    assert _rotating_inputs(fused) == [f"sglc::rope_store_kv {view} {view} 12"] * m.config.num_layers
    norm = str(torch.ops.sglc.rms_norm.default)
    # Unfused, the plain rope_store_kv went on into the attention (fuse_rope_attention).
    assert _rotating_inputs(unfused) == [f"sglc::paged_attention {norm} {norm} 15"] * m.config.num_layers
    assert not any(n.target is torch.ops.sglc.rms_norm.default for n in fused.graph.nodes)
    gen = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, 258, (n,), generator=gen).tolist() for n in (1, 7, 20)]
    for got, want in zip(_prefill(fused, m, batch), _prefill(unfused, m, batch), strict=True):
        assert torch.equal(got, want)


def test_qk_norm_fusion_leaves_llama_alone() -> None:
    """No q/k norm in Llama: the pass reports nothing and changes nothing."""
    from sgl_compile.passes.fuse_qk_norm_rope import fuse_qk_norm_rope

    m = load_model("dummy:smollm2-135m", "float32")
    gm = capture(m.model, 4096)
    run_passes(gm, [p for p in DEFAULT_PASSES if p[0] != "fuse_qk_norm_rope"])
    before = str(gm.graph)
    assert fuse_qk_norm_rope(gm) == {} and str(gm.graph) == before


def test_int4_calibration_runs_the_fused_qk_norm() -> None:
    """GPTQ calibration runs the program after the q/k norms were fused into rope_store_kv (quantization
    comes later in the pipeline): every projection after the first attention is calibrated on its
    output, so the quantized weights match the unfused program's only if the fused op normalises q and
    the keys it stores."""
    from sgl_compile.models import model_class
    from sgl_compile.models.config import ModelConfig
    from sgl_compile.passes import pipeline
    from sgl_compile.tokenizer import byte_tokenizer

    cfg = ModelConfig("qwen3", 260, 128, 256, 2, 4, 2, 32, 1e-6, 10000.0, 2048, False, qk_norm=True)
    torch.manual_seed(0)
    model = model_class(cfg)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.2)  # norm weights around 1, the rest around 0
    tokenizer = byte_tokenizer(cfg.vocab_size)
    passes = pipeline("int4", tokenizer)
    assert [p[0] for p in passes].index("fuse_qk_norm_rope") < [p[0] for p in passes].index("quantize_int4")
    programs = []
    for chosen, fused_layers in (
        (passes, cfg.num_layers),
        ([p for p in passes if p[0] != "fuse_qk_norm_rope"], 0),
    ):
        gm = capture(model, cfg.max_position_embeddings)
        counts = _counts(run_passes(gm, chosen))
        assert counts["linear_int4"] == 4 * cfg.num_layers and counts.get("qk_norm_fused", 0) == fused_layers
        programs.append(dict(gm.named_buffers()))
    fused, unfused = programs
    assert fused.keys() == unfused.keys() and any(k.endswith("qweight") for k in fused)
    assert all(torch.equal(fused[k], unfused[k]) for k in fused)
