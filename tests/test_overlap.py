"""Overlapped scheduling: step N + 1 is launched before step N's tokens are read back.

The results must be exactly those of the sequential scheduler, including requests that finish while
a step that already includes them is in flight (EOS, stop strings), aborts and retractions between
launch and read-back, and seeded sampling.
"""

from __future__ import annotations

import pytest

from sgl_compile.driver import compile_model
from sgl_compile.runtime.request import Req
from sgl_compile.runtime.sampling_params import SamplingParams
from sgl_compile.runtime.scheduler import Scheduler, SchedulerConfig
from tests import prompts
from tests.scheduling import run_to_completion


@pytest.fixture(scope="module")
def compiled(smollm2_gguf):
    return compile_model(model=str(smollm2_gguf))


def _requests(tok) -> list[tuple[list[int], SamplingParams]]:
    chat = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in ("Hi!", "Name a colour.")]
    texts = chat + [prompts.CODE, "Once upon a time", prompts.LONG[:300], "1, 2, 3, 4,", prompts.MIXED[:40]]
    params = [
        SamplingParams(temperature=0, max_new_tokens=40),  # chat answers end with EOS early
        SamplingParams(temperature=0, max_new_tokens=40),
        SamplingParams(temperature=0, max_new_tokens=24, stop=("\n",)),
        SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_new_tokens=20),
        SamplingParams(temperature=0, max_new_tokens=1),
        SamplingParams(temperature=0.7, top_k=20, seed=3, max_new_tokens=16, return_logprob=True),
        SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=(28,)),
    ]
    return [(tok.encode(t), p) for t, p in zip(texts, params, strict=True)]


def _run(
    compiled, overlap: bool, max_total_tokens: int = 4000, chunk: int = 64, mixed: bool = False, **cfg
) -> tuple[list[Req], Scheduler]:
    sched = Scheduler(
        compiled,
        SchedulerConfig(
            max_total_tokens=max_total_tokens,
            context_length=8192,
            chunked_prefill_size=chunk,
            overlap=overlap,
            enable_mixed_chunk=mixed,
            **cfg,
        ),
    )
    tok = compiled.tokenizer
    reqs = [
        Req(f"r{i}", ids, p, tok, frozenset(tok.eos_token_ids)) for i, (ids, p) in enumerate(_requests(tok))
    ]
    run_to_completion(sched, reqs)
    return reqs, sched


def _summary(reqs: list[Req]) -> list[tuple]:
    return [(r.output_ids, r.finish, r.text) for r in reqs]


def _assert_same(got: list[Req], want: list[Req]) -> None:
    """Same tokens, finish and text; logprobs equal up to float noise: the batches may differ in size
    (a request that finished stays in the next, already launched step), so the GEMMs round differently."""
    assert _summary(got) == _summary(want)
    for a, b in zip(got, want, strict=True):
        assert [t for _, t in a.output_logprobs] == [t for _, t in b.output_logprobs]
        assert [lp for lp, _ in a.output_logprobs] == pytest.approx(
            [lp for lp, _ in b.output_logprobs], abs=1e-4
        )


def test_overlap_gives_the_sequential_results(compiled) -> None:
    sequential, _ = _run(compiled, overlap=False)
    overlapped, _ = _run(compiled, overlap=True)
    _assert_same(overlapped, sequential)
    kinds = {r.finish.kind for r in sequential}
    assert kinds == {"stop", "length"}, kinds  # both finish paths are exercised
    assert all(t >= 0 for r in overlapped for t in r.output_ids)


def test_overlap_with_retraction_and_eviction(compiled) -> None:
    """A pool too small for the batch: requests are retracted while their last draw is in flight (no KV
    reserved at admission for their output, so that they are)."""
    small = {"max_total_tokens": 76, "chunk": 32, "schedule_conservativeness": 0.0}
    sequential, _ = _run(compiled, overlap=False, **small)
    overlapped, sched = _run(compiled, overlap=True, **small)
    assert sched.num_retractions > 0
    _assert_same(overlapped, sequential)


@pytest.mark.parametrize("overlap", [False, True])
def test_mixed_chunks_give_the_same_results_in_fewer_steps(compiled, overlap: bool) -> None:
    """Decode riding along with the prefill chunks of later requests (a small chunk, so the prompts
    take several steps while the first requests decode)."""
    separate, s_sep = _run(compiled, overlap=overlap, chunk=16)
    mixed, s_mix = _run(compiled, overlap=overlap, chunk=16, mixed=True)
    _assert_same(mixed, separate)
    assert s_mix.forward_steps < s_sep.forward_steps, (s_mix.forward_steps, s_sep.forward_steps)


def test_abort_while_a_step_is_in_flight(compiled) -> None:
    sched = Scheduler(compiled, SchedulerConfig(max_total_tokens=2000, context_length=8192, overlap=True))
    tok = compiled.tokenizer
    params = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    a, b = (Req(name, tok.encode(text), params, tok) for name, text in (("a", prompts.CODE), ("b", "Hello")))
    sched.add(a)
    sched.add(b)
    for _ in range(4):
        sched.step()
    assert a.pending == 1 and sched.has_work()  # a draw of `a` is on its way back
    assert sched.abort("a") is a
    assert a.finish.kind == "abort" and a.pending == 0 and all(t >= 0 for t in a.output_ids)
    done = len(a.output_ids)
    while sched.has_work():
        sched.step()
    assert len(a.output_ids) == done  # the in-flight draw was dropped
    assert b.finish.kind == "length" and len(b.output_ids) == 30
    sched.cache.flush()
    sched.check_no_leaks()
