"""Weight quantization: the quantized model still models language, and its weights shrink as expected."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from sgl_compile.driver import compile_model
from sgl_compile.ir import quant
from sgl_compile.ir.capture import input_names
from sgl_compile.ir.quant import pack_int4
from sgl_compile.passes.calibration import CALIBRATION_TEXTS
from sgl_compile.passes.lower_attention import prefill_inputs
from sgl_compile.passes.quantize import gptq_int4
from tests.prompts import PROSE


def _perplexity(compiled, ids: list[int]) -> float:
    """exp(mean NLL of each next token) over the text, one sequence through the compiled program."""
    c = compiled.config
    inputs = prefill_inputs([ids], (c.num_layers, c.num_kv_heads, c.head_dim), torch.float32, "cpu", True)
    with torch.no_grad():
        logits = compiled.program(**{n: inputs[n] for n in input_names(compiled.program)}).float()
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    return math.exp(nll.item())


@pytest.fixture(scope="module")
def perplexities(smollm2_gguf) -> dict:
    out = {}
    for method in (None, "int8", "int4", "fp8"):
        compiled = compile_model(model=str(smollm2_gguf), quantization=method)
        ids = compiled.tokenizer.encode(PROSE)
        counts = {k: v for r in compiled.reports for k, v in r.counts.items()}
        out[method] = (_perplexity(compiled, ids), counts, len(ids))
    return out


def test_text_is_a_few_hundred_tokens(perplexities) -> None:
    assert 250 <= perplexities[None][2] <= 400


@pytest.mark.parametrize(("method", "bound"), [("int8", 1.05), ("int4", 1.25), ("fp8", 1.10)])
def test_quantized_perplexity_stays_close(perplexities, method: str, bound: float) -> None:
    base = perplexities[None][0]  # a 135M model on plain prose: ~34
    assert base < 60, f"unquantized perplexity {base:.1f}: the text or the model is off"
    ppl = perplexities[method][0]
    assert ppl <= bound * base, f"{method}: perplexity {ppl:.2f} vs {base:.2f} unquantized"


@pytest.mark.parametrize(
    ("method", "low", "high"),
    [("int8", 0.25, 0.25 + 1 / 576), ("int4", 0.125, 0.145), ("fp8", 0.25, 0.25 + 1 / 576)],
)
def test_every_projection_is_quantized_and_shrinks(
    perplexities, method: str, low: float, high: float
) -> None:
    """Relative to fp32 weights: 1 byte (int8, e4m3) or half a byte (int4) per weight, plus scales: one fp32
    per output channel (int8, fp8: 4 bytes per row of K >= 576, so at most +1/576) or per group of 128
    (int4: +1/128), and for int4 the rows of K = 576 padded to 640 (+11% on q/k/v, gate/up; down_proj's
    K = 1536 needs none)."""
    counts = perplexities[method][1]
    assert counts[f"linear_{method}"] == 4 * 30  # qkv, o, gate_up, down in each of the 30 layers
    got = counts["weight_bytes_after"] / counts["weight_bytes_before"]
    assert low <= got <= high, got


def test_int4_is_calibrated_on_the_builtin_text(perplexities) -> None:
    assert 1000 <= perplexities["int4"][1]["calibration_tokens"] <= 4000
    assert "calibration_tokens" not in perplexities["int8"][1]  # int8 and fp8 round to nearest


def test_calibration_text_is_not_the_test_text() -> None:
    sentences = [s.strip() for s in PROSE.split(".") if len(s.strip()) > 20]
    assert not any(s in text for s in sentences for text in CALIBRATION_TEXTS)


def _output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return ((x @ (w_hat - w).T).square().mean() / (x @ w.T).square().mean()).item()


def test_gptq_int4_is_in_the_int4_format_and_beats_rounding() -> None:
    """K = 200 pads the last group; correlated inputs give GPTQ error to compensate."""
    g = torch.Generator().manual_seed(0)
    n, k = 64, 200
    x = torch.randn(512, k, generator=g) @ torch.randn(k, k, generator=g) * 0.2 + torch.randn(
        512, k, generator=g
    )
    w = torch.randn(n, k, generator=g) * 0.05
    q, scales = gptq_int4(w, 2 * x.T @ x / x.shape[0])
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
    assert scales.shape == (n, 2) and bool((scales > 0).all())
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (n, 128)
    assert bool((quant.unpack_int4(packed)[:, k:] == 0).all())  # padding columns hold zeros
    w_gptq = quant.dequantize_int4(packed, scales, quant.INT4_GROUP_SIZE, k)
    assert torch.equal(w_gptq, (q.float().view(n, -1) * scales.repeat_interleave(128, dim=1)[:, :k]))
    rq, rs = quant.quantize_int4(w)
    w_rtn = quant.dequantize_int4(rq, rs, quant.INT4_GROUP_SIZE, k)
    assert _output_error(x, w, w_gptq) < 0.7 * _output_error(x, w, w_rtn)


def test_pack_int4_follows_the_documented_layout() -> None:
    """Element k of a row is the low nibble of byte k // 2 when k is even, the high one when odd, as q + 8;
    the columns padding K up to the group size hold q = 0."""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (16, 300), generator=g, dtype=torch.int8)
    packed = pack_int4(q, 128)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 192)
    k = torch.arange(384)
    nibbles = (packed[:, k // 2].int() >> (4 * (k % 2))) & 0xF
    assert torch.equal(nibbles[:, :300] - 8, q.int()) and bool((nibbles[:, 300:] == 8).all())
    w = torch.randn(16, 300, generator=g)
    qweight, scales = quant.quantize_int4(w)
    steps = w / scales.repeat_interleave(quant.INT4_GROUP_SIZE, dim=1)[:, :300]
    assert torch.equal(pack_int4(torch.round(steps).clamp(-8, 7).to(torch.int8)), qweight)


def test_unknown_quantization_and_backend_are_refused() -> None:
    cases = (("compile", "--quantization", "int3", "int8, int4, fp8"),
             ("serve", "--quantization", "int3", "int8, int4, fp8"),
             ("compile", "--attention-backend", "cudnn", "torch, triton"))  # fmt: skip
    for command, flag, value, valid in cases:
        r = subprocess.run(
            [sys.executable, "-m", "sgl_compile.cli", command, flag, value],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert f"unknown {flag[2:].replace('-', ' ')} {value!r}; valid: {valid}" in r.stderr, r.stderr
