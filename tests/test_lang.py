"""The frontend language on SmolLM2: chat templates, select against the model's own logprobs, forks equal
to separate runs and sharing their prefix, batches, streaming, both backends, and the examples."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from examples.few_shot_classification import classify
from examples.json_extraction import extract_person
from examples.multi_turn_chat import multi_turn_chat
from examples.tree_of_thought import tree_of_thought
from sgl_compile.errors import SglcError
from sgl_compile.lang import (
    Backend,
    EngineBackend,
    RuntimeEndpoint,
    assistant,
    assistant_begin,
    assistant_end,
    function,
    gen,
    select,
    set_default_backend,
    system,
    user,
    user_begin,
    user_end,
)
from sgl_compile.runtime.engine import Engine
from tests.test_server import _free_port, _serve_cmd

KEY = "lang-key"
SYSTEM = "You are a concise assistant. Answer in one short sentence."


@pytest.fixture(scope="module")
def engine(smollm2_gguf: Path) -> Engine:
    e = Engine(model=str(smollm2_gguf), max_total_tokens=20000)
    yield e
    e.shutdown()


class CountingBackend(EngineBackend):
    """The engine backend, recording the size of every batched request and the most requests in flight."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.requests: list[int] = []
        self.in_flight = self.most_in_flight = 0
        self._lock = threading.Lock()

    def generate(self, input_ids, sampling_params, return_logprob=False, logprob_start_len=-1):
        with self._lock:
            self.requests.append(len(input_ids))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return super().generate(input_ids, sampling_params, return_logprob, logprob_start_len)
        finally:
            with self._lock:
                self.in_flight -= 1


@pytest.fixture(scope="module")
def backend(engine: Engine) -> CountingBackend:
    return CountingBackend(engine)


@function
def qa(s, question: str, max_tokens: int = 8, ignore_eos: bool = False):
    s += system(SYSTEM)
    s += user(question)
    s += assistant(gen("answer", max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos))


def _greedy(engine: Engine, ids: list[int], max_tokens: int) -> str:
    out = engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": max_tokens})
    return out["text"]


# -- chat templates ---------------------------------------------------------------------------
def test_role_blocks_render_like_the_chat_template(engine, backend) -> None:
    state = qa.run(question="What is the capital of France?", backend=backend)
    tok = engine.tokenizer
    messages = state.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[2]["content"] == state["answer"] != ""
    assert state.text() == tok.apply_chat_template(messages, add_generation_prompt=False)
    prompt = tok.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert state["answer"] == _greedy(engine, tok.encode(prompt), 8)
    meta = state.get_meta_info("answer")
    assert meta["prompt_tokens"] == len(tok.encode(prompt)) and meta["completion_tokens"] <= 8

    # the context-manager and begin/end spellings make the same text as the role functions
    @function
    def spelled(s, question):
        with s.system():
            s += SYSTEM
        s += user_begin() + question + user_end()
        s += assistant_begin()
        s += gen("answer", max_tokens=8, temperature=0)
        s += assistant_end()

    other = spelled.run(question="What is the capital of France?", backend=backend)
    assert other.text() == state.text() and other.messages() == messages


def test_unbalanced_role_blocks_fail(backend) -> None:
    @function
    def nested(s):
        s += user_begin()
        s += assistant("hi")

    with pytest.raises(SglcError, match="inside the open 'user' block"):
        nested.run(backend=backend)


# -- select -----------------------------------------------------------------------------------
SELECT_CASES = [
    ("The capital of France is", [" London", " Paris", " Berlin"]),
    ("Q: Is the sun hot?\nA: ", ["no", "yes", "maybe"]),  # the prompt's last token " " becomes " yes"
    ("I flew from London to New", [" York", " York City", " Zealand"]),  # a shared head, one 2 tokens long
    ("2 + 2 =", [" 5", " 4", " four", " 22"]),
]


