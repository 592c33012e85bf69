"""Admission control: the scheduler admits a request only if the KV pool holds what it and the running
requests are expected to need, so that decode does not run out of slots and retract."""

from __future__ import annotations

import pytest

from sgl_compile.driver import compile_model
from sgl_compile.runtime.request import Req
from sgl_compile.runtime.sampling_params import SamplingParams
from sgl_compile.runtime.scheduler import (
    INIT_NEW_TOKEN_RATIO,
    MIN_NEW_TOKEN_RATIO,
    NEW_TOKEN_RATIO_DECAY,
    Scheduler,
    SchedulerConfig,
)
from tests.scheduling import drain, run_to_completion

PROMPTS = ["Once upon a time", "The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):",
           "The quick brown fox", "In the beginning", "Dear Sir or Madam,", "Ingredients: flour,"]  # fmt: skip


@pytest.fixture(scope="module")
def compiled(smollm2_gguf):
    return compile_model(model=str(smollm2_gguf))


def _scheduler(compiled, pool: int, **cfg) -> Scheduler:
    return Scheduler(
        compiled, SchedulerConfig(max_total_tokens=pool, context_length=8192, chunked_prefill_size=256, **cfg)
    )


def _add(sched: Scheduler, params: SamplingParams, n: int = len(PROMPTS)) -> list[Req]:
    tok = sched.grammars.tokenizer  # the model's
    eos = frozenset(tok.eos_token_ids)
    reqs = [Req(f"r{i}", tok.encode(p), params, tok, eos) for i, p in enumerate(PROMPTS[:n])]
    for r in reqs:
        sched.add(r)
    return reqs


def _abort_all(sched: Scheduler, reqs: list[Req]) -> None:
    for r in reqs:
        sched.abort(r.rid)
    drain(sched)


def test_admission_reserves_the_expected_output(compiled) -> None:
    """Requests that may stop early reserve new_token_ratio (0.7) of max_new_tokens each: a pool of 260
    admits three of prompt ~6 + 0.7 x 100, not all eight; without the reserve every prompt fits."""
    params = SamplingParams(temperature=0, max_new_tokens=100)
    sched = _scheduler(compiled, 260)
    reqs = _add(sched, params)
    sched.step()
    need = [len(r.prompt_ids) + int(INIT_NEW_TOKEN_RATIO * 100) for r in reqs]
    fits = max(k for k in range(1, 9) if sum(need[:k]) <= 260)
    assert fits == 3 and len(sched.running) == fits and len(sched.waiting) == 8 - fits
    _abort_all(sched, reqs)

    eager = _scheduler(compiled, 260, schedule_conservativeness=0.0)
    reqs = _add(eager, params)
    eager.step()
    assert len(eager.running) == 8
    _abort_all(eager, reqs)


def test_requests_that_run_to_their_limit_are_never_retracted(compiled) -> None:
    """ignore_eos without stops: the KV need is exact, so the pool (room for two of six at full length)
    never runs out; the outputs are those of a pool that holds all six. Without the reserve it retracts,
    and the new-token ratio goes back to 1."""
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    roomy = _scheduler(compiled, 2000)
    want = _add(roomy, params, 6)
    drain(roomy)

    pool = 2 * (max(len(r.prompt_ids) for r in want) + 10)
    tight = _scheduler(compiled, pool)
    got = _add(tight, params, 6)
    drain(tight)
    assert tight.num_retractions == 0
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    assert all(len(r.output_ids) == 10 and r.finish.kind == "length" for r in got)

    eager = _scheduler(compiled, pool, schedule_conservativeness=0.0)
    again = _add(eager, params, 6)
    drain(eager)
    assert eager.num_retractions > 0
    assert [r.output_ids for r in again] == [r.output_ids for r in want]
    assert eager.new_token_ratio > INIT_NEW_TOKEN_RATIO  # 1 after the last retraction, decaying since


def test_the_ratio_decays_per_decode_step(compiled) -> None:
    sched = _scheduler(compiled, 2000)
    _add(sched, SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))
    drain(sched)
    decode_steps = sched.forward_steps - 1  # one extend step admitted all eight
    assert decode_steps >= 5
    assert sched.new_token_ratio == pytest.approx(INIT_NEW_TOKEN_RATIO - decode_steps * NEW_TOKEN_RATIO_DECAY)
    assert sched.new_token_ratio > MIN_NEW_TOKEN_RATIO


