"""`sglc serve` as a user meets it: a real process on 127.0.0.1, the official openai client, raw HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sgl_compile.runtime.engine import Engine
from tests import prompts

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
POOL = 20000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_cmd(model: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "sgl_compile.cli", "serve", "--model", str(model), "--port", str(port)]


@pytest.fixture(scope="module")
def server(smollm2_gguf: Path, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = _serve_cmd(smollm2_gguf, port)
    cmd += ["--api-key", KEY, "--served-model-name", "smol", "--max-total-tokens", str(POOL)]
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
    yield url, proc, log
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=60)
    assert code == 0, f"exit code {code}: " + log.read_text()[-1500:]


@pytest.fixture(scope="module")
def engine(smollm2_gguf: Path):
    e = Engine(model=str(smollm2_gguf), max_total_tokens=POOL)
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key=KEY)


def test_startup_logs_say_what_happens(server) -> None:
    text = server[2].read_text()
    assert "KV pool" in text and "ready at http://127.0.0.1" in text


def test_openai_chat_matches_engine(client, engine) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="smol", messages=messages, max_tokens=24, temperature=0)
    prompt = engine.tokenizer.apply_chat_template(messages)
    expected = engine.generate(
        input_ids=engine.tokenizer.encode(prompt, False),
        sampling_params={"temperature": 0, "max_new_tokens": 24},
    )
    assert r.choices[0].message.content == expected["text"]
    assert r.usage.prompt_tokens == expected["meta_info"]["prompt_tokens"]
    assert r.usage.completion_tokens == expected["meta_info"]["completion_tokens"]

    stream = client.chat.completions.create(
        model="smol",
        messages=messages,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["text"]
    assert chunks[-1].usage.completion_tokens == expected["meta_info"]["completion_tokens"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_openai_completions_match_engine(client, engine) -> None:
    expected = engine.generate(prompts.CODE, {"temperature": 0, "max_new_tokens": 20})
    r = client.completions.create(model="smol", prompt=prompts.CODE, max_tokens=20, temperature=0)
    assert r.choices[0].text == expected["text"] and r.usage.completion_tokens == 20
    streamed = client.completions.create(
        model="smol", prompt=prompts.CODE, max_tokens=20, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == expected["text"]
    # token-id prompts, a batch of prompts, echo and logprobs
    ids = engine.tokenizer.encode(prompts.CODE)
    r = client.completions.create(
        model="smol", prompt=[ids, ids], max_tokens=20, temperature=0, logprobs=2, echo=True
    )
    assert [c.text for c in r.choices] == [engine.tokenizer.decode(ids) + expected["text"]] * 2
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + 20 and len(lp.top_logprobs[-1]) == 2


def test_n_and_seed(client) -> None:
    kw = dict(
        model="smol",
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=12,
        temperature=1.0,
    )
    a = client.chat.completions.create(n=3, seed=5, **kw)
    b = client.chat.completions.create(n=3, seed=5, **kw)
    assert len(a.choices) == 3 and [c.message.content for c in a.choices] == [
        c.message.content for c in b.choices
    ]
    assert a.usage.prompt_tokens_details.cached_tokens > 0


def _post(url: str, path: str, body, headers=AUTH) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(
        url + path, content=content, headers={**headers, "content-type": "application/json"}, timeout=60
    )


CHAT = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD_RANGE = {"type": "integer", "minimum": 5, "maximum": 1}
BAD_FORMAT = {"type": "json_schema", "json_schema": {"name": "n", "schema": BAD_RANGE}}


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/chat/completions", "{not json", None),
        ("/v1/chat/completions", {**CHAT, "temperature": -0.5}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "top_p": 0}, "top_p"),
        ("/v1/chat/completions", {**CHAT, "top_p": 1.5}, "top_p"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "n": 1000}, "n"),
        ("/v1/chat/completions", {**CHAT, "model": "gpt-9"}, "model"),
        ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "wizard", "content": "x"}]},
            "messages.0.role",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": "word " * 9000}]},
            "messages",
        ),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 100000}, "max_tokens"),
        ("/v1/completions", {"model": "smol", "prompt": "hi", "suffix": "end"}, "suffix"),
        ("/v1/completions", {"model": "smol", "prompt": ""}, "prompt"),
        ("/v1/completions", {"model": "smol", "prompt": [10**9]}, "prompt"),
        ("/v1/completions", {"model": "smol"}, "prompt"),
        ("/generate", {"text": "hi", "sampling_params": {"temperature": -1}}, "sampling_params"),
        ("/generate", {"text": "hi", "sampling_params": {"bogus": 1}}, "sampling_params"),
        ("/generate", {"sampling_params": {}}, "text"),
        # structured outputs: compiled in the HTTP process, so a bad one is a 400 naming the field
        ("/v1/chat/completions", {**CHAT, "response_format": BAD_FORMAT}, "response_format"),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, "response_format"),
        ("/v1/chat/completions", {**CHAT, "json_schema": "{not json"}, "json_schema"),
        ("/v1/chat/completions", {**CHAT, "regex": "(abc"}, "regex"),
        ("/v1/chat/completions", {**CHAT, "regex": "a", "ebnf": 'root ::= "a"'}, "regex"),
        ("/v1/completions", {"model": "smol", "prompt": "hi", "ebnf": "root ::= undefined"}, "ebnf"),
        ("/generate", {"text": "hi", "sampling_params": {"regex": "(abc"}}, "sampling_params.regex"),
        (
            "/generate",
            {"text": "hi", "sampling_params": {"json_schema": BAD_RANGE}},
            "sampling_params.json_schema",
        ),
        (
            "/generate",
            {"text": "hi", "sampling_params": {"regex": "a", "ebnf": 'root ::= "a"'}},
            "sampling_params",
        ),
    ],
)
def test_bad_input_is_a_400_naming_the_field(server, path, body, param) -> None:
    r = _post(server[0], path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"] and error["param"] == param


def test_structured_output_requests(server) -> None:
    """The compiler's own message comes back; valid constraints are accepted on every endpoint."""
    url = server[0]
    r = _post(url, "/v1/chat/completions", {**CHAT, "response_format": BAD_FORMAT})
    assert "minimum greater than maximum" in r.json()["error"]["message"]
    r = _post(url, "/generate", {"text": "hi", "sampling_params": {"regex": "(abc"}})
    assert "parenthesis is not closed" in r.json()["error"]["message"]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    for body in [
        {**CHAT, "response_format": fmt},
        {**CHAT, "response_format": {"type": "json_object"}},
        {**CHAT, "regex": "(yes|no)"},
        {"model": "smol", "prompt": "hi", "max_tokens": 4, "ebnf": 'root ::= "a" | "b"'},
    ]:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        assert _post(url, path, body).status_code == 200, body
    r = _post(
        url, "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 4, "json_schema": schema}}
    )
    assert r.status_code == 200, r.text


