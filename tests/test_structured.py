"""Structured outputs end to end on SmolLM2: JSON schemas, regexes and EBNF grammars constrain what the
engine generates, with jump-forward, overlapped scheduling, streaming, n > 1 and the radix cache.

Every output is checked independently of the grammar code: `json.loads` + `jsonschema.validate`,
`re.fullmatch`, or a small recursive-descent parser.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import replace

import jsonschema
import pytest
import torch

from sgl_compile.errors import SglcError
from sgl_compile.models.loading import LoadedModel
from sgl_compile.runtime.engine import Engine
from sgl_compile.runtime.request import Req
from sgl_compile.runtime.sampling_params import SamplingParams
from sgl_compile.runtime.scheduler import Scheduler, SchedulerConfig
from tests.scheduling import run_to_completion
from tests.test_grammar import ARITHMETIC, REGEXES, SCHEMAS, _parse_arithmetic
from tests.test_model_parity import ours_logits

MAX_NEW = 200  # enough for every schema here to close (outputs end with reason stop)


@pytest.fixture(scope="module")
def engine(smollm2_gguf) -> Engine:
    e = Engine(model=str(smollm2_gguf), max_total_tokens=20000)
    yield e
    e.shutdown()


def _chat(engine: Engine, what: str) -> str:
    return engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Write a short JSON example of {what}."}]
    )


def _schema_prompts(engine: Engine) -> list[tuple[str, str]]:
    """(schema name, prompt) for every schema of the grammar tests."""
    return [(name, _chat(engine, f"a {name.replace('_', ' ')} record")) for name in SCHEMAS]


def _check_json(out: dict, schema: dict, tokenizer) -> None:
    assert out["meta_info"]["finish_reason"]["type"] == "stop", out
    jsonschema.validate(json.loads(out["text"]), schema)
    assert out["text"] == tokenizer.decode(out["output_ids"])  # the text follows rewritten tails too


def _steps(engine: Engine) -> int:
    return engine.get_stats()["forward_steps"]


# -- JSON schemas ---------------------------------------------------------------------------------------
def test_json_schemas_greedy_and_sampled(engine: Engine) -> None:
    """Every schema, greedy and seeded at temperature 0.8, batched in one call."""
    cases = [
        (name, prompt, {"temperature": t, "seed": 1, "max_new_tokens": MAX_NEW, "json_schema": SCHEMAS[name]})
        for name, prompt in _schema_prompts(engine)
        for t in (0.0, 0.8)
    ]
    jumped = engine.get_stats()["jump_forward_tokens"]
    outs = engine.generate([p for _, p, _ in cases], [s for _, _, s in cases])
    for (name, _, _), out in zip(cases, outs, strict=True):
        _check_json(out, SCHEMAS[name], engine.tokenizer)
    assert engine.get_stats()["jump_forward_tokens"] > jumped
    engine.check_no_leaks()


def test_streamed_json(engine: Engine) -> None:
    """Streaming (async_generate), every schema at once: each snapshot's text extends the last; the final
    one is valid."""
    names = list(SCHEMAS)

    async def stream(name: str) -> list[dict]:
        params = {"temperature": 0.8, "seed": 5, "max_new_tokens": MAX_NEW, "json_schema": SCHEMAS[name]}
        return [o async for o in engine.async_generate(_chat(engine, f"a {name} record"), params)]

    async def all_streams() -> list[list[dict]]:
        return await asyncio.gather(*(stream(n) for n in names))

    for name, items in zip(names, asyncio.run(all_streams()), strict=True):
        texts = [o["text"] for o in items]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False)), texts
        _check_json(items[-1], SCHEMAS[name], engine.tokenizer)


def test_n_samples_each_follow_the_schema(engine: Engine) -> None:
    schema = SCHEMAS["person"]
    params = {"n": 3, "temperature": 0.8, "seed": 11, "max_new_tokens": MAX_NEW, "json_schema": schema}
    outs = engine.generate(_chat(engine, "a person"), params)
    assert len(outs) == 3
    for out in outs:
        _check_json(out, schema, engine.tokenizer)
    assert len({o["text"] for o in outs}) > 1  # each sample has its own seed and its own grammar state
    engine.check_no_leaks()


def test_radix_cache_serves_a_repeated_constrained_request(engine: Engine) -> None:
    schema = SCHEMAS["enums"]
    params = {"temperature": 0, "max_new_tokens": MAX_NEW, "json_schema": schema}
    prompt = _chat(engine, "a t-shirt size")
    first = engine.generate(prompt, params)
    second = engine.generate(prompt, params)
    assert second["meta_info"]["cached_tokens"] > 0
    assert second["output_ids"] == first["output_ids"]
    _check_json(second, schema, engine.tokenizer)
    engine.check_no_leaks()


# -- regex and EBNF -------------------------------------------------------------------------------------
def test_regex_outputs_match(engine: Engine) -> None:
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Give me an example."}])
    cases = [(p, t) for p in REGEXES for t in (0.0, 0.8)]
    params = [{"regex": p, "temperature": t, "seed": 2, "max_new_tokens": 40} for p, t in cases]
    outs = engine.generate([prompt] * len(cases), params)
    for (pattern, _), out in zip(cases, outs, strict=True):
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        assert re.fullmatch(pattern, out["text"]), (pattern, out["text"])


def test_ebnf_outputs_parse(engine: Engine) -> None:
    """As the assistant's whole reply, so the model ends the expression with its end-of-turn token."""
    prompt = engine.tokenizer.apply_chat_template(
        [
            {
                "role": "user",
                "content": "Write one short arithmetic expression, like (2+3)*4. Only the expression.",
            }
        ]
    )
    params = [
        {"ebnf": ARITHMETIC, "temperature": t, "seed": s, "max_new_tokens": 30}
        for t, s in ((0, 0), (0.8, 1), (0.8, 2))
    ]
    outs = engine.generate([prompt] * len(params), params)
    for out in outs:
        if out["meta_info"]["finish_reason"]["type"] == "stop":
            _parse_arithmetic(out["text"])
        else:  # a long expression, cut off: still a prefix the grammar allows
            assert re.fullmatch(r"[0-9+\-*/()]+", out["text"]), out["text"]
    assert any(o["meta_info"]["finish_reason"]["type"] == "stop" for o in outs), [o["text"] for o in outs]