def _reference_scores(engine: Engine, backend, text: str, choices: list[str]) -> list[float]:
    """Mean logprob of each choice's tokens, one request per choice, read off the full prompt logprobs."""
    prompt = backend.encode(text)
    scores = []
    for choice in choices:
        full = backend.encode(text + choice)
        shared = next((i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b), len(prompt))
        out = engine.generate(
            input_ids=full, sampling_params={"max_new_tokens": 0}, return_logprob=True, logprob_start_len=1
        )
        logprobs = [lp for lp, _ in out["meta_info"]["input_token_logprobs"]]
        assert len(logprobs) == len(full) - 1
        own = logprobs[shared - 1 :]
        scores.append(sum(own) / len(own))
    return scores


@pytest.mark.parametrize(("text", "choices"), SELECT_CASES)
def test_select_matches_the_models_logprobs(engine, backend, text, choices) -> None:
    @function
    def pick(s):
        s += text
        s += select("pick", choices)

    reference = _reference_scores(engine, backend, text, choices)
    backend.requests.clear()
    state = pick.run(backend=backend)
    assert backend.requests == [len(choices)]  # one batched prefill
    best = max(range(len(choices)), key=lambda i: reference[i])
    assert state["pick"] == choices[best]
    assert state.text() == text + choices[best]
    assert state.get_meta_info("pick")["normalized_prompt_logprobs"] == pytest.approx(reference, abs=1e-3)


def test_gen_choices_is_select(backend) -> None:
    @function
    def pick(s, use_gen: bool):
        s += "The capital of France is"
        s += gen("city", choices=[" Rome", " Paris"]) if use_gen else select("city", [" Rome", " Paris"])

    a, b = pick.run(use_gen=True, backend=backend), pick.run(use_gen=False, backend=backend)
    assert a["city"] == b["city"] == " Paris" and a.text() == b.text()


# -- fork / join ------------------------------------------------------------------------------
TOPICS = ["the sea", "the moon", "the sea"]


@function
def forked(s, temperature: float, max_tokens: int = 8):
    s += system(SYSTEM)
    forks = s.fork(len(TOPICS))
    for i, (f, topic) in enumerate(zip(forks, TOPICS, strict=True)):
        f += user(f"Tell me one fact about {topic}.")
        f += assistant(gen("fact", max_tokens=max_tokens, temperature=temperature, seed=100 + i))
    forks.join()


@function
def branch(s, topic: str, seed: int, temperature: float):
    s += system(SYSTEM)
    s += user(f"Tell me one fact about {topic}.")
    s += assistant(gen("fact", max_tokens=8, temperature=temperature, seed=seed))


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_forks_equal_separate_runs_and_share_the_prefix(engine, backend, temperature) -> None:
    engine.flush_cache()
    backend.most_in_flight = 0
    state = forked.run(temperature=temperature, backend=backend)
    assert backend.most_in_flight == len(TOPICS)  # the forks' calls ran at once (and batched)
    facts = state["fact"]
    assert len(facts) == len(TOPICS) and all(facts)
    for meta in state.get_meta_info("fact"):
        assert meta["cached_tokens"] > 0  # the forks found the shared system prompt in the radix cache
    singles = [
        branch.run(topic=t, seed=100 + i, temperature=temperature, backend=backend)["fact"]
        for i, t in enumerate(TOPICS)
    ]
    assert facts == singles
    if temperature > 0:
        assert facts[0] != facts[2]  # same prompt, other seed


def test_join_modes_and_reading_forks(backend) -> None:
    @function
    def prog(s):
        s += "Colors:"
        forks = s.fork(2)
        for f, color in zip(forks, [" red", " blue"], strict=True):
            f += color
            f["color"] = color.strip()
        s += " first=" + forks[0]["color"]  # reading a fork waits for it
        s.join(forks, mode="concate_and_append")
        forks.join()  # gather_variable

    state = prog.run(backend=backend)
    assert state.text() == "Colors: first=red red blue"
    assert state["color"] == ["red", "blue"]


# -- batches and streaming --------------------------------------------------------------------
QUESTIONS = ["What is 2+2?", "Name a fruit.", "What color is the sky?"]