def test_api_key(server) -> None:
    url = server[0]
    assert httpx.get(url + "/health").status_code == 200  # the one open endpoint
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert _post(url, "/v1/chat/completions", CHAT, headers={}).status_code == 401
    models = httpx.get(url + "/v1/models", headers=AUTH).json()
    assert models["data"][0]["id"] == "smol"


def test_native_endpoints(server, engine) -> None:
    url = server[0]
    expected = engine.generate(prompts.CODE, {"temperature": 0, "max_new_tokens": 8})
    r = _post(
        url, "/generate", {"text": prompts.CODE, "sampling_params": {"temperature": 0, "max_new_tokens": 8}}
    )
    assert r.status_code == 200 and r.json()["output_ids"] == expected["output_ids"]
    batch = _post(
        url,
        "/generate",
        {"input_ids": [expected["output_ids"], [1, 2, 3]], "sampling_params": {"max_new_tokens": 2}},
    )
    assert len(batch.json()) == 2
    with httpx.stream(
        "POST", url + "/generate", headers=AUTH, timeout=60,
        json={"text": prompts.CODE, "sampling_params": {"temperature": 0, "max_new_tokens": 8}, "stream": True},
    ) as s:  # fmt: skip
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["text"] == expected["text"]
    assert httpx.get(url + "/health_generate", headers=AUTH).text == "ok"
    info = httpx.get(url + "/get_model_info", headers=AUTH).json()
    assert info["served_model_name"] == "smol" and info["context_length"] == 8192
    assert httpx.get(url + "/get_server_info", headers=AUTH).json()["max_total_tokens"] == POOL
    assert _post(url, "/abort_request", {"rid": "nothing-by-this-id"}).status_code == 200


