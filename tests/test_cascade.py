"""Cascade attention in the runtime: decode requests sharing a cached prefix are grouped, so that the
prefix's KV is read once per group. On CPU the reference `sglc::paged_attention` checks every group's
claim (same leading KV slots) at every layer of every step; the kernels are tested in
test_attention_kernels.py. A step names its groups only where they save cascade_min_saved of its KV
reads; otherwise it runs plain decode."""

from __future__ import annotations

import pytest

from sgl_compile.driver import compile_model
from sgl_compile.errors import SglcError
from sgl_compile.runtime.request import Req
from sgl_compile.runtime.sampling_params import SamplingParams
from sgl_compile.runtime.scheduler import CASCADE_MIN_SHARED, Scheduler, SchedulerConfig
from tests import prompts
from tests.scheduling import run_to_completion

QUESTIONS = ["What is it about?", "Who wrote it?", "Summarize it.", "Is it long?", "Name one word in it.",
             "Translate the first line."]  # fmt: skip


@pytest.fixture(scope="module")
def compiled(smollm2_gguf):
    return compile_model(model=str(smollm2_gguf))


def _run(compiled, cascade: bool, overlap: bool = True) -> tuple[list[Req], Scheduler]:
    cfg = SchedulerConfig(
        max_total_tokens=4000, context_length=8192, chunked_prefill_size=512, overlap=overlap,
        enable_cascade_attention=cascade, cascade_min_saved=0.6,
    )  # fmt: skip
    sched = Scheduler(compiled, cfg)
    tok = compiled.tokenizer
    eos = frozenset(tok.eos_token_ids)
    system = prompts.LONG[:1200]
    texts = [system + "\n" + q for q in QUESTIONS] + ["Once upon a time"]  # one request shares nothing
    params = SamplingParams(temperature=0, max_new_tokens=12)
    reqs = [Req(f"r{i}", tok.encode(t), params, tok, eos) for i, t in enumerate(texts)]
    assert len(tok.encode(system)) > CASCADE_MIN_SHARED
    run_to_completion(sched, reqs)
    return reqs, sched


@pytest.mark.parametrize("overlap", [False, True])
def test_cascade_groups_shared_prefixes_and_keeps_the_outputs(compiled, overlap: bool) -> None:
    plain, _ = _run(compiled, cascade=False, overlap=overlap)
    cascaded, sched = _run(compiled, cascade=True, overlap=overlap)
    assert [r.output_ids for r in cascaded] == [r.output_ids for r in plain]
    # six requests decode over the shared system prompt: five of them read it through their group
    assert sched.cascade_shared_tokens >= 5 * CASCADE_MIN_SHARED
    assert sched.stats()["cascade_shared_tokens"] == sched.cascade_shared_tokens
    assert sched.stats()["cascade_steps"] == sched.cascade_steps >= 10


def _decode_steps(sched: Scheduler) -> list[bool]:
    """Records, per decode step the runner is given, whether it names cascade groups."""
    grouped, run = [], sched.runner.run

    def recording(batch):
        if all(s.length == 1 for s in batch):
            grouped.append(any(s.shared is not None for s in batch))
        return run(batch)

    sched.runner.run = recording
    return grouped


def test_steps_whose_groups_save_too_little_run_plain_decode(compiled) -> None:
    """Two requests over one system prompt save about half of the reads: with the threshold at 0.45
    the first steps are grouped; as each output grows its own part, the share falls under it and the
    rest decode plain, with the outputs of a run without cascade. At the default threshold no step is
    grouped."""
    tok = compiled.tokenizer
    system = prompts.LONG[:1200]
    texts = [system + "\n" + q for q in QUESTIONS[:2]]
    params = SamplingParams(temperature=0, max_new_tokens=48, ignore_eos=True)
    outputs, steps = [], []
    for cascade, min_saved in ((False, 0.0), (True, 0.45), (True, 0.75)):
        cfg = SchedulerConfig(
            max_total_tokens=4000, context_length=8192, enable_cascade_attention=cascade,
            cascade_min_saved=min_saved,
        )  # fmt: skip
        sched = Scheduler(compiled, cfg)
        grouped = _decode_steps(sched)
        reqs = [Req(f"r{i}", tok.encode(t), params, tok) for i, t in enumerate(texts)]
        run_to_completion(sched, reqs)
        outputs.append([r.output_ids for r in reqs])
        steps.append((grouped, sched.cascade_steps))
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]
    assert not any(steps[0][0]) and steps[0][1] == 0
    grouped, n = steps[1]
    k = grouped.index(False)  # grouped first, then plain to the end
    assert 0 < k == n and not any(grouped[k:]) and len(grouped) - k >= 5
    assert not any(steps[2][0]) and steps[2][1] == 0


