"""`sglc bench offline`: every request generates exactly its output length, and the warm-up's requests
leave nothing in the cache for the timed run to hit."""

from __future__ import annotations

import pytest

from sgl_compile.bench.datasets import shared_prefix_dataset
from sgl_compile.bench.offline import offline_throughput
from sgl_compile.runtime.engine import Engine


def test_offline_throughput_counts_and_starts_from_an_empty_cache() -> None:
    with Engine(model="dummy:smollm2-135m", max_total_tokens=4096) as engine:
        data = shared_prefix_dataset(engine.tokenizer, 2, 3, 48, 8, 5)
        summary = offline_throughput(engine, data)
        assert summary["num_requests"] == 6 and summary["total_output_tokens"] == 30
        assert summary["total_input_tokens"] == 6 * 56 and summary["output_throughput"] > 0
        assert summary["forward_steps"] >= 5 and summary["num_retractions"] == 0
        # The warm-up ran all six twice (the second pass hit each prompt but its last token), then flushed:
        # the timed run, its six admitted together into an empty cache, hit nothing (not 6 x 55 again).
        assert engine.scheduler.cached_prompt_tokens == 6 * 55


def test_floors_match_hand_arithmetic():
    """benchmarks/floors.py on bar 3 against the arithmetic done by hand: 512k tokens each reading ~1500
    keys of 128 KiB, and 2 x 7.5B GEMM parameters per generated token: on the H100 the floor is above
    what bar 3 asks."""
    from benchmarks.floors import BARS, DEVICES, floor

    bar3 = next(w for name, w in BARS.items() if name.startswith("bar 3"))
    f = floor(bar3, DEVICES["h100"])
    assert f["kv_TB"] == pytest.approx(512_000 * 1499.5 * 131072 / 1e12)
    assert f["decode_kv_s"] == pytest.approx(f["kv_TB"] * 1e12 / 3011e9)
    attention = 4 * 32 * 4096 * 1499.5  # QK^T and PV over the keys, 32 layers of 32 x 128 query dims
    assert f["decode_PFLOP"] == pytest.approx(512_000 * (2 * 7.5e9 + attention) / 1e15, rel=0.01)
    assert f["total_s"] == pytest.approx(f["prefill_s"] + f["decode_gemm_s"] + f["decode_kv_s"])
    # The H100 holds ~350 of these requests at their average length; the H200 all 512.
    assert 300 < f["running"] < 400
    assert floor(bar3, DEVICES["h200"])["running"] == 512
    assert 9_500 < f["output_tok_s"] < 10_000


def test_kernel_builds_are_recorded_inside_the_block_only():
    """record_builds wraps Triton's per-specialization build step for the block and puts it back; the
    wrapper passes calls through and times them under the kernel's name."""
    from types import SimpleNamespace

    from triton.runtime.jit import JITFunction

    from sgl_compile.codegen.builds import Builds, record_builds, timed

    original = JITFunction._do_compile
    with record_builds() as builds:
        assert JITFunction._do_compile is not original
    assert JITFunction._do_compile is original and builds.kernels == []

    def my_kernel():  # stands in for the @triton.jit function a JITFunction holds
        pass

    seen, recorded = [], Builds()
    build = timed(lambda fn, *args, **kwargs: seen.append((args, kwargs)) or "kernel", recorded)
    assert build(SimpleNamespace(fn=my_kernel), "key", warmup=False) == "kernel"
    assert seen == [(("key",), {"warmup": False})]
    assert [name for name, _ in recorded.kernels] == ["my_kernel"]
    summary = recorded.summary()
    assert summary["kernel_builds"] == 1 and list(summary["kernel_builds_by_name"]) == ["my_kernel"]
    # Triton passes (key, signature, device, constexprs, ...), constexprs keyed by argument-index paths.
    fn = SimpleNamespace(fn=my_kernel, arg_names=["X", "BLOCK", "PDL"])
    build(fn, "key", {"X": "*bf16"}, 0, {(1,): 64, (2,): True}, warmup=False)
    # ... and (options, attrs): the divisibility of pointers and integers, also in Triton's cache key.
    build(fn, "key", {"X": "*bf16"}, 0, {(1,): 64}, None, {(0,): [["tt.divisibility", 16]]}, warmup=False)
    assert recorded.specializations == ["", "BLOCK=64, PDL=True", "BLOCK=64; X%16"]