# -- errors and cleanup ---------------------------------------------------------------------------------
def test_invalid_schema_raises(engine: Engine) -> None:
    with pytest.raises(SglcError, match="invalid json_schema"):
        engine.generate("Hi", {"json_schema": '{"type": "nonsense"}', "max_new_tokens": 4})
    with pytest.raises(SglcError, match="invalid regex"):
        engine.generate("Hi", {"regex": "(unclosed", "max_new_tokens": 4})
    engine.check_no_leaks()


def test_abort_releases_the_constraint(engine: Engine) -> None:
    async def first_then_close() -> None:
        params = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True, "regex": "[a-z ]{150}"}
        async for _ in engine.async_generate("Write a story:", params):
            break  # closing the stream aborts the request

    asyncio.run(first_then_close())
    assert engine.get_stats()["num_grammar_reqs"] == 0
    engine.check_no_leaks()


# -- the scheduler: jump-forward, overlap, retraction, a refused token ----------------------------------
def _run_scheduler(
    engine: Engine, params: list[SamplingParams], prompts: list[str], **cfg
) -> tuple[list[Req], Scheduler]:
    sched = Scheduler(
        engine.compiled, SchedulerConfig(**{"max_total_tokens": 4000, "context_length": 8192, **cfg})
    )
    tok = engine.tokenizer
    reqs = [
        Req(f"r{i}", tok.encode(p), sp, tok, engine.eos_ids)
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
    ]
    run_to_completion(sched, reqs)
    return reqs, sched


def _greedy_cases(engine: Engine, names: list[str]) -> tuple[list[SamplingParams], list[str]]:
    prompts = dict(_schema_prompts(engine))
    params = [
        SamplingParams(temperature=0, max_new_tokens=MAX_NEW, json_schema=json.dumps(SCHEMAS[n]))
        for n in names
    ]
    return params, [prompts[n] for n in names]


JUMP_NAMES = ["person", "nested", "enums", "numbers", "bool_null", "patterns", "unicode"]


def _assert_masked_greedy(model: LoadedModel, sched: Scheduler, req: Req, forced: set[int]) -> None:
    """Every output token that was sampled (not written by jump-forward) is the argmax of the reference
    model's logits over the tokens the grammar allowed at that point, computed from scratch on the final
    sequence: the engine's KV after its rollbacks and re-encoded tails gave the same logits."""
    from sgl_compile.runtime.grammar import Constraint, allocate_mask, apply_mask

    grammar = sched.grammars.backend.compile(*req.params.constraint)
    constraint = Constraint(grammar, sorted(req.eos_ids))
    logits = ours_logits(model, req.all_ids)
    mask = allocate_mask(1, logits.shape[-1])
    start = len(req.prompt_ids) - 1  # row p predicts token p + 1
    for i, token in enumerate(req.output_ids):
        if i not in forced:
            row = logits[start + i].clone()[None]
            constraint.fill_mask(mask, 0)
            apply_mask(row, mask)
            assert row[0, token] >= row.max() - 1e-3, (req.rid, i, token, int(row.argmax()))
        assert constraint.accept(token), (req.rid, i, token)
    constraint.release()


JUMP_NAMES = ["person", "nested", "enums", "numbers", "bool_null", "patterns", "unicode"]