def test_conservativeness_must_not_be_negative() -> None:
    from sgl_compile.errors import SglcError

    with pytest.raises(SglcError, match="schedule_conservativeness"):
        SchedulerConfig(max_total_tokens=100, context_length=100, schedule_conservativeness=-1)


@pytest.mark.parametrize("groups, members", [(4, 8), (12, 16)])  # one walk per request; one per run
def test_lpm_admits_the_group_whose_prefix_is_cached_first(compiled, groups: int, members: int) -> None:
    """Shuffled requests of `groups` shared system prompts: once one group's prompt is cached, lpm puts
    all of its members first and keeps queue order for the rest, below and above LPM_QUEUE_LIMIT
    (4 x 8 and 12 x 16 requests); fcfs keeps queue order."""
    import random

    from sgl_compile.runtime.scheduler import LPM_QUEUE_LIMIT

    assert 4 * 8 <= LPM_QUEUE_LIMIT < 12 * 16  # the two cases take the two paths
    rng = random.Random(0)
    tok = compiled.tokenizer
    systems = [[rng.randrange(100, 40000) for _ in range(300)] for _ in range(groups)]
    params = SamplingParams(temperature=0, max_new_tokens=4)
    reqs = [
        Req(f"g{g}m{m}", systems[g] + [rng.randrange(100, 40000) for _ in range(8)], params, tok, frozenset())
        for g in range(groups)
        for m in range(members)
    ]
    rng.shuffle(reqs)
    for policy in ("lpm", "fcfs"):
        sched = _scheduler(compiled, 100_000, schedule_policy=policy)
        for r in reqs:
            sched.add(r)
        hot = 2
        sched.cache.insert(systems[hot], sched.kv.alloc(len(systems[hot])))
        order = [r.rid for r in sched._waiting_in_policy_order()]
        queue = [r.rid for r in reqs]
        if policy == "fcfs":
            assert order == queue
        else:
            first = [rid for rid in queue if rid.startswith(f"g{hot}m")]
            assert order == first + [rid for rid in queue if rid not in first]
        sched.cache.flush()


@pytest.mark.parametrize("budget, disable_radix_cache", [(8192, False), (200, False), (8192, True)])
def test_a_system_prompt_nothing_caches_yet_is_computed_once(
    compiled, budget: int, disable_radix_cache
) -> None:
    """Three groups of four requests share uncached 300-token system prompts and arrive interleaved, with
    two identical short prompts: the first extend batch takes one member of each, the rest wait and
    find their prompt cached (the short one up to its last token), so each shared prompt is computed
    once, also when chunks of 200 tokens cut the system prompts. Without the cache every prompt is
    computed whole. Outputs equal those of each request run alone."""
    import random

    rng = random.Random(1)
    tok = compiled.tokenizer
    systems = [[rng.randrange(100, 40000) for _ in range(300)] for _ in range(3)]
    short = [rng.randrange(100, 40000) for _ in range(20)]
    params = SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True)
    reqs = [
        Req(f"m{m}g{g}", systems[g] + [rng.randrange(100, 40000) for _ in range(8)], params, tok)
        for m in range(4)
        for g in range(3)
    ] + [Req(f"short{i}", short, params, tok) for i in range(2)]
    cfg = SchedulerConfig(
        max_total_tokens=20_000, context_length=8192, chunked_prefill_size=budget,
        disable_radix_cache=disable_radix_cache,
    )  # fmt: skip
    sched = Scheduler(compiled, cfg)
    extends: list[list[tuple[str, int]]] = []
    run = sched.runner.run

    def record(batch):
        if any(s.length > 1 for s in batch):
            extends.append([(s.req.rid, s.length) for s in batch])
        return run(batch)

    sched.runner.run = record
    for r in reqs:
        sched.add(r)
    drain(sched)
    computed = sum(n for batch in extends for _, n in batch)
    if disable_radix_cache:
        assert computed == sum(len(r.prompt_ids) for r in reqs)
    else:
        assert computed == 3 * 300 + 12 * 8 + len(short) + 1  # each shared token once
    if budget == 8192 and not disable_radix_cache:
        assert [rid for rid, _ in extends[0]] == ["m0g0", "m0g1", "m0g2", "short0"]
        second = dict(extends[1])
        assert sorted(second) == sorted(r.rid for r in reqs[3:12] + reqs[13:])
        assert second.pop("short1") == 1 and set(second.values()) == {8}  # each one's own tokens
        assert len(extends) == 2
    alone = Scheduler(compiled, SchedulerConfig(max_total_tokens=20_000, context_length=8192))
    for r in reqs:
        twin = Req(r.rid, r.prompt_ids, params, tok)
        run_to_completion(alone, [twin])
        assert twin.output_ids == r.output_ids