def test_run_batch_returns_each_inputs_state_and_shares_the_prefix(engine, backend) -> None:
    engine.flush_cache()
    qa.run(question="Hi.", backend=backend)  # caches the system prompt
    batch = [{"question": q, "max_tokens": 6} for q in QUESTIONS]
    states = qa.run_batch(batch, backend=backend, num_threads=4)
    assert [s.messages()[1]["content"] for s in states] == QUESTIONS
    assert all(s.get_meta_info("answer")["cached_tokens"] > 0 for s in states)
    assert [s["answer"] for s in states] == [qa.run(**kw, backend=backend)["answer"] for kw in batch]
    assert qa.run_batch([], backend=backend) == []


def test_streaming_yields_the_text_as_it_is_generated(backend) -> None:
    expected = qa.run(question="Tell me a story.", max_tokens=12, ignore_eos=True, backend=backend)
    state = qa.run(question="Tell me a story.", max_tokens=12, ignore_eos=True, stream=True, backend=backend)
    pieces = list(state.text_iter())
    assert len(pieces) >= 4  # the prompt, then the answer piece by piece
    assert "".join(pieces) == state.text() == expected.text()

    state = qa.run(question="Tell me a story.", max_tokens=12, ignore_eos=True, stream=True, backend=backend)
    answer = list(state.text_iter("answer"))
    assert len(answer) >= 3 and "".join(answer) == expected["answer"]


def test_errors_reach_the_caller(backend) -> None:
    set_default_backend(None)
    with pytest.raises(SglcError, match="no backend"):
        qa.run(question="hi")
    with pytest.raises(TypeError):
        qa.run(backend=backend)  # missing argument

    @function
    def bad(s):
        s += "Hello"
        s += gen("x", temperature=-1)

    with pytest.raises(SglcError, match="temperature"):
        bad.run(backend=backend)
    with pytest.raises(SglcError, match="temperature"):
        list(bad.run(backend=backend, stream=True).text_iter())


def test_default_backend(backend) -> None:
    set_default_backend(backend)
    try:
        assert qa.run(question="What is 2+2?")["answer"]
    finally:
        set_default_backend(None)