def test_cascade_min_saved_is_a_share() -> None:
    with pytest.raises(SglcError, match="cascade_min_saved"):
        SchedulerConfig(max_total_tokens=100, context_length=64, cascade_min_saved=1.5)


def test_groups_are_contiguous_and_name_shared_slots(compiled) -> None:
    """The metadata decode batches carry: consecutive groups, each member's leading slots those of its
    group's first member, the unshared request alone."""
    cfg = SchedulerConfig(
        max_total_tokens=4000, context_length=8192, enable_cascade_attention=True, cascade_min_saved=0
    )  # (groups of any size pay here: it is their metadata under test)
    sched = Scheduler(compiled, cfg)
    tok = compiled.tokenizer
    system = prompts.LONG[:1200]
    texts = ["Once upon a time"] + [system + "\n" + q for q in QUESTIONS[:3]]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    reqs = [Req(f"r{i}", tok.encode(t), params, tok) for i, t in enumerate(texts)]
    seen = []
    groups = sched.runner._groups  # called for the grouped decode batches only

    def recording(batch):
        indptr, shared = groups(batch)
        if len(batch) == 4:
            slots = [sched.table.slots(s.req.row, s.req.kv_len) for s in batch]
            seen.append(([s.req.rid for s in batch], indptr.tolist(), shared.tolist(), slots))
        return indptr, shared

    sched.runner._groups = recording
    run_to_completion(sched, reqs)
    assert len(seen) >= 6
    for rids, indptr, shared, slots in seen:
        assert len(indptr) == 5 and indptr[-1] == 4
        groups = [(a, b) for a, b in zip(indptr, indptr[1:], strict=False) if b > a]
        assert sorted(b - a for a, b in groups) == [1, 3]
        a, b = next(g for g in groups if g[1] - g[0] == 3)
        assert set(rids[a:b]) == {"r1", "r2", "r3"}
        n = shared[a]
        assert n >= CASCADE_MIN_SHARED and shared[a:b] == [n] * 3 and sum(shared) == 3 * n
        assert slots[a][:n] == slots[a + 1][:n] == slots[a + 2][:n]


def test_mixed_batches_form_no_groups(compiled) -> None:
    """With mixed chunks, a decode that joins an extend runs eagerly without groups: only decode-only
    steps are grouped and counted."""
    tok = compiled.tokenizer
    system = prompts.LONG[:1200]
    cfg = SchedulerConfig(
        max_total_tokens=4000, context_length=8192, chunked_prefill_size=64, enable_mixed_chunk=True,
        enable_cascade_attention=True, cascade_min_saved=0,
    )  # fmt: skip
    sched = Scheduler(compiled, cfg)
    grouped = _decode_steps(sched)
    mixed, run = [], sched.runner.run

    def recording(batch):
        if any(s.length > 1 for s in batch) and any(s.length == 1 for s in batch):
            mixed.append(any(s.shared is not None for s in batch))
        return run(batch)

    sched.runner.run = recording
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    texts = [system + "\n" + q for q in QUESTIONS[:3]] + ["Once upon a time " + system[:300]]
    reqs = [Req(f"r{i}", tok.encode(t), params, tok) for i, t in enumerate(texts)]
    for r in reqs[:3]:
        sched.add(r)
    for _ in range(12):  # the three decode over their shared prompt while the fourth is chunked in
        sched.step()
    run_to_completion(sched, reqs[3:])
    assert mixed and not any(mixed)
    assert sched.cascade_steps == sum(grouped) > 0