def test_a_request_recomputing_a_cached_prompt_for_logprobs_holds_nobody_back(compiled) -> None:
    """A request that wants prompt logprobs recomputes its cached system prompt: another request on the
    same cached prompt is admitted with it, not made to wait for tokens the cache already holds."""
    import random

    rng = random.Random(3)
    tok = compiled.tokenizer
    system = [rng.randrange(100, 40000) for _ in range(300)]
    sched = Scheduler(
        compiled, SchedulerConfig(max_total_tokens=20_000, context_length=8192, chunked_prefill_size=8192)
    )
    sched.cache.insert(system, sched.kv.alloc(len(system)))
    wants = SamplingParams(temperature=0, max_new_tokens=2, return_logprob=True, logprob_start_len=0)
    plain = SamplingParams(temperature=0, max_new_tokens=2)
    reqs = [
        Req("logprobs", system + [rng.randrange(100, 40000) for _ in range(8)], wants, tok),
        Req("plain", system + [rng.randrange(100, 40000) for _ in range(8)], plain, tok),
    ]
    batches, run = [], sched.runner.run
    sched.runner.run = lambda batch: batches.append({s.req.rid: s.length for s in batch}) or run(batch)
    for r in reqs:
        sched.add(r)
    drain(sched)
    assert batches[0] == {"logprobs": 308, "plain": 8}


def test_bar_4s_workload_computes_each_prompt_token_once_and_groups_every_decode_step() -> None:
    """The whole shared-prefix workload (64 system prompts of 2048 tokens x 16 questions of 128, 256
    out) through the scheduler with a stand-in model: the extends compute exactly the unique prompt
    tokens, decode runs full batches of 256, and with cascade every decode step is grouped."""
    from benchmarks.schedule_replay import parser, replay

    result = replay(parser().parse_args(["--show-steps", "600"]))
    assert result["prompt_tokens_computed"] == 64 * 2048 + 1024 * 128
    assert result["decode_steps"] == 1020 and result["decode_batch_sizes"][256] >= 1000
    assert result["cascade_steps"] == result["decode_steps"]
    assert result["num_retractions"] == 0
    assert result["groupings"][600].startswith("256 requests: groups of 16 x13")


def test_bar_3s_workload_runs_in_lockstep_waves_and_its_schedule_has_a_floor() -> None:
    """Bar 3 (512 x 1000 in / 1000 out, ignore_eos) on the H100's KV pool of the 8B shape: admission
    reserves each request's whole output, so the requests run in waves of 216, 216 and 80 that start
    and end together; the cost model charges each step its bytes and FLOPs at the H100's ceilings."""
    from types import SimpleNamespace

    from benchmarks.floors import DEVICES
    from benchmarks.schedule_replay import StepCost, parser, replay

    args = ["--dataset", "fixed-1000", "--max-total-tokens", "432029", "--max-running-requests", "1024",
            "--cascade-attention", "off", "--show-steps", "", "--cost-model", "llama-3.1-8b"]  # fmt: skip
    result = replay(parser().parse_args(args))
    assert result["decode_batch_sizes"] == {216: 1998, 80: 999} and result["num_retractions"] == 0
    assert result["prompt_tokens_computed"] == 512 * 1000 - 6  # the 6 a cached prefix saved
    cost, h100 = StepCost.of("llama-3.1-8b"), DEVICES["h100"]
    assert 15e9 < cost.shape.weight_bytes < 17e9 and cost.shape.kv_bytes_per_token == 32 * 8 * 128 * 2 * 2
    # A decode step of two requests at 10 and 20 keys (their new tokens included): the weights (the
    # GEMMs' FLOPs take less) and 30 keys at the copy ceiling.
    step = [
        SimpleNamespace(start=9, length=1, logit_positions=[9]),
        SimpleNamespace(start=19, length=1, logit_positions=[19]),
    ]
    want = cost.shape.weight_bytes / h100.bandwidth + 30 * cost.shape.kv_bytes_per_token / h100.bandwidth
    assert abs(cost.seconds(step) - want) < 1e-12
    assert 55 < result["modeled_s"] < 62  # 512k tokens in ~59 s: ~8.7k tok/s is this schedule's floor


