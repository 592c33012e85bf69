"""Autotuning: time every candidate config of each kernel at a model's shapes, keep the fastest.

A `TuneCase` is one kernel at one shape: the inputs are made once, `run(config)`
launches it. The cases for a model are the calls its decode steps (one per batch
size) and a prefill chunk make; winners go to the tuning cache under the same key
the launcher looks up, so the runtime picks them up with no further step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm import tqdm

from sgl_compile.codegen import activation, attention, autotune, norm, norm_linear, quant_gemm, rope
from sgl_compile.ir import quant

if TYPE_CHECKING:  # codegen reads a model's dimensions; it imports nothing from models at run time
    from sgl_compile.models.config import ModelConfig

log = logging.getLogger(__name__)

Config = dict[str, int]


@dataclass
class TuneCase:
    kernel: str
    key: tuple
    run: Callable[[Config], object]
    candidates: list[Config]


def gpu_timer(fn: Callable[[], object]) -> float:
    """Median milliseconds of `fn` on the GPU (events, after warm-up)."""
    import triton.testing

    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def wall_timer(fn: Callable[[], object]) -> float:
    """Milliseconds of one call after one warm-up: for the CPU interpreter, where only the plumbing is tested."""
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def model_cases(
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    batch_sizes: list[int],
    context: int,
    prefill_tokens: int,
    quantization: str | None = None,
) -> Iterator[TuneCase]:
    """The kernel calls of decode at each batch size (each request at `context` tokens) and of one prefill."""
    gen = torch.Generator(device).manual_seed(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    h, hq, hkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    cos_sin = torch.randn(context, d, generator=gen, device=device)
    sizes = sorted({*batch_sizes, prefill_tokens})
    # Made once: the LM head alone is a GiB at 8B shapes, and each case's closure keeps its tensors.
    projections = (
        _norm_linear_weights(cfg, randn, quantization) if sizes[0] <= norm_linear.MAX_FUSED_ROWS else []
    )
    for t in sizes:
        x, res, w = randn(t, h), randn(t, h), randn(h)
        yield TuneCase("rms_norm", norm.rms_norm_key(x), lambda c, x=x, w=w: norm.rms_norm(x, w, 1e-6, c),
                       norm.CONFIG_SPACE["rms_norm"])  # fmt: skip
        yield TuneCase(
            "fused_add_rms_norm", norm.rms_norm_key(x),
            lambda c, x=x, r=res, w=w: norm.fused_add_rms_norm(x, r, w, 1e-6, c),
            norm.CONFIG_SPACE["fused_add_rms_norm"],
        )  # fmt: skip
        gate_up = randn(t, 2 * cfg.intermediate_size)
        yield TuneCase("silu_and_mul", activation.silu_and_mul_key(gate_up),
                       lambda c, g=gate_up: activation.silu_and_mul(g, c), activation.CONFIG_SPACE["silu_and_mul"])  # fmt: skip
        q, k, v = randn(t, hq, d), randn(t, hkv, d), randn(t, hkv, d)
        caches = torch.zeros(2, 1, t, hkv, d, dtype=dtype, device=device)
        positions = torch.arange(t, device=device) % context
        slots = torch.arange(t, device=device)
        yield TuneCase(
            "rope_store_kv", rope.rope_key(q, k),
            lambda c, q=q, k=k, v=v, p=positions, kc=caches[0], vc=caches[1], s=slots: rope.rope_store_kv(
                q, k, v, p, cos_sin, kc, vc, 0, s, config=c),
            rope.CONFIG_SPACE["rope_store_kv"],
        )  # fmt: skip
        if quantization:
            yield from _gemm_cases(cfg, randn, t, quantization)
        if t <= norm_linear.MAX_FUSED_ROWS:
            yield from _norm_linear_cases(projections, randn, x, res, w)
    yield from _attention_cases(cfg, randn, device, batch_sizes, context, prefill_tokens)


def _attention_cases(cfg, randn, device, batch_sizes, context, prefill_tokens) -> Iterator[TuneCase]:
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    for b in batch_sizes:
        kc = randn(1, b * context, hkv, d)
        vc = torch.randn_like(kc)
        q = randn(b, hq, d)
        indptr = torch.arange(b + 1, device=device) * context
        indices = torch.randperm(b * context, device=device)
        # Without a q/k norm the program's decode attention also rotates q and stores each request's
        # new key (pass fuse_rope_attention), so that is the variant timed; the new key's slot is the
        # last of the request's slots, as the runtime's.
        new_kv = None
        if not cfg.qk_norm:
            cos_sin = torch.randn(context, d, device=device)
            positions = torch.full((b,), context - 1, device=device)
            new_kv = (randn(b, hkv, d), randn(b, hkv, d), positions, cos_sin, indices[indptr[1:] - 1])
        yield TuneCase(
            "decode_attention", attention.decode_attention_key(b, hq, hkv, d, kc.dtype),
            lambda c, q=q, kc=kc, vc=vc, p=indptr, i=indices, n=new_kv: attention.decode_attention(
                q, kc, vc, 0, p, i, d**-0.5, c, new_kv=n),
            attention.CONFIG_SPACE["decode_attention"],
        )  # fmt: skip
        # cascade: the batch as one group sharing `context` keys, one key of its own each
        kc = randn(1, context + b, hkv, d)
        vc = torch.randn_like(kc)
        own = torch.arange(context, context + b, device=device)[:, None]
        indices = torch.cat([torch.arange(context, device=device).expand(b, context), own], 1).flatten()
        indptr = torch.arange(b + 1, device=device) * (context + 1)
        groups = torch.tensor([0] + [b] * b, device=device)
        shared = torch.full((b,), context, device=device)
        yield TuneCase(
            "shared_prefix_attention", attention.shared_prefix_key(b, hq, hkv, d, kc.dtype),
            lambda c, q=q, kc=kc, vc=vc, p=indptr, i=indices, g=groups, s=shared: attention.decode_attention(
                q, kc, vc, 0, p, i, d**-0.5, cascade_indptr=g, shared_len=s, shared_config=c),
            attention.CONFIG_SPACE["shared_prefix_attention"],
        )  # fmt: skip
    t = prefill_tokens
    kc = randn(1, t, hkv, d)
    vc, q = torch.randn_like(kc), randn(t, hq, d)
    qo = kv = torch.tensor([0, t], device=device)
    indices = torch.arange(t, device=device)
    yield TuneCase(
        "extend_attention", attention.extend_attention_key(t, 1, hq, hkv, d, kc.dtype),
        lambda c: attention.extend_attention(q, kc, vc, 0, qo, kv, indices, d**-0.5, c),
        attention.CONFIG_SPACE["extend_attention"],
    )  # fmt: skip


def _norm_linear_weights(cfg, randn, quantization) -> list[tuple[Tensor, str, str]]:
    """(weight, activation, input) of the GEMV's calls, input "residual" (fused add + norm), "norm" or
    "plain": into qkv and gate_up after a norm, o_proj and down on their own (unless quantized: those
    are quantized linears then), and the final norm into the LM head."""
    h, d = cfg.hidden_size, cfg.head_dim
    projections = [] if quantization else [
        ((cfg.num_heads + 2 * cfg.num_kv_heads) * d, h, "none", "residual"),
        (2 * cfg.intermediate_size, h, "silu_and_mul", "residual"),
        (h, cfg.num_heads * d, "none", "plain"),
        (h, cfg.intermediate_size, "none", "plain"),
    ]  # fmt: skip
    projections.append((cfg.vocab_size, h, "none", "norm"))
    return [(randn(n, k) * 0.02, act, inp) for n, k, act, inp in projections]


def _norm_linear_cases(projections, randn, x, res, norm_w) -> Iterator[TuneCase]:
    for w, act, inp in projections:
        if inp == "residual":
            run = lambda c, w=w, act=act: norm_linear.add_rms_norm_linear(
                x, res, norm_w, 1e-6, w, None, act, c
            )  # noqa: E731
            key = norm_linear.norm_linear_key(x, w, act, True)
        elif inp == "norm":
            run = lambda c, w=w, act=act: norm_linear.rms_norm_linear(x, norm_w, 1e-6, w, None, act, c)  # noqa: E731
            key = norm_linear.norm_linear_key(x, w, act, False)
        else:
            xk = randn(x.shape[0], w.shape[1])
            run = lambda c, w=w, xk=xk: norm_linear.linear(xk, w, None, c)  # noqa: E731
            key = norm_linear.norm_linear_key(xk, w, act, False, has_norm=False)
        yield TuneCase("norm_linear", key, run, norm_linear.CONFIG_SPACE["norm_linear"])


GEMM_KERNELS = {"int8": "linear_w8a16", "int4": "linear_w4a16", "fp8": "linear_fp8"}


def _gemm_cases(cfg: ModelConfig, randn: Callable[..., Tensor], t: int, method: str) -> Iterator[TuneCase]:
    """The model's projections, (N, K) of qkv, o, gate_up and down, quantized as the pass would."""
    h, d = cfg.hidden_size, cfg.head_dim
    shapes = [((cfg.num_heads + 2 * cfg.num_kv_heads) * d, h), (h, cfg.num_heads * d),
              (2 * cfg.intermediate_size, h), (h, cfg.intermediate_size)]  # fmt: skip
    kernel = GEMM_KERNELS[method]
    space = quant_gemm.CONFIG_SPACE[kernel]
    for n, k in shapes:
        x, w = randn(t, k), randn(n, k).float() * 0.02
        if method == "int8":
            qw, s = quant.quantize_int8(w)
            key = quant_gemm.linear_w8a16_key(x, qw)
            run = lambda c, x=x, qw=qw, s=s: quant_gemm.linear_w8a16(x, qw, s, None, c)  # noqa: E731
        elif method == "int4":
            qw, s = quant.quantize_int4(w)
            g = quant.INT4_GROUP_SIZE
            key = quant_gemm.linear_w4a16_key(x, qw, g)
            run = lambda c, x=x, qw=qw, s=s, g=g: quant_gemm.linear_w4a16(x, qw, s, g, None, c)  # noqa: E731
        else:
            qw, s = quant.quantize_fp8(w)
            key = quant_gemm.linear_fp8_key(x, qw, False)
            run = lambda c, x=x, qw=qw, s=s: quant_gemm.linear_fp8(x, qw, s, None, False, c)  # noqa: E731
        yield TuneCase(kernel, key, run, space)


def tune(
    cases: list[TuneCase], timer: Callable[[Callable[[], object]], float], max_candidates: int | None = None
) -> dict[str, dict]:
    """The fastest candidate per case, as tuning-cache entries; candidates that fail to launch are skipped."""
    entries: dict[str, dict] = {}
    bar = tqdm(cases, desc="tuning", unit="kernel")
    for case in bar:
        entry = autotune.entry_key(case.kernel, case.key)
        if entry in entries:  # e.g. the norm's key ignores the batch size
            continue
        bar.set_postfix_str(f"{case.kernel} {case.key}")
        timed = []
        for config in case.candidates[:max_candidates]:
            try:
                timed.append((timer(lambda c=config, run=case.run: run(c)), config))
            except Exception as e:  # noqa: BLE001 - a config the kernel cannot launch (shared memory, ...)
                log.debug("%s %s: %s skipped (%s)", case.kernel, case.key, config, e)
        if timed:
            ms, best = min(timed, key=lambda r: r[0])
            entries[entry] = best
            log.info("%s %s: %.4f ms with %s (%d candidates)", case.kernel, case.key, ms, best, len(timed))
    return entries