def test_start_up_logs_only_real_compiles():
    """Loads from Triton's disk cache take milliseconds; the start-up log names the compiles only."""
    from sgl_compile.codegen.builds import COMPILE_S, Builds

    b = Builds([("_loaded", COMPILE_S / 10), ("_compiled", 2.5)], ["A=1", "BLOCK=64"])
    assert b.compiled() == [("_compiled", 2.5, "BLOCK=64")]


def test_decode_chain_steps_at_each_wait_on_a_global_load() -> None:
    """benchmarks/decode_chain.py's SASS walk: a step ends where an instruction reads a register a pending
    global load writes (a .64 load writes two), or a DEPBAR waits for cp.async copies; stores and
    independent loads stay in their step."""
    import os

    interpret = os.environ.get("TRITON_INTERPRET")
    try:
        from benchmarks.decode_chain import chain
    finally:  # (the script compiles for the GPU: it drops the interpreter flag on import)
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    sass = """
        /*0010*/                   ACQBULK ;
        /*0020*/                   LDG.E.64 R4, desc[UR8][R2.64] ;
        /*0030*/                   LDG.E R8, desc[UR8][R2.64+0x10] ;
        /*0040*/                   IADD3 R10, R5, 0x1, RZ ;
        /*0050*/                   LDG.E.128 R12, desc[UR8][R10.64] ;
        /*0060*/              @!P0 LDG.E.U16 R20, desc[UR8][R6.64] ;
        /*0070*/                   STG.E desc[UR8][R6.64], R9 ;
        /*0080*/                   FADD R21, R15, R20 ;
        /*0090*/                   LDGSTS.E.BYPASS.128 [R7], desc[UR8][R22.64], P1 ;
        /*00a0*/                   LDGDEPBAR ;
        /*00b0*/                   DEPBAR.LE SB0, 0x0 ;
        /*00c0*/                   STG.E desc[UR8][R6.64], R21 ;
    """
    assert chain(sass) == [
        ["LDG.E.64", "LDG.E"],  # R5 (the .64's second register) is read next
        ["LDG.E.128", "LDG.E.U16", "STG.E"],  # (the store reads nothing pending; the FADD does)
        ["LDGSTS.E.BYPASS.128"],
        ["STG.E"],
    ]


def test_cohort_bound_respects_the_pool_and_finds_the_staggered_start() -> None:
    """benchmarks/cohort_bound.py: a cohort's KV grows by one token a request a step (3 prompt tokens and
    4 generated: 4 to 7 slots), so two cohorts of 3 requests started together end holding 42 slots, and
    in a pool of 32 the second starts only when the first has ended."""
    from benchmarks.cohort_bound import best, evaluate
    from benchmarks.floors import Shape

    shape = Shape.of("llama-3.2-1b")
    assert evaluate((3, 3), (0, 0), 3, 4, 32, shape) is None
    s = evaluate((3, 3), (0, 4), 3, 4, 32, shape)  # back to back: 8 steps
    assert s is not None and s.decode_steps == 8
    # Overlapping by a step: at step 3 the first cohort holds 3 x 7, the second 3 x 4: 33 > 32.
    assert evaluate((3, 3), (0, 3), 3, 4, 32, shape) is None
    # In a pool of 33 an overlap of a step fits and saves a step's weight reads.
    found = best(6, 3, 4, 33, shape, cohorts=2, grain=1)
    assert found.decode_steps == 7 and sum(found.sizes) == 6