def test_cuda_graph_buckets():
    """Steps of 8 up to 256, of 64 above (where padding costs little and each graph holds its own logits)."""
    from sgl_compile.runtime.cuda_graphs import batch_size_buckets

    buckets = batch_size_buckets(1024)
    assert buckets[:6] == [1, 2, 4, 8, 16, 24] and buckets[-1] == 1024
    assert [b for b in buckets if b <= 256] == [1, 2, 4, 8, *range(16, 257, 8)]
    assert [b for b in buckets if b > 256] == list(range(320, 1025, 64))
    assert batch_size_buckets(300)[-2:] == [256, 300] and batch_size_buckets(3) == [1, 2, 3]


def test_memory_plan_counts_the_graphs_logits():
    """The decode graphs share one logits buffer, the largest bucket's rows: the KV budget leaves room
    for it (cascade's second set of graphs writes the same buffer)."""
    from types import SimpleNamespace

    import torch

    from sgl_compile.runtime.launch import EngineArgs, graph_logits_bytes

    gpu = SimpleNamespace(
        device=torch.device("cuda"), dtype=torch.bfloat16, config=SimpleNamespace(vocab_size=1000)
    )
    args = EngineArgs(max_running_requests=1024, cuda_graph_max_bs=1024)
    assert graph_logits_bytes(gpu, args) == 1024 * 1000 * 2
    assert graph_logits_bytes(gpu, EngineArgs(max_running_requests=1024, cuda_graph_max_bs=8)) == 8 * 2000
    assert graph_logits_bytes(gpu, EngineArgs(max_running_requests=6, cuda_graph_max_bs=8)) == 6 * 2000
    cascade = EngineArgs(max_running_requests=4, cuda_graph_max_bs=8, cascade_attention="on")
    assert graph_logits_bytes(gpu, cascade) == 4 * 2000
    assert graph_logits_bytes(gpu, EngineArgs(cuda_graph_max_bs=8, disable_cuda_graph=True)) == 0
    assert graph_logits_bytes(SimpleNamespace(**(vars(gpu) | {"device": torch.device("cpu")})), args) == 0


def test_running_request_limit_defaults_by_device():
    """Unset, the limit is 256 on the CPU; on a GPU 1024, fewer where a long context's table rows would
    outgrow its budget; a value given is kept."""
    import torch

    from sgl_compile.runtime.launch import TABLE_BUDGET, EngineArgs, default_max_running_requests

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_max_running_requests(EngineArgs(), cpu, 4096) == 256
    assert default_max_running_requests(EngineArgs(), cuda, 4096) == 1024
    assert default_max_running_requests(EngineArgs(), cuda, 16384) == 1024
    assert default_max_running_requests(EngineArgs(), cuda, 65536) == TABLE_BUDGET // (8 * 65537) == 511
    assert default_max_running_requests(EngineArgs(), cuda, 131072) == 256
    assert default_max_running_requests(EngineArgs(max_running_requests=7), cuda, 4096) == 7


def test_cascade_attention_auto_is_on_for_triton_decode_on_a_gpu():
    """auto turns cascade on only where it was measured and can run (Triton decode on a GPU); on / off
    are obeyed; anything else is refused before loading."""
    from types import SimpleNamespace

    import torch

    from sgl_compile.errors import SglcError
    from sgl_compile.runtime.launch import EngineArgs, cascade_enabled, check_args, jump_forward_enabled

    def program(device: str, backend: str) -> SimpleNamespace:
        return SimpleNamespace(
            device=torch.device(device), options=SimpleNamespace(decode_attention_backend=backend)
        )

    assert cascade_enabled(EngineArgs(), program("cuda", "triton"))
    assert not cascade_enabled(EngineArgs(), program("cuda", "flashinfer"))
    assert not cascade_enabled(EngineArgs(), program("cpu", "torch"))
    assert cascade_enabled(EngineArgs(cascade_attention="on"), program("cpu", "torch"))
    assert not cascade_enabled(EngineArgs(cascade_attention="off"), program("cuda", "triton"))
    with pytest.raises(SglcError, match="cascade attention"):
        check_args(EngineArgs(cascade_attention="sometimes"))
    with pytest.raises(SglcError, match="cascade attention"):  # Engine(...) does not run check_args
        cascade_enabled(EngineArgs(cascade_attention=True), program("cuda", "triton"))
    with pytest.raises(SglcError, match="jump forward"):  # its twin switch, checked the same way
        jump_forward_enabled(EngineArgs(jump_forward="ON"), torch.device("cuda"))