class RecordingBackend(Backend):
    """Answers every call with "ok" and records the sampling params it was sent."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer, self.params = tokenizer, []

    @property
    def tokenizer(self):
        return self._tokenizer

    def generate(self, input_ids, sampling_params, return_logprob=False, logprob_start_len=-1):
        self.params.append(sampling_params)
        meta = {"prompt_tokens": len(input_ids[0]), "completion_tokens": 1, "cached_tokens": 0}
        return [{"text": "ok", "output_ids": [0], "meta_info": meta} for _ in input_ids]

    def stream(self, input_ids, sampling_params):
        yield from self.generate([input_ids], sampling_params)


def test_gen_sends_its_sampling_params_over_the_programs_defaults(engine) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}

    @function
    def prog(s):
        s += "A" + gen("a", max_tokens=5, stop=["\n"], regex="[0-9]+", temperature=0)
        s += gen("b", json_schema=schema, seed=7, top_p=0.5)

    recorder = RecordingBackend(engine.tokenizer)
    state = prog.run(backend=recorder, temperature=0.7, max_new_tokens=9, top_k=3)
    assert state.text() == "Aokok"
    assert recorder.params == [
        {"max_new_tokens": 5, "temperature": 0, "top_k": 3, "stop": ["\n"], "regex": "[0-9]+"},
        {
            "max_new_tokens": 9,
            "temperature": 0.7,
            "top_k": 3,
            "top_p": 0.5,
            "seed": 7,
            "json_schema": json.dumps(schema),
        },
    ]


# -- structured outputs ---------------------------------------------------------------------
def test_gen_regex_and_json_schema(backend) -> None:
    @function
    def structured(s):
        s += "Pick a number: "
        s += gen("number", regex="[0-9]{3}", max_tokens=8, temperature=0)
        s += "\nAs JSON: "
        # Every object this schema allows fits in max_tokens (an open one let a sampled run grow extra
        # keys past the limit, cut mid-object: seen once in a full test run).
        schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}},
                  "required": ["n"], "additionalProperties": False}  # fmt: skip
        s += gen("obj", json_schema=schema, max_tokens=24)

    state = structured.run(backend=backend)
    assert len(state["number"]) == 3 and state["number"].isdigit()
    assert isinstance(json.loads(state["obj"]), dict)


# -- the examples -----------------------------------------------------------------------------
def test_example_multi_turn_chat(engine, backend) -> None:
    questions = ["What is the capital of France?", "What language is spoken there?"]
    state = multi_turn_chat.run(questions=questions, max_tokens=12, backend=backend)
    messages = state.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [messages[2]["content"], messages[4]["content"]] == [state["answer_0"], state["answer_1"]]
    assert state.text() == engine.tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert state.get_meta_info("answer_1")["cached_tokens"] > 0  # the first turn is reused


def test_example_tree_of_thought(backend) -> None:
    state = tree_of_thought.run(question="What is 3 + 4?", max_tokens=10, backend=backend)
    assert len(state["thought"]) == 3 and state["best"] in ("1", "2", "3") and state["answer"]
    assert all(m["cached_tokens"] > 0 for m in state.get_meta_info("thought"))


def test_example_json_extraction(backend) -> None:
    state = extract_person.run(text="Tom Baker, 41, lives in Leeds.", backend=backend)
    person = json.loads(state["person"])
    assert (
        isinstance(person["name"], str) and isinstance(person["age"], int) and isinstance(person["city"], str)
    )


def test_example_few_shot_classification(backend) -> None:
    reviews = ["What a wonderful film, I loved every minute.", "Boring plot and terrible acting."]
    states = classify.run_batch([{"review": r} for r in reviews], backend=backend)
    assert [s["label"] for s in states] == ["positive", "negative"]


# -- over HTTP ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(smollm2_gguf: Path, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("lang-server") / "server.log"
    cmd = _serve_cmd(smollm2_gguf, port) + ["--api-key", KEY, "--max-total-tokens", "20000"]
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, log.read_text()
        time.sleep(0.5)
    else:
        pytest.fail("server did not become healthy:\n" + log.read_text())
    yield url
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def endpoint(server: str) -> RuntimeEndpoint:
    backend = RuntimeEndpoint(server, api_key=KEY)
    yield backend
    backend.close()


def test_endpoint_runs_programs_like_the_engine(backend, endpoint) -> None:
    over_http, local = (
        qa.run(question="What is 2+2?", max_tokens=6, ignore_eos=True, backend=b) for b in (endpoint, backend)
    )
    assert over_http.text() == local.text()
    assert over_http.get_meta_info("answer")["completion_tokens"] == 6

    text, choices = SELECT_CASES[2]

    @function
    def pick(s):
        s += text
        s += select("pick", choices)

    over_http, local = pick.run(backend=endpoint), pick.run(backend=backend)
    assert over_http["pick"] == local["pick"]
    assert over_http.get_meta_info("pick")["normalized_prompt_logprobs"] == pytest.approx(
        local.get_meta_info("pick")["normalized_prompt_logprobs"], abs=1e-3
    )

    state = forked.run(temperature=0.9, max_tokens=4, backend=endpoint)
    assert state["fact"] == forked.run(temperature=0.9, max_tokens=4, backend=backend)["fact"]
    assert all(m["cached_tokens"] > 0 for m in state.get_meta_info("fact"))

    batch = [{"question": q, "max_tokens": 4} for q in QUESTIONS[:2]]
    states = qa.run_batch(batch, backend=endpoint)
    assert [s["answer"] for s in states] == [qa.run(**kw, backend=backend)["answer"] for kw in batch]


def test_endpoint_streams(backend, endpoint) -> None:
    expected = qa.run(question="Tell me a story.", max_tokens=6, ignore_eos=True, backend=backend)
    state = qa.run(question="Tell me a story.", max_tokens=6, ignore_eos=True, stream=True, backend=endpoint)
    pieces = list(state.text_iter())
    assert len(pieces) >= 4 and "".join(pieces) == state.text() == expected.text()


def test_endpoint_needs_the_api_key(server, engine) -> None:
    wrong = RuntimeEndpoint(server, api_key="wrong", tokenizer=engine.tokenizer)
    with pytest.raises(SglcError, match="401"):
        qa.run(question="hi", backend=wrong)