def _metrics(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", headers=AUTH).text
    return {
        s.name + json.dumps(s.labels, sort_keys=True): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_metrics_parse_and_move(server) -> None:
    url = server[0]
    before = _metrics(url)
    _post(
        url,
        "/generate",
        {"text": "hello", "sampling_params": {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}},
    )
    after = _metrics(url)
    assert after["sglc_generation_tokens_total{}"] - before.get("sglc_generation_tokens_total{}", 0) == 5
    finished = sum(v for k, v in after.items() if k.startswith("sglc_requests_total"))
    assert finished > sum(v for k, v in before.items() if k.startswith("sglc_requests_total"))
    assert after["sglc_time_to_first_token_seconds_count{}"] > before.get(
        "sglc_time_to_first_token_seconds_count{}", 0
    )
    for gauge in (
        "sglc_num_running_reqs{}",
        "sglc_num_queued_reqs{}",
        "sglc_kv_usage{}",
        "sglc_cache_hit_rate{}",
    ):
        assert gauge in after


@pytest.mark.slow
def test_load_with_disconnects(server, engine) -> None:
    """200 streamed requests, 32 at a time, every 10th client hanging up after its first chunk."""
    url = server[0]
    texts = [prompts.LONG[: 30 * (i + 1)] for i in range(10)] + [p for p in prompts.CORPUS if p.strip()][:10]
    expected = [
        o["text"]
        for o in engine.generate(texts, {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True})
    ]

    async def one(http: httpx.AsyncClient, i: int, sem: asyncio.Semaphore) -> str | None:
        body = {"model": "smol", "prompt": texts[i % len(texts)], "max_tokens": 16, "temperature": 0}
        body |= {"stream": True, "ignore_eos": True}
        async with sem, http.stream("POST", url + "/v1/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            text = ""
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                text += json.loads(line[6:])["choices"][0]["text"]
                if i % 10 == 9:
                    return None  # hang up mid-stream
            return text

    async def run() -> list:
        sem = asyncio.Semaphore(32)
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(one(http, i, sem) for i in range(200)))

    results = asyncio.run(run())
    for i, text in enumerate(results):
        if i % 10 != 9:
            assert text == expected[i % len(texts)], i
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    deadline = time.time() + 30
    while time.time() < deadline:
        stats = httpx.get(url + "/get_server_info", headers=AUTH).json()["stats"]
        if stats.get("num_running_reqs") == 0 and stats.get("num_queued_reqs") == 0:
            break
        time.sleep(0.2)
    assert stats["num_running_reqs"] == 0 and stats["num_queued_reqs"] == 0
    assert _post(url, "/flush_cache", {}).status_code == 200
    stats = httpx.get(url + "/get_server_info", headers=AUTH).json()["stats"]
    assert stats["kv_used_tokens"] == 0, json.dumps(stats)


def test_scheduler_death_makes_the_server_exit_nonzero(smollm2_gguf: Path, tmp_path: Path) -> None:
    port = _free_port()
    cmd = _serve_cmd(smollm2_gguf, port)
    log = tmp_path / "server.log"
    with log.open("w") as f:
        proc = subprocess.Popen([*cmd, "--max-total-tokens", "2000"], stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert children, log.read_text()
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)
        assert proc.wait(timeout=30) == 1, log.read_text()[-2000:]
        assert "scheduler process died" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


BENCH_KEYS = [
    "completed", "failed", "duration_s", "total_input_tokens", "total_output_tokens", "request_throughput",
    "input_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_itl_ms",
    "median_itl_ms", "p95_itl_ms", "p99_itl_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
    "mean_e2e_latency_ms", "median_e2e_latency_ms", "p99_e2e_latency_ms",
]  # fmt: skip


@pytest.mark.parametrize("dataset", ["random", "generated-shared-prefix"])
def test_bench_serve_against_the_live_server(server, smollm2_gguf, tmp_path, dataset) -> None:
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "sgl_compile.cli",
        "bench",
        "serve",
        "--base-url",
        server[0],
        "--api-key",
        KEY,
    ]
    cmd += [
        "--model",
        str(smollm2_gguf),
        "--dataset",
        dataset,
        "--num-prompts",
        "8",
        "--random-input-len",
        "32",
    ]
    cmd += ["--random-output-len", "8", "--random-range-ratio", "0.5", "--gsp-num-groups", "2"]
    cmd += ["--gsp-prompts-per-group", "4", "--gsp-system-prompt-len", "64", "--gsp-question-len", "8"]
    cmd += [
        "--gsp-output-len",
        "8",
        "--request-rate",
        "50",
        "--max-concurrency",
        "4",
        "--output-file",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(out.read_text())
    for key in BENCH_KEYS:
        assert key in summary, key
    expected = 8 * 8 if dataset == "generated-shared-prefix" else None
    assert summary["completed"] == 8 and summary["failed"] == 0
    if expected:
        assert summary["total_output_tokens"] == expected
    assert summary["output_throughput"] > 0 and summary["mean_ttft_ms"] > 0 and summary["p99_itl_ms"] > 0


def _cap_generation(body: object) -> None:
    """Fuzzed bodies may ask for thousands of tokens; on a CPU that is minutes, and says nothing new."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens", "max_new_tokens", "n"):
            if isinstance(body.get(key), int) and body[key] > 4:
                body[key] = 4
        for value in body.values():
            _cap_generation(value)


def _fuzz(op, url: str, failures: list):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=st.data())
    def fuzz(data) -> None:
        case = data.draw(op.as_strategy())
        _cap_generation(case.body)
        response = case.call(base_url=url, headers=AUTH, timeout=60)
        if response.status_code >= 500:
            failures.append((op.label, case.body, response.status_code, response.text[:300]))

    return fuzz


def test_schemathesis_finds_no_server_errors(server) -> None:
    """Every operation of the server's own OpenAPI schema, with generated bodies: never a 5xx."""
    import schemathesis

    url = server[0]
    schema = schemathesis.openapi.from_url(url + "/openapi.json", headers=AUTH)
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) == 11  # every route of the app
    failures: list = []
    for op in operations:
        _fuzz(op, url, failures)()
    assert not failures, failures[:3]
    assert httpx.get(url + "/health").status_code == 200


def test_overload_is_a_503_not_a_dropped_connection() -> None:
    """Beyond --max-queued-requests in flight, new requests get 503 with an error body (queue state faked)."""
    import asyncio as aio

    from sgl_compile.server.state import RequestError, ServerState

    class Busy:
        def running(self) -> int:
            return 8

    state = ServerState(Busy(), None, None, "m", "m", max_queued_requests=8)
    with pytest.raises(RequestError) as e:
        aio.run(state.run_all("r", [[1, 2]], [{}], 1))
    assert e.value.status == 503 and "overloaded" in str(e.value)
