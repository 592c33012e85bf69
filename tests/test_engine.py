"""The Engine end to end on SmolLM2: batching, chunking, the radix cache, retraction, abort."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest
import torch

from sgl_compile.models.loading import LoadedModel
from sgl_compile.runtime import launch as launch_module
from sgl_compile.runtime.engine import Engine
from tests import prompts
from tests.test_model_parity import hf_greedy

GREEDY = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}


def _mixed_prompts(tok) -> list[list[int]]:
    """32 prompts from 3 to ~300 tokens: code, chat, prose, non-English, emoji."""
    texts = [t for t in prompts.CORPUS if t.strip()] + [prompts.LONG[: 40 * i] for i in range(1, 12)]
    texts += [
        tok.apply_chat_template([{"role": "user", "content": q}])
        for q in ("Hi!", "What is 2+2?", "Tell me a joke.")
    ]
    texts += [
        prompts.NON_ENGLISH * 2,
        prompts.CODE * 3,
        "Once upon a time",
        "1, 2, 3, 4,",
        "import numpy as np\n",
    ]
    texts += [prompts.MIXED[:20], "The quick brown fox", "Q: Why is the sky blue?\nA:", prompts.LONG]
    assert len(texts) >= 32
    return [tok.encode(t) for t in texts[:32]]


@pytest.fixture(scope="module")
def engine(smollm2_gguf) -> Engine:
    e = Engine(model=str(smollm2_gguf), max_total_tokens=20000)
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def no_cache_engine(smollm2_gguf) -> Engine:
    e = Engine(model=str(smollm2_gguf), max_total_tokens=20000, disable_radix_cache=True)
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def mixed(smollm2: LoadedModel) -> list[list[int]]:
    return _mixed_prompts(smollm2.tokenizer)


@pytest.fixture(scope="module")
def reference(mixed, hf_smollm2) -> list[list[int]]:
    return [hf_greedy(hf_smollm2, ids, 32) for ids in mixed]


def _ids(outputs: list[dict]) -> list[list[int]]:
    return [o["output_ids"] for o in outputs]


def test_greedy_batched_equals_transformers(engine, mixed, reference) -> None:
    assert _ids(engine.generate(input_ids=mixed, sampling_params=GREEDY)) == reference
    engine.flush_cache()
    engine.check_no_leaks()


@pytest.mark.slow
def test_greedy_one_at_a_time_without_cache(no_cache_engine, mixed, reference) -> None:
    for ids, ref in zip(mixed, reference, strict=True):
        assert no_cache_engine.generate(input_ids=ids, sampling_params=GREEDY)["output_ids"] == ref
    assert _ids(no_cache_engine.generate(input_ids=mixed, sampling_params=GREEDY)) == reference
    no_cache_engine.check_no_leaks()
    assert no_cache_engine.scheduler.kv.available() == 20000


@pytest.mark.slow
def test_greedy_chunked_prefill(smollm2_gguf, mixed, reference) -> None:
    with Engine(model=str(smollm2_gguf), max_total_tokens=20000, chunked_prefill_size=16) as e:
        assert _ids(e.generate(input_ids=mixed, sampling_params=GREEDY)) == reference
        # everything again: now mostly served from the cache, still the same tokens
        again = e.generate(input_ids=mixed, sampling_params=GREEDY)
        assert _ids(again) == reference
        assert all(
            o["meta_info"]["cached_tokens"] >= len(ids) - 1 for o, ids in zip(again, mixed, strict=True)
        )
        e.flush_cache()
        e.check_no_leaks()


def test_repeated_prompt_is_cached(engine, mixed, reference) -> None:
    first = engine.generate(input_ids=mixed[3], sampling_params=GREEDY)
    second = engine.generate(input_ids=mixed[3], sampling_params=GREEDY)
    assert second["meta_info"]["cached_tokens"] >= len(mixed[3]) - 1
    assert first["output_ids"] == second["output_ids"] == reference[3]


def test_a_failing_call_raises_in_the_caller_and_the_engine_lives_on(engine, mixed, reference) -> None:
    """A check run on the scheduler thread (check_no_leaks, stats) that raises: the caller gets the
    exception instead of waiting forever, and the scheduler keeps serving."""

    def broken() -> None:
        raise AssertionError("KV slots leaked")

    raised: list[BaseException] = []

    def call() -> None:  # on a thread of its own, so that a call that never returns fails the test
        try:
            engine._call(broken)
        except Exception as e:  # (the assertion below names any other)
            raised.append(e)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(timeout=60)
    assert not caller.is_alive(), "the failing call never returned"
    assert len(raised) == 1 and isinstance(raised[0], AssertionError) and "leaked" in str(raised[0])
    assert engine.generate(input_ids=mixed[3], sampling_params=GREEDY)["output_ids"] == reference[3]


def test_shared_system_prompt_hits_after_the_first(engine, smollm2) -> None:
    tok = smollm2.tokenizer
    system = "You are a meticulous assistant. " + prompts.LONG[:600]
    convs = [
        tok.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}?"}]
        )
        for i in range(16)
    ]
    shared = len(tok.encode(tok.apply_chat_template([{"role": "system", "content": system}], False)))
    params = {"temperature": 0, "max_new_tokens": 4}
    first = engine.generate(convs[0], params)
    rest = engine.generate(convs[1:], params)
    assert first["meta_info"]["cached_tokens"] < shared
    assert all(o["meta_info"]["cached_tokens"] >= shared for o in rest)
    assert engine.get_stats()["cache_hit_rate"] > 0


def test_small_pool_retracts_and_evicts_but_stays_correct(smollm2_gguf, mixed, reference) -> None:
    """12 requests needing ~1,600 KV slots together share 400 (admitted without reserving KV for their
    output): they must be retracted and resumed."""
    picked = [i for i, ids in enumerate(mixed) if len(ids) <= 60][:12]
    small = {"max_total_tokens": 400, "chunked_prefill_size": 64, "schedule_conservativeness": 0.0}
    serving = launch_module._freezes  # (engines of this module's fixtures may be serving)
    with Engine(model=str(smollm2_gguf), **small) as e:
        # start-up's objects are out of the cycle collector's way while the engine serves
        assert gc.get_freeze_count() > 0 and launch_module._freezes == serving + 1
        out = e.generate(input_ids=[mixed[i] for i in picked], sampling_params=GREEDY)
        assert _ids(out) == [reference[i] for i in picked]
        assert e.get_stats()["num_retractions"] > 0
        assert e.flush_cache()
        e.check_no_leaks()
        assert e.scheduler.kv.available() == 400
    assert launch_module._freezes == serving  # and back once it is shut down (with the last one, all)
    assert serving > 0 or gc.get_freeze_count() == 0


def test_request_that_can_never_fit_gets_a_clear_error(smollm2_gguf) -> None:
    from sgl_compile.errors import SglcError

    with Engine(model=str(smollm2_gguf), max_total_tokens=64) as e:
        with pytest.raises(SglcError, match="KV slots"):
            e.generate("hello", {"max_new_tokens": 100})
        with pytest.raises(SglcError, match="context length"):
            e.generate(input_ids=[1] * 9000, sampling_params={"max_new_tokens": 1})
        assert (
            e.generate("hello", {"max_new_tokens": 4, "temperature": 0})["meta_info"]["completion_tokens"]
            == 4
        )


def test_abort_running_and_queued(smollm2_gguf, mixed, reference) -> None:
    async def scenario(e: Engine) -> tuple[list, list, list]:
        long_params = {"temperature": 0, "max_new_tokens": 400, "ignore_eos": True}
        running = e.async_generate(input_ids=mixed[0], sampling_params=long_params, rid="running")
        first = await running.__anext__()  # it is running now
        assert first["meta_info"]["completion_tokens"] >= 1
        queued = e.async_generate(input_ids=mixed[1], sampling_params=long_params, rid="queued")
        queued_task = asyncio.ensure_future(_collect(queued))
        normal = asyncio.ensure_future(
            asyncio.to_thread(e.generate, input_ids=[mixed[2], mixed[5]], sampling_params=GREEDY)
        )
        await asyncio.sleep(0.2)
        assert e.abort("queued") and e.abort("running")
        rest = [x async for x in running]
        return rest, await queued_task, await normal

    with Engine(model=str(smollm2_gguf), max_total_tokens=4000, max_running_requests=2) as e:
        assert e.scheduler.cfg.cuda_graph_max_bs == 2  # (unset: graphs for every batch the limit allows)
        rest, queued_items, normal = asyncio.run(scenario(e))
        assert rest[-1]["meta_info"]["finish_reason"]["type"] == "abort"
        assert rest[-1]["meta_info"]["completion_tokens"] < 400
        assert queued_items[-1]["meta_info"]["finish_reason"]["type"] == "abort"
        assert _ids(normal) == [reference[2], reference[5]]
        assert e.flush_cache()
        e.check_no_leaks()
        assert e.scheduler.kv.available() == 4000


async def _collect(stream) -> list:
    return [x async for x in stream]


def test_logprobs_equal_log_softmax_of_model_logits(engine, smollm2) -> None:
    ids = smollm2.tokenizer.encode(prompts.CODE)
    out = engine.generate(
        input_ids=ids,
        sampling_params={"temperature": 0, "max_new_tokens": 6},
        return_logprob=True,
        logprob_start_len=0,
        top_logprobs_num=3,
    )
    meta = out["meta_info"]
    full = ids + out["output_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(smollm2.model(torch.tensor(full), torch.arange(len(full))), dim=-1)
    assert meta["input_token_logprobs"][0] == (None, ids[0])
    for pos, (lp, tok) in enumerate(meta["input_token_logprobs"][1:], start=1):
        assert tok == ids[pos] and abs(lp - logprobs[pos - 1, tok].item()) < 1e-4
    for i, (lp, tok) in enumerate(meta["output_token_logprobs"]):
        pos = len(ids) + i - 1
        assert tok == out["output_ids"][i] and abs(lp - logprobs[pos, tok].item()) < 1e-4
        top_ids = [t for t, _ in meta["output_top_logprobs"][i]]
        assert top_ids == torch.topk(logprobs[pos], 3).indices.tolist()


def test_stop_string_across_token_boundary(engine, smollm2) -> None:
    tok = smollm2.tokenizer
    base = engine.generate(prompts.CODE, {"temperature": 0, "max_new_tokens": 24})
    pieces = [tok.decode(base["output_ids"][:i]) for i in range(len(base["output_ids"]) + 1)]
    # a stop string made of the end of token k and the start of token k+1
    k = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) - len(pieces[i - 1]) >= 2)
    stop = pieces[k][-1] + pieces[k + 1][len(pieces[k]) : len(pieces[k]) + 1]
    expected = base["text"][: base["text"].index(stop)]
    out = engine.generate(prompts.CODE, {"temperature": 0, "max_new_tokens": 24, "stop": stop})
    assert out["text"] == expected
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}

    async def streamed() -> list[str]:
        stream = engine.async_generate(prompts.CODE, {"temperature": 0, "max_new_tokens": 24, "stop": stop})
        return [c["text"] async for c in stream]

    chunks = asyncio.run(streamed())
    assert chunks[-1] == expected and all(stop not in c for c in chunks)
    assert all(b.startswith(a) for a, b in zip(chunks, chunks[1:], strict=False))


def test_seeded_sampling_reproduces(engine) -> None:
    params = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 16, "seed": 1234, "ignore_eos": True}
    a = engine.generate("Write a short poem about the sea.", params)
    b = engine.generate("Write a short poem about the sea.", params)
    c = engine.generate("Write a short poem about the sea.", {**params, "seed": 99})
    assert a["output_ids"] == b["output_ids"]
    assert a["output_ids"] != c["output_ids"]


def test_n_samples_share_the_prompt(engine) -> None:
    prompt = prompts.LONG[:400]
    outs = engine.generate(prompt, {"temperature": 0.8, "max_new_tokens": 8, "n": 4, "seed": 7})
    assert len(outs) == 4
    prompt_len = outs[0]["meta_info"]["prompt_tokens"]
    assert all(o["meta_info"]["cached_tokens"] >= prompt_len - 1 for o in outs)
    assert len({tuple(o["output_ids"]) for o in outs}) > 1


def test_cli_generate_json(smollm2_gguf, engine) -> None:
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "sgl_compile.cli", "generate", "--model", str(smollm2_gguf)]
    r = subprocess.run(
        [*cmd, "--prompt", prompts.CODE, "--max-new-tokens", "8", "--json"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (
        out["output_ids"]
        == engine.generate(prompts.CODE, {"temperature": 0, "max_new_tokens": 8})["output_ids"]
    )
    assert "KV pool" in r.stderr  # start-up says what it is doing


def test_abort_mid_chunked_prefill_frees_everything(smollm2_gguf) -> None:
    """Driven step by step on a scheduler of its own (no engine thread), so the abort lands mid-prefill."""
    from sgl_compile.driver import compile_model
    from sgl_compile.runtime.request import Req
    from sgl_compile.runtime.sampling_params import SamplingParams
    from sgl_compile.runtime.scheduler import Scheduler, SchedulerConfig

    compiled = compile_model(model=str(smollm2_gguf))
    sched = Scheduler(
        compiled, SchedulerConfig(max_total_tokens=2000, context_length=8192, chunked_prefill_size=32)
    )
    tok = compiled.tokenizer
    params = SamplingParams(temperature=0, max_new_tokens=4)
    long = Req("long", tok.encode(prompts.LONG), params, tok)
    short = Req("short", tok.encode("Hello there"), params, tok)
    sched.add(long)
    sched.step()  # the first 32-token chunk of the long prompt
    assert 0 < long.kv_len < len(long.prompt_ids)
    sched.add(short)
    assert sched.abort("long") is long and long.finish.kind == "abort"
    while sched.has_work():
        sched.step()
    assert short.finish.kind == "length" and len(short.output_ids) == 4
    sched.cache.flush()
    sched.check_no_leaks()
    assert sched.kv.available() == 2000