def test_jump_forward_saves_steps_and_keeps_greedy_choices(
    engine: Engine, smollm2: LoadedModel, monkeypatch
) -> None:
    forced: dict[str, set[int]] = {}  # rid -> output positions written by jump-forward
    rewrite = Req.replace_output_tail

    def recording(req: Req, start: int, ids: list[int], context_len: int) -> None:
        forced.setdefault(req.rid, set()).update(range(start, start + len(ids)))
        rewrite(req, start, ids, context_len)

    monkeypatch.setattr(Req, "replace_output_tail", recording)
    params, prompts = _greedy_cases(engine, JUMP_NAMES)
    on, s_on = _run_scheduler(engine, params, prompts)
    assert forced, "no request jumped"
    off, s_off = _run_scheduler(engine, params, prompts, jump_forward=False)
    assert s_on.jump_forward_tokens > 0 and s_off.jump_forward_tokens == 0
    assert s_on.forward_steps < s_off.forward_steps
    for name, a, b in zip(JUMP_NAMES, on, off, strict=True):
        assert a.finish.kind == b.finish.kind == "stop"
        jsonschema.validate(json.loads(a.text), SCHEMAS[name])
        jsonschema.validate(json.loads(b.text), SCHEMAS[name])
        assert a.text == engine.tokenizer.decode(a.output_ids[:-1])  # the stop token is not text
        _assert_masked_greedy(smollm2, s_on, a, forced.get(a.rid, set()))
        _assert_masked_greedy(smollm2, s_off, b, set())
    # The texts themselves may differ: a jump writes the forced text as the tokenizer splits it ('{"'),
    # where the model, sampling under the mask, may have spelled it otherwise ('{' then '"'); from there
    # the two sequences, and so the model's later choices, differ.


@pytest.mark.parametrize("jump", [True, False])
def test_overlap_gives_the_sequential_constrained_outputs(engine: Engine, jump: bool) -> None:
    names = ["person", "points", "any_of", "optional"]
    params, prompts = _greedy_cases(engine, names)
    params += [
        SamplingParams(temperature=0.8, seed=3, max_new_tokens=MAX_NEW, json_schema=json.dumps(SCHEMAS[n]))
        for n in names
    ]
    prompts += prompts
    params.append(SamplingParams(temperature=0, max_new_tokens=20))  # an unconstrained neighbour
    prompts.append("Once upon a time")
    seq, _ = _run_scheduler(engine, params, prompts, overlap=False, jump_forward=jump)
    ovl, _ = _run_scheduler(engine, params, prompts, overlap=True, jump_forward=jump)
    assert [(r.output_ids, r.finish, r.text) for r in ovl] == [(r.output_ids, r.finish, r.text) for r in seq]
    for name, r in zip(names + names, ovl, strict=False):
        jsonschema.validate(json.loads(r.text), SCHEMAS[name])


def test_constrained_requests_survive_retraction(engine: Engine) -> None:
    """A pool too small for the batch (and no KV reserved for output at admission): constrained requests
    are retracted (their jumped tokens and rolled back KV included) and resume with their grammar state."""
    names = ["person", "nested", "points", "patterns", "unicode", "numbers"]
    params, prompts = _greedy_cases(engine, names)
    params = [replace(p, max_new_tokens=100) for p in params]  # greedy outputs here close within 60
    # ~40 prompt tokens (30 shared) + 20-60 output tokens each: six need about 300 slots
    small = {"max_total_tokens": 150, "chunked_prefill_size": 64, "schedule_conservativeness": 0.0}
    reqs, sched = _run_scheduler(engine, params, prompts, **small)
    assert sched.num_retractions > 0
    for name, r in zip(names, reqs, strict=True):
        assert r.finish.kind == "stop"
        jsonschema.validate(json.loads(r.text), SCHEMAS[name])


def test_a_refused_token_fails_only_its_request(engine: Engine, monkeypatch) -> None:
    """If a token got past the mask (a bug), the request ends with an error; the scheduler goes on."""
    from sgl_compile.runtime.structured import Grammars

    monkeypatch.setattr(Grammars, "mask", lambda self, logits, rows: None)  # masks lost
    params = [
        SamplingParams(temperature=0, max_new_tokens=8, regex="[0-9]{8}", ignore_eos=True),
        SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True),
    ]
    reqs, _ = _run_scheduler(engine, params, ["Once upon a time", "Once upon a time"])
    assert reqs[0].finish.kind == "error" and "refused" in reqs[0].finish.message
    assert reqs[1].finish.kind == "length" and len(reqs[1].output_ids) == 8


def test_jump_forward_default_follows_cuda_graphs() -> None:
    """auto: on where every step is eager (CPU, graphs disabled), off where decode replays CUDA graphs
    (a jump's extend step would run eagerly between them)."""
    from sgl_compile.runtime.launch import EngineArgs, check_args, jump_forward_enabled

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert jump_forward_enabled(EngineArgs(), cpu)
    assert not jump_forward_enabled(EngineArgs(), cuda)
    assert jump_forward_enabled(EngineArgs(disable_cuda_graph=True), cuda)
    assert jump_forward_enabled(EngineArgs(jump_forward="on"), cuda)
    assert not jump_forward_enabled(EngineArgs(jump_forward="off"), cpu)
    with pytest.raises(SglcError, match="unknown jump forward 'yes'; valid: auto, on, off"):
        check_args(EngineArgs(jump_forward="yes"))
